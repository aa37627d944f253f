"""Writes OUT/libcuda.so: a link-time stub of the CUDA driver library (as the CUDA toolkit's
stubs/libcuda.so is), so that a CUDA build links on a machine without NVIDIA's driver. At run time
the loader resolves the same names from the real libcuda.so.1 of the driver.

The names are the driver API functions that cudarc (the CUDA binding candle uses) declares,
read from the cudarc crate that `cargo fetch` put in Cargo's registry cache.

    python tools/cuda/libcuda_stub.py OUT_DIR
"""

import glob
import os
import re
import subprocess
import sys
import tarfile
import tempfile


def cudarc_bindings():
    home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
    crates = sorted(glob.glob(os.path.join(home, "registry/cache/*/cudarc-*.crate")))
    if not crates:
        sys.exit("cudarc is not in Cargo's cache; run `cargo fetch` in the repository first")
    with tarfile.open(crates[-1]) as t:
        member = next(m for m in t.getmembers() if m.name.endswith("src/driver/sys/mod.rs"))
        return t.extractfile(member).read().decode()


def main():
    out = sys.argv[1]
    names = sorted(set(re.findall(r"^\s+fn (cu[A-Za-z0-9_]+)\(", cudarc_bindings(), re.M)))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "stub.c")
        with open(src, "w") as f:
            f.writelines(f"int {n}(void) {{ return 999; }}\n" for n in names)
        subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o",
                        os.path.join(out, "libcuda.so"), src], check=True)
    print(f"{out}/libcuda.so: {len(names)} driver functions")


if __name__ == "__main__":
    main()
