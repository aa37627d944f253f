"""florence against transformers on one NVIDIA GPU: images/s and peak GPU memory, both in bf16
(transformers with sdpa attention), 3 beams, forced new tokens, several batch sizes, on random
full-size Florence-2 models made here (tools/reference/make_full_size.py, native layout).

    python3 tools/cuda/bench_gpu.py --florence .device/florence --sizes base large \\
        --new-tokens 64 256 --batch-sizes 1 8 32 --out "$OUT/bench.md"

Each row: one warm-up, then the median of --runs timed generations of one batch. transformers
is timed around `generate` (pixel values already on the GPU, synchronized); florence by
`florence bench --device cuda` (its end-to-end time without the model load: image decode,
preprocessing and generation). Peak memory: torch.cuda.max_memory_allocated for transformers,
the largest `nvidia-smi` reading of florence's process (sampled every 50 ms) for florence.
"""

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "..", "reference")
IMAGE = os.path.join(HERE, "..", "..", "crates", "florence", "tests", "fixtures", "images", "gradient_rgba.png")


def make_model(size, root):
    out = os.path.join(root, f"florence-{size}")
    if not os.path.isfile(os.path.join(out, "config.json")):
        subprocess.run([sys.executable, os.path.join(REFERENCE, "make_full_size.py"), "--size", size, "--layout",
                        "native", "--out", out, "--threads", str(os.cpu_count()), "--max-new-tokens", "4"], check=True)
    return out


def transformers_rows(model_dir, args):
    import torch
    from transformers import AutoTokenizer, Florence2ForConditionalGeneration

    sys.path.insert(0, REFERENCE)
    import florence_ref as ref

    model = Florence2ForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").to("cuda").eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = tok("What does the image describe?")["input_ids"]
    rows = {}
    for tokens in args.new_tokens:
        for batch in args.batch_sizes:
            gen = dict(num_beams=3, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                       **ref.REMOTE_DEFAULTS)
            pv = ref.pixel_values(args.image, 768).unsqueeze(0).repeat(batch, 1, 1, 1).to("cuda", torch.bfloat16)
            ids = torch.tensor([[model.config.image_token_id] * 577 + prompt] * batch, device="cuda")
            times = []
            torch.cuda.reset_peak_memory_stats()
            for run in range(args.runs + 1):
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(input_ids=ids, pixel_values=pv, **gen)
                torch.cuda.synchronize()
                if run:
                    times.append(time.perf_counter() - t)
            assert out.shape[1] == tokens + 1, out.shape
            rows[(tokens, batch)] = (batch / statistics.median(times), torch.cuda.max_memory_allocated() / 2**20)
    del model
    torch.cuda.empty_cache()
    return rows


def gpu_memory_of(pid):
    """MiB that `pid` holds on the GPU now (0 when nvidia-smi does not list it)."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        p, used = (x.strip() for x in line.split(","))
        if p == str(pid):
            return float(used)
    return 0.0


def florence_rows(model_dir, args):
    rows = {}
    for tokens in args.new_tokens:
        for batch in args.batch_sizes:
            cmd = [args.florence, "bench", "--model", model_dir, "--device", "cuda", "--dtype", "bf16",
                   "--num-beams", "3", "--new-tokens", str(tokens), "--batch-size", str(batch),
                   "--runs", str(args.runs), args.image]
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            peak = [0.0]

            def sample():
                while p.poll() is None:
                    peak[0] = max(peak[0], gpu_memory_of(p.pid))
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample)
            sampler.start()
            out, err = p.communicate()
            sampler.join()
            if p.returncode != 0:
                print(f"florence failed ({' '.join(cmd)}):\n{err}", file=sys.stderr)
                rows[(tokens, batch)] = (float("nan"), float("nan"))
                continue
            line = next(l for l in out.splitlines() if l.startswith("images/s"))
            rows[(tokens, batch)] = (float(line.split()[1]), peak[0])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--florence", default=".device/florence")
    ap.add_argument("--sizes", nargs="+", default=["base", "large"])
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--image", default=IMAGE)
    ap.add_argument("--models", default="/tmp/florence-gpu-models")
    ap.add_argument("--out", default="bench.md")
    args = ap.parse_args()
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip()
    lines = [f"GPU: {gpu}; bf16 for both, 3 beams, forced new tokens, median of {args.runs} runs after a warm-up",
             "", "| model | new tokens | batch | florence images/s | transformers images/s | ratio "
             "| florence peak MiB | transformers peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for size in args.sizes:
        model_dir = make_model(size, args.models)
        ours = florence_rows(model_dir, args)
        theirs = transformers_rows(model_dir, args)
        for key in sorted(ours):
            (o, om), (t, tm) = ours[key], theirs[key]
            lines.append(f"| {size} | {key[0]} | {key[1]} | {o:.2f} | {t:.2f} | {o / t:.2f}x | {om:.0f} | {tm:.0f} |")
            print(lines[-1], flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
