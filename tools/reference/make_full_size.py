"""Creates a random full-size Florence-2 (base or large) model directory and the tokens
transformers generates with it, for the opt-in full-size parity test.

    python tools/reference/make_full_size.py --size base --layout remote --out /tmp/florence-base-remote
    FLORENCE_FULL_SIZE_DIRS=/tmp/florence-base-remote cargo test --release -p florence --test full_size -- --ignored

The directory gets config.json, weights, tokenizer.json, preprocessor_config.json and
expected.json (ids and strings for 3-beam and greedy search on one 768x768 image).
"""

import argparse
import os
import shutil
import time

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, Florence2ForConditionalGeneration

import florence_ref as ref

SIZES = {
    "base": dict(
        vision=dict(embed_dim=[128, 256, 512, 1024], num_heads=[4, 8, 16, 32], num_groups=[4, 8, 16, 32],
                    depths=[1, 1, 9, 1], window_size=12, projection_dim=768),
        text=dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                  decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                  max_position_embeddings=1024),
    ),
    "large": dict(
        vision=dict(embed_dim=[256, 512, 1024, 2048], num_heads=[8, 16, 32, 64], num_groups=[8, 16, 32, 64],
                    depths=[1, 1, 9, 1], window_size=12, projection_dim=1024),
        text=dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                  decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
                  max_position_embeddings=4096),
    ),
}
IMAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "crates", "florence", "tests",
                     "fixtures", "images", "gradient_rgba.png")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="base")
    ap.add_argument("--layout", choices=["remote", "native"], default="remote")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image", default=IMAGE)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = SIZES[args.size]
    text = dict(spec["text"], vocab_size=51328 if args.layout == "native" else 51289)
    cfg = ref.native_config(spec["vision"], text)
    model = Florence2ForConditionalGeneration(cfg)
    ref.randomize(model, seed=7, eos_boost=1.0)
    model.eval()
    os.makedirs(args.out, exist_ok=True)
    if args.layout == "native":
        model.save_pretrained(args.out, safe_serialization=True)
    else:
        ref.write_json(os.path.join(args.out, "config.json"), ref.remote_config(spec["vision"], text, 768))
        save_file(ref.remote_state_dict(model, with_tied=False, dtype=torch.float32),
                  os.path.join(args.out, "model.safetensors"))
    ref.write_json(os.path.join(args.out, "preprocessor_config.json"), ref.preprocessor_config(768))
    shutil.copy(os.path.join(ref.SHARED, "tokenizer-florence", "tokenizer.json"), args.out)

    tok = AutoTokenizer.from_pretrained(os.path.join(ref.SHARED, "tokenizer-florence"))
    pv = ref.pixel_values(args.image, 768).unsqueeze(0)
    prompt = tok("What does the image describe?")["input_ids"]
    n_img = 577
    ids = torch.tensor([[model.config.image_token_id] * n_img + prompt])
    cases = []
    for beams in (3, 1):
        gen = dict(num_beams=beams, do_sample=False, max_new_tokens=args.max_new_tokens,
                   min_new_tokens=args.max_new_tokens, **ref.REMOTE_DEFAULTS)
        t = time.time()
        with torch.no_grad():
            out = model.generate(input_ids=ids, pixel_values=pv, **gen)[0].tolist()
        print(f"{args.size}/{args.layout} beams={beams}: {time.time() - t:.1f} s, {len(out) - 1} new tokens")
        cases.append(dict(task="<CAPTION>", image=os.path.abspath(args.image), generation=gen, ids=out,
                          raw=tok.decode(out, skip_special_tokens=False)))
    ref.write_json(os.path.join(args.out, "expected.json"), dict(size=args.size, layout=args.layout, cases=cases))


if __name__ == "__main__":
    main()
