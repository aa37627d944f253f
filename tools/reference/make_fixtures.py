"""Writes the tiny random-weight fixture models and the outputs transformers produces for them.

    python tools/reference/make_fixtures.py [--out crates/florence/tests/fixtures]

Every expected value in the Rust parity tests comes from this script: pixel values, image
features, encoder output, first-step logits, and generated ids and strings for beam search,
greedy search and batches, over four models that cover both checkpoint layouts, safetensors
(single and sharded) and pytorch_model.bin, f32/f16/bf16 storage, padded native vocabularies,
window padding, non-default depths/heads/groups/window sizes and 4096 text positions.
"""

import argparse
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoTokenizer, Florence2ForConditionalGeneration

import florence_ref as ref

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.normpath(os.path.join(HERE, "..", "..", "crates", "florence", "tests", "fixtures"))

PROMPTS = {  # prompt text as the processor builds it (checked against the shared test vectors)
    "<CAPTION>": "What does the image describe?",
    "<OD>": "Locate the objects with category name in the image.",
    "<CAPTION_TO_PHRASE_GROUNDING>": "Locate the phrases in the caption: {input}",
    "<MORE_DETAILED_CAPTION>": "Describe with a paragraph what is shown in the image.",
}

MODELS = {
    # Microsoft layout, f32 safetensors, tied tensors omitted; window 3 forces padding at every stage.
    "remote_f32": dict(
        layout="remote", storage="safetensors", dtype=torch.float32, image_size=64, seed=1,
        tokenizer="microsoft-florence-2-large",
        vision=dict(embed_dim=[8, 16, 24, 32], num_heads=[1, 2, 3, 4], num_groups=[1, 2, 3, 4],
                    depths=[1, 1, 2, 1], window_size=3, projection_dim=16),
        text=dict(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                  decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=24, max_position_embeddings=128,
                  vocab_size=51289),
        images=["noise_rgb.png", "gradient_rgba.png", "gray16.png"],
    ),
    # Native layout, f32, vocabulary padded to 51328; 80 px gives 20/10/5/3 maps (window 4 pads).
    "native_f32": dict(
        layout="native", storage="safetensors", dtype=torch.float32, image_size=80, seed=2,
        tokenizer="tokenizer-florence",
        vision=dict(embed_dim=[8, 8, 16, 16], num_heads=[2, 2, 4, 4], num_groups=[2, 4, 2, 4],
                    depths=[1, 2, 1, 1], window_size=4, projection_dim=8),
        text=dict(d_model=8, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=64,
                  vocab_size=51328),
        images=["noise_rgb.png", "palette.png"],
    ),
    # Microsoft layout as Microsoft ships it: fp16 pytorch_model.bin with the tied tensors included.
    "remote_f16_bin": dict(
        layout="remote", storage="bin", dtype=torch.float16, image_size=48, seed=3,
        tokenizer="vocab-merges",
        vision=dict(embed_dim=[8, 8, 16, 16], num_heads=[1, 2, 2, 4], num_groups=[2, 2, 4, 4],
                    depths=[1, 1, 1, 1], window_size=12, projection_dim=8),
        text=dict(d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=96,
                  vocab_size=51289),
        images=["gray8.png", "noise_rgb.png"],
    ),
    # Native layout, bf16, sharded safetensors, 4096 text positions.
    "native_bf16_sharded": dict(
        layout="native", storage="sharded", dtype=torch.bfloat16, image_size=64, seed=4,
        tokenizer="tokenizer-florence",
        vision=dict(embed_dim=[8, 8, 8, 16], num_heads=[1, 1, 2, 2], num_groups=[1, 2, 2, 4],
                    depths=[1, 1, 1, 1], window_size=5, projection_dim=8),
        text=dict(d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=1,
                  decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8, max_position_embeddings=4096,
                  vocab_size=51328),
        images=["gradient_rgba.png", "gray16.png"],
    ),
    # Config options no published checkpoint uses but the configs allow: no qkv bias, MLP ratio 2,
    # scaled embeddings, and a non-square 72x56 input (18x14 .. 3x2 feature maps).
    "native_variant_f16": dict(
        layout="native", storage="safetensors", dtype=torch.float16, image_size=(72, 56), seed=5,
        tokenizer="tokenizer-florence",
        vision=dict(embed_dim=[8, 8, 16, 16], num_heads=[2, 2, 2, 4], num_groups=[1, 2, 4, 4],
                    depths=[1, 1, 1, 1], window_size=4, projection_dim=8, qkv_bias=False, mlp_ratio=2.0),
        text=dict(d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8, max_position_embeddings=64,
                  vocab_size=51328, scale_embedding=True),
        images=["noise_rgb.png", "gray8.png"],
    ),
}


def make_images(out):
    rng = np.random.default_rng(0)
    os.makedirs(out, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (47, 61, 3), dtype=np.uint8)).save(f"{out}/noise_rgb.png")
    y, x = np.mgrid[0:200, 0:300]
    rgba = np.stack([x * 255 // 299, y * 255 // 199, (x + y) % 256, (x * y) % 256], -1).astype(np.uint8)
    Image.fromarray(rgba).save(f"{out}/gradient_rgba.png")
    g16 = ((x[:40, :40] * 37 + y[:40, :40] * 11) % 1200).astype(np.uint16)
    Image.fromarray(g16).save(f"{out}/gray16.png")
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).quantize(16).save(f"{out}/palette.png")
    Image.fromarray(((x[:96, :128] * 2 + y[:96, :128]) % 256).astype(np.uint8)).save(f"{out}/gray8.png")


def tokenizer_for(kind):
    """The tokenizer the Rust side loads for this model (decoding is the same for all three)."""
    return AutoTokenizer.from_pretrained(os.path.join(ref.SHARED, "tokenizer-florence"))


def save_model(model, spec, cfg, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(ref.preprocessor_config(spec["image_size"]), f, indent=1)
    if spec["layout"] == "native":
        stored = Florence2ForConditionalGeneration(cfg)
        stored.load_state_dict(model.state_dict())
        stored = stored.to(spec["dtype"])
        shard = "300KB" if spec["storage"] == "sharded" else "1GB"
        stored.save_pretrained(out, safe_serialization=True, max_shard_size=shard)
    else:
        ref.write_json(os.path.join(out, "config.json"), ref.remote_config(spec["vision"], spec["text"], spec["image_size"]))
        sd = ref.remote_state_dict(model, with_tied=spec["storage"] == "bin", dtype=spec["dtype"])
        if spec["storage"] == "bin":
            torch.save(sd, os.path.join(out, "pytorch_model.bin"))
        else:
            save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, "model.safetensors"))


def generate(model, pixel_values, prompt_ids, n_image_tokens, **kwargs):
    ids = torch.tensor([[model.config.image_token_id] * n_image_tokens + prompt_ids] * pixel_values.shape[0])
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixel_values, **kwargs)
    return out.tolist()


def trim(seq, pad=1, eos=2):
    """A batched output row without the padding after its EOS."""
    seq = list(seq)
    if eos in seq[1:]:
        return seq[: seq.index(eos, 1) + 1]
    return seq


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = args.out
    if os.path.isdir(out):
        shutil.rmtree(out)
    img_dir = os.path.join(out, "images")
    make_images(img_dir)
    tok = tokenizer_for(None)
    images = sorted(os.listdir(img_dir))

    # Pixel values at the real 768x768 size: sha256 of the f32 buffers (7 MB each otherwise).
    pixels = {"size": 768, "sha256": {}}
    for name in images:
        ref.check_against_transformers_processor(os.path.join(img_dir, name), 768)
        pixels["sha256"][name] = ref.sha256_f32(ref.pixel_values(os.path.join(img_dir, name), 768))
    ref.write_json(os.path.join(out, "pixels_768.json"), pixels)

    for name, spec in MODELS.items():
        torch.manual_seed(spec["seed"])
        cfg = ref.native_config(spec["vision"], spec["text"])
        model = Florence2ForConditionalGeneration(cfg)
        ref.randomize(model, spec["seed"], eos_boost=spec.get("eos_boost", 2.5))
        if spec["dtype"] != torch.float32:
            ref.round_weights(model, spec["dtype"])
        model.eval()
        mdir = os.path.join(out, "models", name)
        save_model(model, spec, cfg, mdir)

        size = spec["image_size"]
        tensors = {}
        pv = {}
        for img in spec["images"]:
            ref.check_against_transformers_processor(os.path.join(img_dir, img), size)
            pv[img] = ref.pixel_values(os.path.join(img_dir, img), size).unsqueeze(0)
        n_img = model.get_image_features(pv[spec["images"][0]]).pooler_output.shape[1]
        cap_ids = tok(PROMPTS["<CAPTION>"])["input_ids"]
        for img in spec["images"]:
            with torch.no_grad():
                feats = model.get_image_features(pv[img]).pooler_output
                ids = torch.tensor([[model.config.image_token_id] * n_img + cap_ids])
                fwd = model(input_ids=ids, pixel_values=pv[img], decoder_input_ids=torch.tensor([[2]]))
            tensors[f"{img}/pixel_values"] = pv[img][0]
            tensors[f"{img}/image_features"] = feats[0]
            tensors[f"{img}/encoder_output"] = fwd.encoder_last_hidden_state[0]
            tensors[f"{img}/first_logits"] = fwd.logits[0, 0]
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "models", name + ".expected.safetensors"))

        cases = []

        def case(task, imgs, text_input=None, prompt=None, **gen):
            prompt = prompt if prompt is not None else PROMPTS[task].replace("{input}", text_input or "")
            prompt_ids = tok(prompt)["input_ids"]
            batch = torch.cat([pv[i] for i in imgs])
            seqs = generate(model, batch, prompt_ids, n_img, **gen)
            seqs = [trim(s) for s in seqs]
            cases.append(dict(task=task, text_input=text_input, images=imgs, generation=gen,
                              ids=seqs, raw=tok.batch_decode(seqs, skip_special_tokens=False)))

        beam = dict(num_beams=3, do_sample=False, **ref.REMOTE_DEFAULTS)
        greedy = dict(num_beams=1, do_sample=False, **ref.REMOTE_DEFAULTS)
        for img in spec["images"]:
            case("<CAPTION>", [img], max_new_tokens=20, **beam)
            case("<OD>", [img], max_new_tokens=12, **greedy)
        first = spec["images"][0]
        case("<CAPTION>", spec["images"], max_new_tokens=20, **beam)  # a batch
        case("<MORE_DETAILED_CAPTION>", [first], max_new_tokens=16, min_new_tokens=16, **beam)
        case("<CAPTION_TO_PHRASE_GROUNDING>", [first], text_input="a green car", max_new_tokens=14, **beam)
        if name == "remote_f32":
            case("<OD>", spec["images"], max_new_tokens=10, **greedy)  # a greedy batch
            heuristic = dict(beam, early_stopping=False, num_beams=4, length_penalty=2.0)
            case("<CAPTION>", [first], max_new_tokens=24, **heuristic)
            case("<CAPTION>", [first], max_new_tokens=24, **dict(beam, length_penalty=-0.5, num_beams=2))
        ref.write_json(os.path.join(out, "models", name + ".cases.json"),
                       dict(layout=spec["layout"], tokenizer=spec["tokenizer"], cases=cases))
        print(f"{name}: {len(cases)} cases, ids e.g. {cases[0]['ids'][0][:12]}")
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"fixtures: {total / 1e6:.1f} MB in {out}")


if __name__ == "__main__":
    main()
