"""Prints PIL's verdict on each image file in a folder: the reference for refusing truncated files.

    FLORENCE_CUTS_DIR=/tmp/cuts cargo test -p florence --test decode -- --ignored write_cuts
    python tools/reference/truncation_verdicts.py /tmp/cuts

The Rust test names each cut `<name>.<refuses|accepts>.<ext>` after the verdict it records for
PIL; this script checks those against what `Image.open(...).convert("RGB")` does, as every Python
captioner loads images, and exits 1 on a mismatch.
"""

import os
import sys
import warnings

from PIL import Image


def verdict(path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(path).convert("RGB")
        return "accepts", ""
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on broken files
        return "refuses", f"{type(e).__name__}: {e}"


def main():
    folder = sys.argv[1]
    mismatches = 0
    for name in sorted(os.listdir(folder)):
        got, why = verdict(os.path.join(folder, name))
        parts = name.split(".")
        recorded = parts[1] if len(parts) == 3 else "accepts"  # whole files must decode
        flag = "" if got == recorded else "   <-- MISMATCH"
        mismatches += got != recorded
        print(f"{name:40} PIL {got:8} {why}{flag}")
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
