"""Times one training step of a full-size Florence-2 with `florence train` and with PyTorch on
the same machine, threads, data and settings, interleaved, and prints a table with peak memory.

    python tools/reference/make_full_size.py --size base --layout native --out /tmp/florence-base-native
    cargo build --release -p florence-cli
    python tools/bench/train_step.py --model /tmp/florence-base-native --batch 1 4 --threads 2 --repeats 2

A step is one optimizer step (CAME, one micro-batch of B 768x768 images with ~60-token captions,
forward, backward, clipping, update). Ours: `florence train --max-steps 2` minus
`--max-steps 1` (the difference is the second step, model load and data discovery cancel out);
PyTorch: the mean of steps 2 and 3 of a loop in one process (`model.train()`, dropout as
configured; with checkpointing, transformers' `gradient_checkpointing_enable()`). Peak RSS is
each process's maximum resident set.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REF = os.path.join(HERE, "..", "reference")
WORDS = ("a photo of a small red house beside a quiet river under a pale blue sky with soft clouds, "
         "tall green trees and a wooden fence in the warm light of a late summer afternoon").split()


def make_data(folder, count):
    """`count` 768x768 images with ~60-token captions."""
    from PIL import Image
    import numpy as np

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = (rng.random((768, 768, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:03}.png"))
        caption = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(48))
        with open(os.path.join(folder, f"{i:03}.txt"), "w") as f:
            f.write(caption)


def write_config(path, model, data, batch, checkpointing):
    cfg = dict(model_name=model, task_prompt="<CAPTION>", dataset_path=data, epochs=1, optimizer="CAME",
               learning_rate=3e-6, lr_scheduler="Constant", train_batch_size=batch, gradient_accumulation_steps=1,
               clip_grad_norm=1.0, weight_decay=0.01, seed=42, shuffle=False,
               gradient_checkpointing=checkpointing)
    with open(path, "w") as f:
        json.dump(cfg, f)


def torch_worker(args):
    """In a child process: steps of the reference trainer's arithmetic; prints seconds per step."""
    import torch

    sys.path.insert(0, REF)
    import train_ref

    torch.set_num_threads(args.threads)
    cfg = train_ref.load_config(args.config)
    model_dir = cfg["model_name"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(train_ref.ref.SHARED, "tokenizer-florence"))
    model = train_ref.load_model(model_dir)
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
    ctx = train_ref.context(model, tok, cfg, model_dir)
    found = train_ref.data.discover(cfg, tok, model.config.text_config.max_position_embeddings)
    params = [p for p in model.parameters()]
    opt = train_ref.make_optimizer(params, cfg)
    batch = train_ref.collate(found["samples"][: cfg["train_batch_size"]], ctx)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        s, n = train_ref.ce_sum(model, batch)
        (s / n).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["clip_grad_norm"])
        opt.step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(seconds=statistics.mean(times[1:]), peak_mb=peak)))


def ours(args, config, steps, workdir):
    out = tempfile.mkdtemp(dir=workdir)
    cmd = ["/usr/bin/time", "-f", "%M", args.florence, "train", config, "--output", out, "--max-steps", str(steps),
           "--threads", str(args.threads), "--quiet"]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True)
    seconds = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr.decode()}")
    peak_mb = int(p.stderr.decode().strip().splitlines()[-1]) / 1024
    shutil.rmtree(out)  # a full-size run folder holds gigabytes of checkpoints
    return seconds, peak_mb


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a full-size model folder in the native layout")
    ap.add_argument("--florence", default="target/release/florence")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--checkpointing", choices=["on", "off", "both"], default="both")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return torch_worker(args)

    work = tempfile.mkdtemp(prefix="florence-train-bench-")
    data = os.path.join(work, "data")
    make_data(data, max(args.batch) * 3)
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.checkpointing]
    print(f"model {args.model}, 768x768, {args.threads} threads, CAME, medians of {args.repeats}")
    print("| batch | checkpointing | ours (s/step) | PyTorch (s/step) | ratio | ours peak RSS (MB) | PyTorch peak RSS (MB) | RSS ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in args.batch:
        for ckpt in modes:
            config = os.path.join(work, f"b{batch}-{int(ckpt)}.json")
            write_config(config, os.path.abspath(args.model), data, batch, ckpt)
            ref_t, ref_m, our_t, our_m = [], [], [], []
            for _ in range(args.repeats):
                p = subprocess.run([sys.executable, __file__, "--worker", "--model", args.model, "--config", config, "--threads",
                                    str(args.threads)], capture_output=True)
                if p.returncode != 0:
                    sys.exit(p.stderr.decode())
                r = json.loads(p.stdout.decode().strip().splitlines()[-1])
                ref_t.append(r["seconds"])
                ref_m.append(r["peak_mb"])
                one, _ = ours(args, config, 1, work)
                two, peak = ours(args, config, 2, work)
                our_t.append(two - one)
                our_m.append(peak)
            ot, rt = statistics.median(our_t), statistics.median(ref_t)
            om, rm = statistics.median(our_m), statistics.median(ref_m)
            print(f"| {batch} | {'on' if ckpt else 'off'} | {ot:.2f} | {rt:.2f} | {ot / rt:.2f} | {om:.0f} | {rm:.0f} "
                  f"| {om / rm:.2f} |", flush=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
