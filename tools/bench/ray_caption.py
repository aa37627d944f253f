"""Images/s of captioning the same N images three ways on one machine (a benchmark, not a test):

  cli           `florence caption -r FOLDER --threads T` (the Rust CLI, one process)
  ray1, ray2    a Ray Data pipeline with florence_rs's Captioner, 1 and 2 actors of T/actors threads:
                  ray.data.read_binary_files(FOLDER, include_paths=True).map_batches(
                      florence_rs.ray.Captioner, fn_constructor_kwargs={"model": M,
                      "threads": T/actors, "num_beams": B, "max_new_tokens": K, "min_new_tokens": K},
                      batch_size=8, concurrency=actors, num_cpus=T/actors)
  transformers  the same pipeline with a callable class written the way Ray's batch-inference
                guide writes one: transformers' Florence2ForConditionalGeneration loaded once per
                actor (torch.set_num_threads(T)), every `bytes` row decoded with PIL
                .convert("RGB"), the rows of a Ray batch generated together; 1 actor

All use the same settings: task <CAPTION>, B beams, exactly K new tokens (min = max), and the
generation defaults of Microsoft's code (no repeated 3-grams, early stopping, forced <s> and
</s>), as tools/reference/bench_reference.py calls transformers. Each scenario is timed from its
start (process start; building the Ray dataset) to the last row materialized (`take_all()`),
model loading included; starting Ray (with a warm-up read, so that the first Ray scenario does
not pay for Ray Data's worker processes) is timed apart. The test images are made here
(deterministic smooth random JPEGs) in a temporary folder, deleted afterwards. The captions of the
CLI and of the florence_rs Ray pipelines are checked to be equal per image (the text; the exit
code is 1 if they are not), and the transformers ids are compared with the CLI's (informational:
PIL's libjpeg and the Rust image crate decode a JPEG to slightly different pixels, which can flip
a near-tie, most often on random weights).

A local Ray is started with one logical CPU more than the actors take (at least os.cpu_count()):
when the actors hold every CPU, Ray Data cannot schedule the read tasks and the pipeline waits
forever.

Environment (the system python has torch 2.15, transformers 5.24 and PIL, but no ray):

    python3 -m venv --system-site-packages /tmp/raybench
    /tmp/raybench/bin/pip install "ray[data]" ./crates/florence-py     # builds the wheel (Rust)
    cargo build --release -p florence-cli                              # target/release/florence

Usage (the model folder in transformers' native layout, with tokenizer.json; a full-size random
one from `python tools/reference/make_full_size.py --size base --layout native --out DIR`):

    /tmp/raybench/bin/python tools/bench/ray_caption.py --model /tmp/florence-base-native \\
        --florence target/release/florence --images 100 --threads 2 --num-beams 3 --new-tokens 32 \\
        --json ray_caption.json
    /tmp/raybench/bin/python tools/bench/ray_caption.py --model DIR --only cli,ray1   # some scenarios
    /tmp/raybench/bin/python tools/bench/ray_caption.py --model DIR --ray-address auto  # a running Ray

With --ray-address the actors run where Ray places them (the model folder and, for the
transformers scenario, tools/reference must be at the same paths there); the CLI always runs here.
"""

import argparse
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
REFERENCE = os.path.join(REPO, "tools", "reference")
SCENARIOS = ("cli", "ray1", "ray2", "transformers")
TASK = "<CAPTION>"


def make_images(folder, n, size, seed=0):
    """n deterministic JPEGs of `size` (w, h): random colours on a coarse grid, bicubic-upscaled
    so they are smooth (as photos are) and their files are of a realistic size."""
    w, h = size
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, (max(h // 40, 2), max(w // 40, 2), 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(os.path.join(folder, f"img_{i:05d}.jpg"), quality=90)


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (lscpu failed)"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def image_tokens(vision, size):
    """Image positions in the prompt: the last stage's grid of the vision tower's convolutional
    embeddings, plus one pooled token (577 for 768x768, as Florence2Processor's num_image_tokens)."""
    w, h = size
    for k, s, p in zip(vision.patch_size, vision.patch_stride, vision.patch_padding):
        w, h = (w + 2 * p - k) // s + 1, (h + 2 * p - k) // s + 1
    return w * h + 1


class TransformersCaptioner:
    """A callable class for `map_batches`, as Ray's batch-inference guide writes one, around
    transformers' Florence2ForConditionalGeneration."""

    def __init__(self, model, threads, num_beams, new_tokens, reference_dir):
        import torch
        from transformers import AutoTokenizer, Florence2ForConditionalGeneration

        sys.path.insert(0, reference_dir)
        import florence_ref as ref  # pixel_values (PIL's path, as transformers' processor) and REMOTE_DEFAULTS

        torch.set_num_threads(threads)
        self.torch, self.ref = torch, ref
        self.model = Florence2ForConditionalGeneration.from_pretrained(model).eval()
        self.tok = AutoTokenizer.from_pretrained(model)
        with open(os.path.join(model, "preprocessor_config.json")) as f:
            size = json.load(f)["size"]
        self.size = (size["width"], size["height"])
        n_image = image_tokens(self.model.config.vision_config, self.size)
        prompt = self.tok("What does the image describe?")["input_ids"]  # <CAPTION>'s prompt
        self.prefix = [self.model.config.image_token_id] * n_image + prompt
        self.gen = dict(num_beams=num_beams, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        **ref.REMOTE_DEFAULTS)

    def pixel_values(self, data):
        """florence_ref.pixel_values on the encoded bytes of one row (PIL opens a file object as
        it opens a path, then .convert("RGB"))."""
        return self.ref.pixel_values(io.BytesIO(data), self.size)

    def __call__(self, batch):
        torch = self.torch
        pv = torch.stack([self.pixel_values(bytes(b)) for b in batch["bytes"]])
        ids = torch.tensor([self.prefix] * len(pv))
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, **self.gen)
        ids = [row.tolist() for row in out]
        return {
            "path": batch["path"],
            "caption": np.array(self.tok.batch_decode(out, skip_special_tokens=True), dtype=object),
            "ids": np.array([json.dumps(i) for i in ids], dtype=object),
        }


def run_cli(args, images, work):
    out_dir, manifest = os.path.join(work, "cli-captions"), os.path.join(work, "cli.jsonl")
    cmd = [args.florence, "caption", "-r", images, "--model", args.model, "--threads", str(args.threads),
           "--task", TASK, "--num-beams", str(args.num_beams), "--max-new-tokens", str(args.new_tokens),
           "--min-new-tokens", str(args.new_tokens), "--output-dir", out_dir, "--format", "jsonl",
           "--manifest", manifest, "-q"]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"florence caption failed ({p.returncode}): {' '.join(map(shlex.quote, cmd))}\n{p.stderr}")
    rows = {}
    with open(manifest) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows[os.path.basename(r["path"])] = r
    return seconds, rows, cmd


def run_ray(ds_fn, fn, kwargs, actors, cpus_each):
    t = time.perf_counter()
    ds = ds_fn().map_batches(fn, fn_constructor_kwargs=kwargs, batch_size=8, concurrency=actors, num_cpus=cpus_each)
    rows = ds.take_all()
    seconds = time.perf_counter() - t
    return seconds, {os.path.basename(r["path"]): r for r in rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder, transformers' native layout, with tokenizer.json")
    ap.add_argument("--florence", default=os.path.join(REPO, "target", "release", "florence"),
                    help="the florence binary (default: this checkout's target/release/florence)")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2,
                    help="threads in all: the CLI's --threads; T/actors per Ray actor (rounded down, at least 1)")
    ap.add_argument("--num-beams", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32, help="new tokens per image (min = max)")
    ap.add_argument("--size", default="640x480", help="WxH of the generated JPEGs")
    ap.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()

    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SCENARIOS]
    if bad or not only:
        ap.error(f"--only: unknown {bad}; choose from {','.join(SCENARIOS)}")
    w, h = (int(v) for v in args.size.lower().split("x"))
    if "cli" in only and not os.access(args.florence, os.X_OK):
        ap.error(f"--florence: {args.florence} is not an executable (cargo build --release -p florence-cli)")
    args.model = os.path.abspath(args.model)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    machine = cpu_model()

    work = tempfile.mkdtemp(prefix="ray_caption_")
    results, check = [], {}
    ray_init_seconds = None
    try:
        images = os.path.join(work, "images")
        make_images(images, args.images, (w, h))
        names = sorted(os.listdir(images))
        cli_rows = cli_cmd = None

        def record(scenario, label, actors, threads_each, seconds, rows, errors):
            results.append(dict(scenario=scenario, label=label, actors=actors, threads_each=threads_each,
                                images=len(rows), seconds=seconds,
                                images_per_s=round(len(rows) / seconds, 4), errors=errors))
            print(f"{label}: {len(rows)} images in {seconds:.2f} s", file=sys.stderr, flush=True)

        if "cli" in only:
            seconds, cli_rows, cli_cmd = run_cli(args, images, work)
            record("cli", "florence caption (CLI)", 1, args.threads, seconds, cli_rows,
                   sum("error" in r for r in cli_rows.values()))
            if sorted(cli_rows) != names:
                sys.exit(f"the CLI's manifest has {len(cli_rows)} rows for {len(names)} images")

        if any(s in only for s in ("ray1", "ray2", "transformers")):
            import ray
            from florence_rs.ray import Captioner

            t = time.perf_counter()
            if args.ray_address:
                ray.init(address=args.ray_address, log_to_driver=True)
            else:
                # One logical CPU more than the actors take, so Ray Data's read tasks can run
                # beside them (with every CPU held by an actor the pipeline would wait forever).
                ray.init(num_cpus=max(os.cpu_count() or 1, args.threads + 1), include_dashboard=False)
            ray.data.DataContext.get_current().enable_progress_bars = False

            def read():
                return ray.data.read_binary_files(images, include_paths=True)

            # Warm-up, counted with the runtime's start: the first dataset a driver runs pays for
            # starting Ray Data's worker processes, which would otherwise go to whichever
            # scenario runs first.
            read().map_batches(lambda b: {"n": np.array([len(b["path"])])}, batch_size=8).take_all()
            ray_init_seconds = time.perf_counter() - t

            for scenario, actors in (("ray1", 1), ("ray2", 2)):
                if scenario not in only:
                    continue
                each = max(args.threads // actors, 1)
                kwargs = {"model": args.model, "threads": each, "num_beams": args.num_beams,
                          "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
                seconds, rows = run_ray(read, Captioner, kwargs, actors, each)
                record(scenario, "Ray Data + florence_rs Captioner", actors, each, seconds, rows,
                       sum(r["error"] is not None for r in rows.values()))
                if sorted(rows) != names:
                    sys.exit(f"{scenario}: {len(rows)} rows for {len(names)} images")
                if cli_rows is not None:
                    differ = [n for n in names if rows[n]["caption"] != cli_rows[n].get("text")]
                    check[scenario] = dict(compared="caption text", equal=len(names) - len(differ), images=len(names),
                                           differ=differ[:10])

            if "transformers" in only:
                kwargs = {"model": args.model, "threads": args.threads, "num_beams": args.num_beams,
                          "new_tokens": args.new_tokens, "reference_dir": REFERENCE}
                seconds, rows = run_ray(read, TransformersCaptioner, kwargs, 1, args.threads)
                record("transformers", "Ray Data + transformers", 1, args.threads, seconds, rows, 0)
                if sorted(rows) != names:
                    sys.exit(f"transformers: {len(rows)} rows for {len(names)} images")
                if cli_rows is not None:
                    differ = [n for n in names if json.loads(rows[n]["ids"]) != cli_rows[n].get("ids")]
                    check["transformers"] = dict(compared="ids", equal=len(names) - len(differ), images=len(names),
                                                 differ=differ[:10])
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cli = next((r for r in results if r["scenario"] == "cli"), None)
    for r in results:
        r["ratio_to_cli"] = round((r["images"] / r["seconds"]) / (cli["images"] / cli["seconds"]), 3) if cli else None

    print(f"CPU: {machine}; {os.cpu_count()} logical CPUs")
    print(f"model {args.model}, {args.images} JPEGs {w}x{h}, task {TASK}, {args.num_beams} beams, "
          f"{args.new_tokens} new tokens (forced), {args.threads} threads in all")
    print("florence: one image per forward pass (the default of the CLI and of Florence.caption); transformers: the"
          " rows of each Ray batch (8) through one generate call")
    print("Times run from the scenario's start to its last row materialized, model loading included"
          + (f"; starting Ray and a warm-up read ({ray_init_seconds:.1f} s) are not." if ray_init_seconds else "."))
    print()
    print("| scenario | actors | threads each | images | seconds | images/s | ratio to the CLI |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['ratio_to_cli']:.2f}" if r["ratio_to_cli"] is not None else "-"
        print(f"| {r['label']} | {r['actors']} | {r['threads_each']} | {r['images']} | {r['seconds']:.2f} | "
              f"{r['images_per_s']:.3f} | {ratio} |")
    print()
    for scenario, c in check.items():
        verdict = "identical" if c["equal"] == c["images"] else f"DIFFER for {c['images'] - c['equal']}: {c['differ']}"
        what = "CLI vs " + scenario + (" (informational: PIL's libjpeg and the image crate decode a JPEG to"
                                       " slightly different pixels, which can flip a near-tie)"
                                       if scenario == "transformers" else "")
        print(f"{what}: {c['compared']} {verdict} ({c['equal']}/{c['images']})")
    if any(r["errors"] for r in results):
        print("errors: " + ", ".join(f"{r['scenario']} {r['errors']}" for r in results if r["errors"]))
    print(f"command: {command}")
    if cli_cmd:
        print("CLI: " + " ".join(shlex.quote(a) for a in cli_cmd).replace(work, "$TMP"))

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(cpu=machine, logical_cpus=os.cpu_count(), command=command, model=args.model,
                           images=args.images, size=[w, h], task=TASK, num_beams=args.num_beams,
                           new_tokens=args.new_tokens, threads=args.threads, ray_address=args.ray_address,
                           ray_init_seconds=None if ray_init_seconds is None else round(ray_init_seconds, 3),
                           model_loading_included=True,
                           results=[dict(r, seconds=round(r["seconds"], 3)) for r in results], check=check),
                      f, indent=1)
            f.write("\n")
    ok = all(c["equal"] == c["images"] for s, c in check.items() if s != "transformers")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
