"""A/B of two (or more) florence builds: `florence caption` end to end, the builds alternating
run by run so that a shared machine's slow minutes fall on all of them alike.

    python tools/bench/alternate.py --model DIR --new-tokens 256 --rounds 4 \\
        /tmp/florence-before target/release/florence

Prints each run's wall time and peak RSS, then each build's range and median. Standard library
only.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_IMAGE = os.path.join(HERE, "..", "..", "crates", "florence", "tests", "fixtures", "images", "gradient_rgba.png")


def run(binary, args):
    """Wall seconds and peak RSS (MB) of one caption."""
    n = str(args.new_tokens)
    cmd = [binary, "caption", "--model", args.model, "--threads", str(args.threads), "--num-beams", str(args.beams),
           "--min-new-tokens", n, "--max-new-tokens", n, "--format", "jsonl", *args.florence_args.split(), args.image]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t
    if status != 0:
        sys.exit(f"{binary} failed: {p.stderr.read().decode().strip()}")
    return seconds, usage.ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binaries", nargs="+", help="florence executables to compare")
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", default=DEFAULT_IMAGE)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--beams", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--florence-args", default="", help="extra flags for every build, e.g. '--quantize q8'")
    args = ap.parse_args()

    times = {b: [] for b in args.binaries}
    for r in range(args.rounds):
        for b in args.binaries:
            seconds, mb = run(b, args)
            times[b].append(seconds)
            print(f"round {r + 1}  {b}  {seconds:.2f} s  {mb:.0f} MB", flush=True)
    for b, ts in times.items():
        print(f"{b}: {min(ts):.2f}-{max(ts):.2f} s, median {statistics.median(ts):.2f} s")


if __name__ == "__main__":
    main()
