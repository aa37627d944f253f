"""Times `florence caption` against transformers on the same model and image, interleaved
(reference, ours, reference, ours, ...), and prints medians, ratios and peak memory.

    python tools/reference/bench_reference.py --model /tmp/florence-base-native \\
        --florence target/release/florence --new-tokens 64 256 --repeats 3
    python tools/reference/bench_reference.py --model /tmp/florence-base-native --vision --repeats 3

Ours is timed end to end (process start to printed caption, model load included); the
reference is the `generate` call with image loading and preprocessing, model load excluded,
after one warm-up call. Peak RSS is each process's maximum resident set. The model directory
must be in transformers' native layout (make_full_size.py --layout native).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_IMAGE = os.path.join(HERE, "..", "..", "crates", "florence", "tests", "fixtures", "images", "gradient_rgba.png")


def worker(args):
    """Runs in a child process: one warm-up and one timed generate with transformers."""
    import torch
    from transformers import AutoTokenizer, Florence2ForConditionalGeneration

    sys.path.insert(0, HERE)
    import florence_ref as ref

    torch.set_num_threads(args.threads)
    model = Florence2ForConditionalGeneration.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    tok = AutoTokenizer.from_pretrained(os.path.join(ref.SHARED, "tokenizer-florence"))
    prompt = tok("What does the image describe?")["input_ids"]
    gen = dict(num_beams=args.beams, do_sample=False, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
               **ref.REMOTE_DEFAULTS)

    def run():
        pv = ref.pixel_values(args.image, 768).unsqueeze(0).to(model.dtype)  # image load + PIL preprocessing
        ids = torch.tensor([[model.config.image_token_id] * 577 + prompt])
        with torch.no_grad():
            return model.generate(input_ids=ids, pixel_values=pv, **gen)

    if args.vision:
        pv = ref.pixel_values(args.image, 768).unsqueeze(0).to(model.dtype)

        def run():  # noqa: F811 - the vision tower and projector only
            with torch.no_grad():
                return model.model.get_image_features(pixel_values=pv)

    run()
    t = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = 0 if args.vision else out.shape[1] - 1
    print(json.dumps(dict(seconds=seconds, peak_mb=peak_mb, tokens=tokens)))


def vision_ratio(args):
    """Vision tower + projector alone: `florence bench`'s stage times against get_image_features."""
    print("| stage | ours (s) | transformers (s) | ratio |")
    print("|---|---|---|---|")
    ref_t, our_t = [], []
    for _ in range(args.repeats):
        _, _, out = timed([sys.executable, __file__, "--worker", "--vision", "--model", args.model, "--image",
                           args.image, "--tokens", "1", "--beams", "1", "--threads", str(args.threads)])
        ref_t.append(json.loads(out.strip().splitlines()[-1])["seconds"])
        _, _, out = timed([args.florence, "bench", "--model", args.model, "--threads", str(args.threads), "--runs", "1",
                           "--new-tokens", "1", "--num-beams", "1", *args.florence_args.split(), args.image])
        stages = {line[:20].strip(): line[20:].split() for line in out.splitlines()}
        our_t.append((float(stages["vision tower"][0]) + float(stages["projector"][0])) / 1000)
    rt, ot = statistics.median(ref_t), statistics.median(our_t)
    print(f"| vision tower + projector | {ot:.2f} | {rt:.2f} | {ot / rt:.2f} |", flush=True)


def timed(cmd):
    """Wall time and peak RSS (MB) of a child process."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t
    out = p.stdout.read().decode()
    if status != 0:
        sys.exit(f"{cmd[0]} failed: {p.stderr.read().decode()}")
    return seconds, usage.ru_maxrss / 1024, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--florence", default="target/release/florence")
    ap.add_argument("--image", default=DEFAULT_IMAGE)
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[64])
    ap.add_argument("--beams", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--florence-args", default="", help="extra flags for florence caption, e.g. '--dtype bf16'")
    ap.add_argument("--vision", action="store_true", help="time the vision tower and projector alone")
    ap.add_argument("--dtype", default="float32", help="torch dtype the reference loads the model in (bfloat16: oneDNN)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    if args.vision:
        print(f"model {args.model}, image {os.path.basename(args.image)}, {args.threads} threads")
        return vision_ratio(args)
    print(f"model {args.model}, image {os.path.basename(args.image)}, {args.beams} beams, {args.threads} threads")
    print("| new tokens | ours (s) | transformers (s) | ratio | ours peak RSS (MB) | transformers peak RSS (MB) | RSS ratio |")
    print("|---|---|---|---|---|---|---|")
    for n in args.new_tokens:
        ref_t, ref_m, our_t, our_m = [], [], [], []
        for _ in range(args.repeats):
            _, _, out = timed([sys.executable, __file__, "--worker", "--model", args.model, "--image", args.image,
                               "--tokens", str(n), "--beams", str(args.beams), "--threads", str(args.threads)])
            r = json.loads(out.strip().splitlines()[-1])
            ref_t.append(r["seconds"])
            ref_m.append(r["peak_mb"])
            s, m, out = timed([args.florence, "caption", "--model", args.model, "--threads", str(args.threads),
                               "--num-beams", str(args.beams), "--min-new-tokens", str(n), "--max-new-tokens", str(n),
                               "--format", "jsonl", *args.florence_args.split(), args.image])
            assert len(json.loads(out)["ids"]) == n + 1
            our_t.append(s)
            our_m.append(m)
        rt, ot = statistics.median(ref_t), statistics.median(our_t)
        rm, om = statistics.median(ref_m), statistics.median(our_m)
        print(f"| {n} | {ot:.2f} | {rt:.2f} | {ot / rt:.2f} | {om:.0f} | {rm:.0f} | {om / rm:.2f} |", flush=True)


if __name__ == "__main__":
    main()
