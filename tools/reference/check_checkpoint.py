"""Checks a model folder written by `florence train` against transformers: loads it with the native
Florence2ForConditionalGeneration (f32, eval mode), runs the teacher-forced forward on the inputs of
a file the Rust side wrote, and compares the logits with the ones in that file.

    python tools/reference/check_checkpoint.py MODEL_DIR INPUTS.safetensors [--atol 1e-4] [--out REF.safetensors]

INPUTS.safetensors (the layout of tests/fixtures/train/grads/batch.safetensors):
    pixel_values       f32 [B, 3, H, W]   preprocessed pixels (the processor's size, rescaled, normalized)
    input_ids          int [B, S]         encoder input: the image placeholders (config.image_token_id, as
                                          many as the vision tower yields) then the right-padded prompt ids
    attention_mask     int [B, S]         1 for image positions and real prompt tokens, 0 for padding
    decoder_input_ids  int [B, L]         teacher-forced decoder input (`</s>`, then the labels[:-1], pad 1)
    logits             f32/f16/bf16 [B, L, V]  the Rust side's logits for those inputs
Integer tensors may be i64, i32 or u32; other keys (labels, ...) are ignored.

Prints the maximum absolute difference (and where), the maximum relative one and the reference's
largest |logit|; exits 1 when the maximum absolute difference exceeds --atol, 2 when the folder or
the file is unusable (missing or unexpected weights, wrong shapes). --out writes the reference
logits (key `logits`, f32). The folder must be in transformers' native layout (config.json with
`text_config`/`vision_config`); Microsoft's remote-code layout is refused.
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import Florence2ForConditionalGeneration

KEYS = ("pixel_values", "input_ids", "attention_mask", "decoder_input_ids", "logits")


def fail(msg):
    print(f"check_checkpoint: {msg}", file=sys.stderr)
    sys.exit(2)


def load_model(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    if "auto_map" in cfg:
        fail(f"{model_dir}: remote-code (Microsoft) layout; this check needs the native layout")
    model, info = Florence2ForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        fail(f"{model_dir}: weights do not match the config: {bad}")
    return model.eval()


def load_inputs(path):
    t = load_file(path)
    missing = [k for k in KEYS if k not in t]
    if missing:
        fail(f"{path}: missing tensors {missing} (needs {', '.join(KEYS)})")
    out = {k: t[k].long() for k in ("input_ids", "attention_mask", "decoder_input_ids")}
    out["pixel_values"] = t["pixel_values"].float()
    out["logits"] = t["logits"].float()
    b = out["pixel_values"].shape[0]
    if any(out[k].shape[0] != b for k in KEYS) or out["input_ids"].shape != out["attention_mask"].shape:
        fail(f"{path}: inconsistent shapes {({k: tuple(v.shape) for k, v in out.items()})}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("inputs")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--out", help="write the reference logits here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model_dir)
    x = load_inputs(args.inputs)
    with torch.no_grad():
        ref = model(input_ids=x["input_ids"], pixel_values=x["pixel_values"], attention_mask=x["attention_mask"],
                    decoder_input_ids=x["decoder_input_ids"]).logits.float()
    if args.out:
        save_file({"logits": ref.contiguous()}, args.out)
    if ref.shape != x["logits"].shape:
        fail(f"logits shape {tuple(x['logits'].shape)}, transformers gives {tuple(ref.shape)}")
    diff = (ref - x["logits"]).abs()
    worst = diff.argmax().item()
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
    max_abs = diff.max().item()
    max_rel = (diff / ref.abs().clamp(min=1e-6)).max().item()
    print(f"max abs diff {max_abs:.3e} at {where} (ours {x['logits'][where].item():.6f}, "
          f"transformers {ref[where].item():.6f}); max rel diff {max_rel:.3e}; max |logit| {ref.abs().max().item():.4f}")
    if not max_abs <= args.atol:  # NaN fails too
        print(f"check_checkpoint: max abs diff {max_abs:.3e} exceeds --atol {args.atol:.1e}", file=sys.stderr)
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
