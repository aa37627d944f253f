"""bf16 compute against PyTorch: `florence caption` in f32, `--dtype bf16` and `--dtype bf16
--quantize q8` against transformers in float32 and in bfloat16 (`dtype=torch.bfloat16`, whose
GEMMs oneDNN runs on AMX where the CPU has it), interleaved run by run so that a shared
machine's slow minutes fall on every row alike; then `florence bench`'s stage split.

    python tools/bench/bf16_compute.py --model /tmp/florence-base-native \\
        --florence target/release/florence --new-tokens 64 256 --rounds 3

florence is timed as a whole process (model load included); transformers as its `generate`
call (image load and preprocessing included, model load excluded, after a warm-up), as in
tools/reference/bench_reference.py, whose worker runs it. The default image is a 1024x768
PNG written once to /tmp. Prints medians with each row's time over torch bf16's.
"""

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "..", "reference", "bench_reference.py")
sys.path.insert(0, os.path.dirname(REFERENCE))
from bench_reference import timed  # noqa: E402 - wall time, peak RSS and stdout of a child

FLORENCE_ROWS = [("florence f32", ""), ("florence bf16", "--dtype bf16"),
                 ("florence bf16 + q8", "--dtype bf16 --quantize q8")]
TORCH_ROWS = [("torch f32", "float32"), ("torch bf16", "bfloat16")]


def make_image(path):
    """A 1024x768 RGB image with smooth regions, edges and noise (not all one colour)."""
    if os.path.exists(path):
        return path
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:768, 0:1024].astype(np.float32)
    rng = np.random.default_rng(0)
    img = np.stack([x / 4, y / 3, (x + y) / 7], axis=-1) % 256
    img[200:500, 300:700] = [200, 40, 40]
    img += rng.normal(0, 12, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path


def florence_run(args, flags, n):
    """Seconds and peak RSS of one whole `florence caption` process."""
    cmd = [args.florence, "caption", "--model", args.model, "--threads", str(args.threads), "--num-beams",
           str(args.beams), "--min-new-tokens", str(n), "--max-new-tokens", str(n), "--format", "jsonl",
           *flags.split(), args.image]
    seconds, mb, out = timed(cmd)
    assert len(json.loads(out)["ids"]) == n + 1
    return seconds, mb


def torch_run(args, dtype, n):
    """Seconds of transformers' `generate` and the worker's peak RSS."""
    _, _, out = timed([args.python, REFERENCE, "--worker", "--model", args.model, "--image", args.image, "--tokens",
                       str(n), "--beams", str(args.beams), "--threads", str(args.threads), "--dtype", dtype])
    r = json.loads(out.strip().splitlines()[-1])
    return r["seconds"], r["peak_mb"]


def stage_split(args, flags):
    """`florence bench`'s medians for the stages the table names."""
    cmd = [args.florence, "bench", "--model", args.model, "--threads", str(args.threads), "--runs", "3",
           "--new-tokens", "64", "--num-beams", str(args.beams), *flags.split(), args.image]
    _, _, out = timed(cmd)
    stages = {line[:20].strip(): line[20:].split() for line in out.splitlines()}
    return {k: float(stages[k][0]) for k in ["vision tower", "projector", "text encoder", "decoder step (mean)"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a native-layout model (make_full_size.py --layout native)")
    ap.add_argument("--florence", default="target/release/florence")
    ap.add_argument("--python", default=sys.executable, help="the Python with torch and transformers")
    ap.add_argument("--image", default="/tmp/florence-bench-1024x768.png")
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--beams", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true", help="florence rows only")
    args = ap.parse_args()
    make_image(args.image)

    rows = [(name, "florence", flags) for name, flags in FLORENCE_ROWS]
    if not args.no_torch:
        rows += [(name, "torch", dtype) for name, dtype in TORCH_ROWS]
    times = {(name, n): [] for name, *_ in rows for n in args.new_tokens}
    peak = {name: 0.0 for name, *_ in rows}
    for r in range(args.rounds):
        for n in args.new_tokens:
            for name, kind, arg in rows:
                s, mb = florence_run(args, arg, n) if kind == "florence" else torch_run(args, arg, n)
                times[(name, n)].append(s)
                peak[name] = max(peak[name], mb)
                print(f"round {r + 1}  {n} tokens  {name}: {s:.2f} s, {mb:.0f} MB", file=sys.stderr, flush=True)

    median = {key: statistics.median(v) for key, v in times.items()}
    print(f"model {args.model}, image {os.path.basename(args.image)}, {args.beams} beams, {args.threads} threads, "
          f"medians of {args.rounds} interleaved rounds")
    head = " | ".join(f"{n} tokens (s)" for n in args.new_tokens)
    ratio = " | ".join(f"{n}: / torch bf16" for n in args.new_tokens)
    print(f"| | {head} | {ratio} | peak RSS (MB) |")
    print("|---" * (2 + 2 * len(args.new_tokens)) + "|")
    for name, *_ in rows:
        cells = " | ".join(f"{median[(name, n)]:.2f}" for n in args.new_tokens)
        if args.no_torch:
            rel = " | ".join("-" for _ in args.new_tokens)
        else:
            rel = " | ".join(f"{median[(name, n)] / median[('torch bf16', n)]:.2f}" for n in args.new_tokens)
        print(f"| {name} | {cells} | {rel} | {peak[name]:.0f} |")

    print("\n| florence bench (64 tokens) | vision tower (ms) | projector (ms) | text encoder (ms) | decoder step (ms) |")
    print("|---|---|---|---|---|")
    for name, flags in FLORENCE_ROWS:
        s = stage_split(args, flags)
        print(f"| {name} | {s['vision tower']:.0f} | {s['projector']:.0f} | {s['text encoder']:.0f} | "
              f"{s['decoder step (mean)']:.1f} |")


if __name__ == "__main__":
    main()
