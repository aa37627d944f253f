"""Dataset-captioning throughput: images/s of `florence caption` on a generated folder at
several batch sizes, next to the one-image-at-a-time baseline (one process per image, the way
single-image tools are scripted).

    python tools/bench/dataset.py --model DIR --florence target/release/florence \\
        --images 24 --batch-sizes 1 4 8 --max-new-tokens 32

The folder mixes small PNGs and large JPEGs (3000x2000 and 4000x3000) so decoding costs what it
does on real photos. Needs Pillow and numpy.
"""

import argparse
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
from PIL import Image


def make_folder(root, n, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        if i % 3 == 0:
            w, h = (3000, 2000) if i % 2 == 0 else (4000, 3000)
            # Smooth content (as photos are) so the JPEG is of realistic size.
            small = rng.integers(0, 256, (h // 50, w // 50, 3), dtype=np.uint8)
            Image.fromarray(small).resize((w, h), Image.BICUBIC).save(f"{root}/photo_{i:04d}.jpg", quality=90)
        else:
            Image.fromarray(rng.integers(0, 256, (512, 768, 3), dtype=np.uint8)).save(f"{root}/image_{i:04d}.png")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--florence", default="target/release/florence")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline-images", type=int, default=6, help="images for the one-process-per-image baseline")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="florence-bench-")
    src = os.path.join(work, "src")
    make_folder(src, args.images)
    common = ["--model", args.model, "--threads", str(args.threads), "--max-new-tokens", str(args.max_new_tokens), "-q"]
    print(f"{args.images} images ({args.images // 3 + (args.images % 3 > 0)} large JPEGs), model {args.model}, "
          f"{args.threads} threads, up to {args.max_new_tokens} new tokens, 3 beams")
    print("| mode | images | seconds | images/s |")
    print("|---|---|---|---|")
    files = sorted(os.listdir(src))[: args.baseline_images]
    t = time.perf_counter()
    for f in files:
        subprocess.run([args.florence, "caption", *common, os.path.join(src, f)], check=True, stdout=subprocess.DEVNULL)
    s = time.perf_counter() - t
    print(f"| one process per image | {len(files)} | {s:.1f} | {len(files) / s:.3f} |", flush=True)
    for bs in args.batch_sizes:
        d = os.path.join(work, f"bs{bs}")
        shutil.copytree(src, d)
        t = time.perf_counter()
        subprocess.run([args.florence, "caption", *common, "--batch-size", str(bs), d], check=True)
        s = time.perf_counter() - t
        done = len([f for f in os.listdir(d) if f.endswith(".txt")])
        assert done == args.images, f"{done} captions for {args.images} images"
        print(f"| folder, --batch-size {bs} | {args.images} | {s:.1f} | {args.images / s:.3f} |", flush=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
