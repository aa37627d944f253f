#!/bin/sh
# The GPU checks, as one run of the `device` tool (under 10 minutes each part). Prepare here first:
#
#   CUDA_COMPUTE_CAP=90 sh tools/cuda/build.sh        # H100/H200; prints the GPU test's path
#   mkdir -p .device/testdata && grep -qx /.device/ .git/info/exclude || echo /.device/ >> .git/info/exclude
#   strip -o .device/florence "${CARGO_TARGET_DIR:-target}/release/florence"
#   strip -o .device/tensor_generation <the GPU test's path>
#   cp -r ../shared/testdata/tokenizer-florence ../shared/testdata/microsoft-florence-2-large .device/testdata/
#
# then `run` with command `sh tools/cuda/check.sh parity train` and carry [".device"], and again
# with `sh tools/cuda/check.sh bench-base` and `sh tools/cuda/check.sh bench-large` as time
# allows (each part is a few minutes; all of them at once may pass 10). Parts:
#   parity      the tensor path's generation test on the GPU: every parity fixture in f32 gives
#               transformers' ids; bf16 agreement with f32 (printed)
#   train       a 6-step fine-tune of the training fixtures on the CPU and on the GPU in f32;
#               fails unless every step's loss agrees within 1e-4 (relative)
#   bench-base  florence against transformers 3 beams, bf16, 64/256 tokens, batch 1/8/32
#   bench-large the same on Florence-2-large
# Everything each part prints lands in $OUT.
set -eu
BIN=${BIN:-.device/florence}
OUT=${OUT:-/tmp/florence-gpu-check}
mkdir -p "$OUT"
# The CUDA libraries florence links (cudart, cublas, cublasLt, curand, nvrtc): the toolkit's,
# or those of PyTorch's NVIDIA wheels.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import glob, nvidia; print(" ".join(glob.glob(nvidia.__path__[0] + "/*/lib")))' 2>/dev/null); do
  [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH
export FLORENCE_TEST_REPO="$PWD" FLORENCE_TEST_SHARED="$PWD/.device/testdata"
nvidia-smi -L | tee "$OUT/gpu.txt"
ldd "$BIN" | grep -E "cuda|cublas|curand|nvrtc" | tee -a "$OUT/gpu.txt"

# Runs a command with its output kept in $OUT/$1 and shown, and returns its status (POSIX sh
# has no pipefail for `| tee`).
kept() {
  file=$OUT/$1; shift
  "$@" > "$file" 2>&1 && rc=0 || rc=$?
  cat "$file"
  return $rc
}

parity() {
  export FLORENCE_TEST_DEVICE=cuda
  kept parity.txt .device/tensor_generation --nocapture --test-threads 1
}

train() {
  WORK=$(mktemp -d)
  FIXTURES=crates/florence-train/tests/fixtures/train
  mkdir -p "$WORK/model" && cp "$FIXTURES"/model/* "$WORK/model/"
  cp .device/testdata/tokenizer-florence/tokenizer.json "$WORK/model/"
  cat > "$WORK/config.json" <<JSON
{"model_name": "model", "task_prompt": "<CAPTION>", "dataset_path": "$PWD/$FIXTURES/data",
 "epochs": 3, "optimizer": "CAME", "learning_rate": 1e-4, "lr_scheduler": "REX", "warmup_steps": 1,
 "train_batch_size": 2, "gradient_accumulation_steps": 2, "gradient_checkpointing": true,
 "eval_split": 2, "eval_steps": 3, "save_steps": 100, "shuffle": true, "seed": 7}
JSON
  for device in cpu cuda; do
    /usr/bin/time -f "$device: %e s, peak RSS %M KB" "$BIN" train "$WORK/config.json" --device "$device" \
      --output "$WORK/$device" --max-steps 6 -q 2>&1 | tail -n 3
    cp "$WORK/$device/metrics.jsonl" "$OUT/metrics-$device.jsonl"
  done
  kept train.txt python3 - "$OUT/metrics-cpu.jsonl" "$OUT/metrics-cuda.jsonl" <<'PY'
import json, sys
cpu, gpu = ([json.loads(l) for l in open(p)] for p in sys.argv[1:])
worst = 0.0
for a, b in zip(cpu, gpu):
    for key in ("loss", "eval_loss"):
        if key in a:
            rel = abs(a[key] - b[key]) / abs(a[key])
            worst = max(worst, rel)
            print(f"step {a['step']:>2} {key:9} cpu {a[key]:.7f} cuda {b[key]:.7f} rel {rel:.2e}")
assert len(cpu) == len(gpu), (len(cpu), len(gpu))
print(f"largest relative difference {worst:.2e}")
sys.exit(0 if worst <= 1e-4 else 1)
PY
}

bench() {
  kept "bench-$1.txt" python3 tools/cuda/bench_gpu.py --florence "$BIN" --sizes "$1" --out "$OUT/bench-$1.md"
}

[ $# -gt 0 ] || set -- parity
status=0
for part in "$@"; do
  echo "== $part"
  case $part in
    parity) parity || status=1 ;;
    train) train || status=1 ;;
    bench-base) bench base || status=1 ;;
    bench-large) bench large || status=1 ;;
    *) echo "unknown part $part (parity, train, bench-base, bench-large)"; exit 2 ;;
  esac
done
exit $status
