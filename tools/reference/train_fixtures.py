"""Writes crates/florence-train/tests/fixtures/train: a tiny random Florence-2 (native layout, every
dropout 0), a small image/caption data set, reference training runs and one micro-batch's loss,
logits and gradients. Run through the trainer's entry point:

    python tools/reference/train_ref.py fixtures [--out DIR]

The fixture folder's README.md (written here too) describes every file. The same command writes
bit-identical files (one CPU thread, deterministic algorithms, seeded generators, PNG/JSON/
safetensors writers without timestamps).
"""

import json
import os
import shutil

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Florence2ForConditionalGeneration, get_linear_schedule_with_warmup

import florence_ref as ref
import train_data as data
import train_ref

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.normpath(os.path.join(HERE, "..", "..", "crates", "florence-train", "tests", "fixtures", "train"))
TOKENIZER = os.path.join(ref.SHARED, "tokenizer-florence")
IMAGE_SIZE = 64

VISION = dict(embed_dim=[8, 8, 16, 16], num_heads=[1, 1, 2, 2], num_groups=[1, 1, 2, 2], depths=[1, 1, 1, 1],
              window_size=4, projection_dim=16, drop_path_rate=0.0, qkv_bias=False)
# 51328 rows: the real tokenizer's 51289 tokens, `<image>` (51289) and padding, as the native checkpoints.
TEXT = dict(d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32, vocab_size=51328, dropout=0.0,
            attention_dropout=0.0, activation_dropout=0.0, classifier_dropout=0.0, encoder_layerdrop=0.0,
            decoder_layerdrop=0.0)

# Form (a) data: stem -> caption (raw file text). Double spaces, a triple space (one replace pass
# leaves a double), surrounding whitespace, non-ASCII, lengths from 1 word to one over the decoder's
# 32 positions (dropped before the split).
CAPTIONS = {
    "a01": "a red square",
    "a02": "two  blue circles on a  white background",
    "a03": "  noise\n",
    "a04": "a gradient from dark to light, left to right, with a thin stripe",
    "a05": "café   crème",
    "b01": "stripes",
    "b02": "a green triangle in the corner of the picture",
    "b03": "checkerboard  pattern of eight by eight cells",
    "b04": "mostly gray",
    "b05": ("a very long caption that keeps going with many words so that its token count is "
            "larger than the thirty two positions the tiny decoder has and it must be dropped"),
    "c01": "a yellow sun over blue water",
    "c02": "dots",
    "c03": "orphan: this caption has no image and is skipped",
    "c04": "the image beside this caption is not an image",
}
# Form (c) folder and a ShareGPT file for the mixed-sources run: (stem, prompt folder, caption).
FORM_C = [("d1", "<CAPTION>", "a small red dot"), ("d2", "<CAPTION>", "two  lines"),
          ("d1", "<DETAILED_CAPTION>", "a small red dot near the top left of a dark square"),
          ("d3", "<DETAILED_CAPTION>", "wide bands of color")]
SHAREGPT = [("a01.png", "<image>\n<CAPTION>", "red square"),
            ("b02.png", "<image><MORE_DETAILED_CAPTION>", "a  green triangle, drawn in the corner"),
            ("c01.png", "<CAPTION_TO_PHRASE_GROUNDING>the sun<image>", "sun"),
            ("b03.png", "<image>\n<OCR>", "no text")]

BASE = dict(model_name="../../model", task_prompt="<CAPTION>", dataset_path="../../data", seed=42)
RUNS = {
    # The brief's main case: warmup, accumulation with a short last window, eval every 2 steps.
    "came_rex": dict(optimizer="CAME", lr_scheduler="REX", learning_rate=1e-3, warmup_steps=2,
                     gradient_accumulation_steps=2, train_batch_size=2, epochs=2, eval_split=2, eval_steps=2,
                     weight_decay=0.01, clip_grad_norm=1.0, eval_before_training=True),
    "adamw_cosine": dict(optimizer="AdamW", lr_scheduler="Cosine", learning_rate=1e-3, min_learning_rate=1e-5,
                         warmup_steps=2, train_batch_size=2, epochs=1, eval_split_ratio=0.2, weight_decay=0.01),
    # No lr_scheduler key: the default Cosine without warmup.
    "freeze": dict(optimizer="CAME", learning_rate=1e-3, train_batch_size=4, epochs=2, freeze_vision=True,
                   freeze_other=True, weight_decay=0.01),
    "token_count": dict(optimizer="CAME", lr_scheduler="REX", learning_rate=1e-3, train_batch_size=2,
                        gradient_accumulation_steps=2, epochs=2, loss_normalization="token_count"),
    # 11 samples, B = 3: micro-batches 3,3,3,2; A = 3: windows of 3 and 1 micro-batches. Also the
    # Constant schedule after a warmup, and no shuffling.
    "short_window_constant": dict(optimizer="CAME", lr_scheduler="Constant", learning_rate=1e-3, warmup_steps=1,
                                  train_batch_size=3, gradient_accumulation_steps=3, epochs=2, shuffle=False),
    "clip_engages": dict(optimizer="OptimiAdamW", lr_scheduler="REX", learning_rate=1e-3, train_batch_size=3, epochs=1,
                         clip_grad_norm=0.05),
    "pad_in_loss": dict(optimizer="CAME", lr_scheduler="REX", learning_rate=1e-3, train_batch_size=2, epochs=1,
                        pad_in_loss=True, eval_split=2, eval_batch_size=1),
    # Form (c) and ShareGPT sources together (mixed prompts: prompt padding), transformers' linear schedule.
    "linear_mixed_sources": dict(optimizer="CAME", lr_scheduler="Linear", learning_rate=1e-3, min_learning_rate=1e-4,
                                 warmup_steps=2, train_batch_size=2, epochs=1,
                                 dataset_config=["../../data_c", "../../data/sharegpt.jsonl"]),
}
# The gradient check's micro-batch: three captions of different lengths under three prompts.
GRAD_BATCH = [("a04.png", "<CAPTION>", "dark to  light"),
              ("b01.png", "<OD>", "stripes"),
              ("c01.png", "<CAPTION_TO_PHRASE_GROUNDING>a sun", " a yellow  sun over water")]

README = """# Training fixtures

Written by `python tools/reference/train_ref.py fixtures` (tools/reference/train_fixtures.py with
train_ref.py and train_data.py: PyTorch 2.15.0, transformers 5.24.0's native Florence-2,
came-pytorch 0.1.3, one CPU thread, deterministic; running it twice gives identical files). The
rules are crates/florence-train/SEMANTICS.md. Nothing here is edited by hand.

## model/
A tiny random Florence-2 in transformers' native layout: `config.json` (every dropout,
attention/activation dropout, layerdrop and `drop_path_rate` 0), `generation_config.json`,
`preprocessor_config.json` (64x64, CLIP mean/std, bicubic) and `model.safetensors` (f32, native
names as `save_pretrained` writes them). DaViT dims 8/8/16/16, window 4, 5 image tokens at
64x64, `qkv_bias` false (see `noise_driven` below: a window-attention qkv bias would let float
noise into every weight of a CAME run through its RMS clip). BART d_model 16, 1 encoder and 2
decoder layers, 32 positions, the native 51328-row vocabulary (`<image>` = 51289). Weights 0.02 * randn, layer norms 1 + 0.01 * randn (biases 0.01 * randn).
No tokenizer: a test adds `tokenizer.json` from `../shared/testdata/tokenizer-florence/` (the real
Florence-2 tokenizer; the reference used that folder), as crates/florence/tests/common/mod.rs
`model_dir()` does for its "tokenizer-florence" fixtures.

Note: the shared embedding has `padding_idx` 1, so torch gives its row 1 no gradient from the
embedding lookups (prompt padding, decoder pad inputs); the tied lm_head still gives row 1 a
gradient through the pad logit.

## data/, data_c/
- data/: form (a): 14 `<stem>.txt` captions, 12 with a PNG beside them (sizes 32x32 to 96x64, RGB,
  b04 grayscale), `c03.txt` without an image (skipped), `c04.png` not decodable (reported and
  dropped), `z_no_caption.png` without a caption (ignored). Captions carry double/triple spaces,
  surrounding whitespace, non-ASCII; `b05.txt`'s label is longer than the decoder's 32 positions
  and is dropped (11 samples remain; run.json lists the two dropped).
- data/sharegpt.jsonl: 4 ShareGPT records over data/'s images with `<image>` before/after/inside
  the human turn and several task prompts.
- data_c/: form (c): `<CAPTION>/` and `<DETAILED_CAPTION>/` subfolders of captions, images in
  data_c/ itself (d1 is captioned under both prompts).

## runs/<name>/
`config.yaml` (Florence-2ner keys; paths relative to the run folder: `model_name: ../../model`
needs the tokenizer added, so a test copies model/ with tokenizer.json and rewrites `model_name`),
and what `train_ref.py train config.yaml --output runs/<name>` wrote:
- `metrics.jsonl`: one line per optimizer step `{"step", "epoch", "lr", "loss", "grad_norm"}`
  (lr = the rate that step used, grad_norm before clipping) and eval lines `{"step", "eval_loss"}`.
- `final.safetensors`: every parameter after the last step, native names as
  `named_parameters()` gives them (the tied embedding once, as `model.language_model.shared.weight`;
  no `lm_head.weight`, no buffers); frozen ones are bit-identical to model/'s.
- `run.json`: the discovered samples (prompt, image, caption file, cleaned caption, prompt/label
  lengths), dropped captions, the split (indices into samples), each epoch's order, steps per
  epoch, total steps, image tokens, the trainable parameter names and `noise_driven`: the
  trainable tensors whose final value float noise decides (CAME runs only). The attention key
  biases (BART's `k_proj.bias`, the key third of DaViT's window-attention `qkv.bias`) get a
  gradient that is zero in exact arithmetic (~1e-13 in f32); CAME (eps 1e-30) normalises it per
  element into steps of about lr (a `qkv.bias`'s RMS clip would couple its other two thirds, and
  so the forward, to that noise: the fixture's DaViT has none). Compare those tensors only loosely
  (each step moves an element by at most about lr * sqrt(numel)); in AdamW runs (eps 1e-8) they
  barely move and compare as usual. Changing only their noise in the reference moves the other
  weights of a CAME run by up to ~1.5e-6: a floor for the tolerance of a CAME comparison.

Runs: came_rex (CAME + REX, warmup 2, B 2, A 2 with a short last window, 2 epochs, eval split 2,
eval every 2 steps and before training, weight decay 0.01, clip 1.0); adamw_cosine (AdamW + Cosine,
warmup 2, min lr 1e-5, eval_split_ratio 0.2, eval at the end only); freeze (CAME, no lr_scheduler
key: the default Cosine without warmup, freeze_vision + freeze_other); token_count
(loss_normalization token_count, A 2); short_window_constant (B 3, A 3: windows of 3 and 1
micro-batches, the last micro-batch of 2; Constant after a 1-step warmup; shuffle false);
clip_engages (OptimiAdamW, clip 0.05, engages every step); pad_in_loss (pad ids in the labels and
the loss, eval split 2 with eval_batch_size 1); linear_mixed_sources (CAME + Linear with warmup 2
to min 1e-4, data from data_c/ and data/sharegpt.jsonl: mixed prompts, so prompt padding).

## grads/
One micro-batch of 3 samples (different prompts, so the prompts are padded; captions of different
lengths, so the labels are padded), train mode, the model in model/:
- `batch.safetensors`: `pixel_values` f32 [3,3,64,64], `input_ids` i64 [3,5+P] (image placeholders
  51289 then the right-padded prompt ids), `attention_mask` i64, `decoder_input_ids` i64 [3,L],
  `labels` i64 [3,L] (-100 padding), `logits` f32 [3,L,51328].
- `grads.safetensors`: the gradient of CE sum / count (pad_in_loss false) for every parameter,
  names as in final.safetensors. The `k_proj.bias` gradients are float noise (~1e-13; zero in
  exact arithmetic): compare them with an absolute tolerance.
- `labels_pad_in_loss.safetensors`: the labels with pad_in_loss true (padded with 1; decoder
  inputs and logits unchanged); its sum and count are in meta.json.
- `meta.json`: the samples (image, prompt, caption, prompt ids, label ids), image token count
  and id, and for each variant `ce_sum`, `count` and `loss` = ce_sum / count.

`batch.safetensors` is also the input format of tools/reference/check_checkpoint.py, which loads a
model folder the Rust trainer wrote with transformers and compares its teacher-forced logits with
the ones in such a file.
"""


def make_model(out):
    """Small-scale weights (std 0.02, layer norms 1 + 0.01 randn) so that CAME's normalised updates
    do not amplify float noise; saved with save_pretrained (f32, native names)."""
    cfg = ref.native_config(VISION, TEXT)
    model = Florence2ForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(7)
    norms = {f"{m}.{k}" for m, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm) for k in ("weight", "bias")}
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name in norms and name.endswith("weight") else 0.0
            p.copy_(base + (0.01 if name in norms else 0.02) * torch.randn(p.shape, generator=g))
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    ref.write_json(os.path.join(out, "preprocessor_config.json"), ref.preprocessor_config(IMAGE_SIZE))
    return model


def image(kind, w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    if kind == "noise":
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind == "gradient":
        return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], -1).astype(np.uint8)
    if kind == "stripes":
        return np.repeat(((x // 4 % 2) * 200 + 30)[..., None], 3, -1).astype(np.uint8)
    if kind == "checker":
        return np.repeat((((x // 8 + y // 8) % 2) * 255)[..., None], 3, -1).astype(np.uint8)
    base = rng.integers(0, 256, 3)
    shape = ((x - w / 2) ** 2 + (y - h / 3) ** 2 < (min(w, h) / 4) ** 2)[..., None]
    return np.where(shape, base, 255 - base).astype(np.uint8)


IMAGES = {"a01": ("shape", 64, 64), "a02": ("shape", 80, 60), "a03": ("noise", 64, 64), "a04": ("gradient", 70, 50),
          "a05": ("noise", 48, 72), "b01": ("stripes", 64, 64), "b02": ("shape", 66, 66), "b03": ("checker", 64, 64),
          "b04": ("gradient", 32, 32), "b05": ("noise", 64, 64), "c01": ("shape", 96, 64), "c02": ("noise", 60, 60),
          "d1": ("shape", 64, 48), "d2": ("stripes", 50, 64), "d3": ("gradient", 64, 64), "z_no_caption": ("noise", 40, 40)}


def write_png(path, stem, mode=None):
    kind, w, h = IMAGES[stem]
    img = Image.fromarray(image(kind, w, h, sum(map(ord, stem))))
    (img.convert(mode) if mode else img).save(path)


def make_data(out):
    d = os.path.join(out, "data")
    os.makedirs(d)
    for stem, caption in CAPTIONS.items():
        with open(os.path.join(d, stem + ".txt"), "w", encoding="utf-8") as f:
            f.write(caption)
        if stem == "c04":  # cannot be decoded: reported and dropped
            with open(os.path.join(d, stem + ".png"), "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n but not really")
        elif stem != "c03":
            write_png(os.path.join(d, stem + ".png"), stem, "L" if stem == "b04" else None)
    write_png(os.path.join(d, "z_no_caption.png"), "z_no_caption")
    with open(os.path.join(d, "sharegpt.jsonl"), "w", encoding="utf-8") as f:
        for img, human, gpt in SHAREGPT:
            rec = {"image": img, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    c = os.path.join(out, "data_c")
    for stem, prompt, caption in FORM_C:
        os.makedirs(os.path.join(c, prompt), exist_ok=True)
        with open(os.path.join(c, prompt, stem + ".txt"), "w", encoding="utf-8") as f:
            f.write(caption)
        if not os.path.exists(os.path.join(c, stem + ".png")):
            write_png(os.path.join(c, stem + ".png"), stem)


def check_pixels(out):
    """The reference's pixel path equals transformers' own PIL image processor on every image."""
    for folder in ("data", "data_c"):
        for name in sorted(os.listdir(os.path.join(out, folder))):
            if name.endswith(".png") and data.image_error(os.path.join(out, folder, name)) is None:
                ref.check_against_transformers_processor(os.path.join(out, folder, name), IMAGE_SIZE)


def check_linear_schedule():
    """Our Linear (min 0) against transformers' get_linear_schedule_with_warmup, rate by rate."""
    for w, total in ((2, 7), (0, 5)):
        cfg = dict(lr_scheduler="Linear", warmup_steps=w, learning_rate=1e-3, min_learning_rate=0.0)
        rates = []
        for make in (lambda o: train_ref.make_scheduler(o, cfg, total),
                     lambda o: get_linear_schedule_with_warmup(o, w, total)):
            opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
            sched = make(opt)
            r = []
            for _ in range(total):
                r.append(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
            rates.append(r)
        assert rates[0] == rates[1], rates


def make_grads(out, model_dir):
    """One micro-batch (GRAD_BATCH) through the model in train mode: inputs, logits, CE sum and count,
    and the gradient of sum / count for every parameter (pad_in_loss false); with pad_in_loss true
    the labels, sum and count."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    model = train_ref.load_model(model_dir)
    ctx = train_ref.context(model, tok, dict(pad_in_loss=False), model_dir)
    d = os.path.join(out, "grads")
    os.makedirs(d)
    samples = []
    for img, prompt, caption in GRAD_BATCH:
        samples.append(data.Sample(prompt, os.path.join(out, "data", img), "", data.clean_caption(caption),
                                   tok(data.construct_prompt(prompt))["input_ids"], tok(data.clean_caption(caption))["input_ids"]))
    meta = dict(samples=[dict(image="data/" + img, prompt=p, caption=s.caption, prompt_ids=s.prompt_ids,
                              label_ids=s.label_ids) for (img, p, _), s in zip(GRAD_BATCH, samples)],
                n_image_tokens=ctx["n_image_tokens"], image_token_id=ctx["image_token_id"])
    for pad_in_loss in (False, True):
        ctx["pad_in_loss"] = pad_in_loss
        batch = train_ref.collate(samples, ctx)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       attention_mask=batch["attention_mask"], decoder_input_ids=batch["decoder_input_ids"]).logits
        s, n = train_ref.ce_sum(model, batch)
        (s / n).backward()
        key = "pad_in_loss" if pad_in_loss else "default"
        meta[key] = dict(ce_sum=s.item(), count=n, loss=(s / n).item())
        if not pad_in_loss:
            grads = {name: p.grad.contiguous() for name, p in model.named_parameters()}
            save_file(grads, os.path.join(d, "grads.safetensors"))
            tensors = {k: batch[k].contiguous() for k in ("pixel_values", "input_ids", "attention_mask",
                                                          "decoder_input_ids", "labels")}
            tensors["logits"] = logits.detach().contiguous()
            save_file(tensors, os.path.join(d, "batch.safetensors"))
        else:  # its gradients would be another 3.4 MB; the pad_in_loss run checks them through training
            save_file({"labels": batch["labels"].contiguous()}, os.path.join(d, "labels_pad_in_loss.safetensors"))
    ref.write_json(os.path.join(d, "meta.json"), meta)


def check_run(out, name, spec):
    """Each run shows what it claims: trainable weights moved, frozen ones are bit-identical,
    clipping engaged, the short window is short."""
    rd = os.path.join(out, "runs", name)
    with open(os.path.join(rd, "metrics.jsonl")) as f:
        lines = [json.loads(l) for l in f]
    with open(os.path.join(rd, "run.json")) as f:
        run = json.load(f)
    steps = [l for l in lines if "loss" in l]
    assert 4 <= len(steps) <= 8 and len(steps) == run["total_steps"], (name, len(steps))
    initial = load_file(os.path.join(out, "model", "model.safetensors"))
    final = load_file(os.path.join(rd, "final.safetensors"))
    trainable = set(run["trainable"])
    moved = {k for k, v in final.items() if not torch.equal(v, initial[k])}
    assert moved <= trainable and len(moved) >= 0.9 * len(trainable), (name, trainable - moved)
    if spec.get("clip_grad_norm"):
        assert name != "clip_engages" or all(l["grad_norm"] > spec["clip_grad_norm"] for l in steps), name
    if spec.get("eval_split") or spec.get("eval_split_ratio"):
        assert any("eval_loss" in l for l in lines), name
    micro = -(-len(run["train"]) // spec["train_batch_size"])
    assert name != "short_window_constant" or micro % spec["gradient_accumulation_steps"] != 0, micro


def make_runs(out):
    for name, spec in RUNS.items():
        rd = os.path.join(out, "runs", name)
        os.makedirs(rd)
        cfg = dict(BASE, **spec)
        if "dataset_config" in spec:
            del cfg["task_prompt"], cfg["dataset_path"]
        with open(os.path.join(rd, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False, allow_unicode=True)
        train_ref.train(train_ref.load_config(os.path.join(rd, "config.yaml")), rd, tokenizer_dir=TOKENIZER)
        check_run(out, name, spec)
        with open(os.path.join(rd, "metrics.jsonl")) as f:
            last = f.read().splitlines()[-1]
        print(f"{name}: {last}")


def main(out=None):
    out = out or DEFAULT_OUT
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    check_linear_schedule()
    model_dir = os.path.join(out, "model")
    make_model(model_dir)
    make_data(out)
    check_pixels(out)
    make_grads(out, model_dir)
    make_runs(out)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(README)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"train fixtures: {total / 1e6:.1f} MB in {out}")
