#!/bin/sh
# The GPU checks, as one run of the `device` tool (under 10 minutes). Prepare here first:
#
#   CUDA_COMPUTE_CAP=90 sh tools/cuda/build.sh                 # H100/H200
#   mkdir -p .device && echo /.device/ >> .git/info/exclude
#   strip -o .device/florence "${CARGO_TARGET_DIR:-target}/release/florence"
#   cp ../shared/testdata/tokenizer-florence/tokenizer.json .device/
#
# then `run` with command `sh tools/cuda/check.sh` and carry [".device"]. It fine-tunes the
# training fixtures' tiny model for 6 steps on the CPU and on the GPU, in f32, with the same config,
# and fails unless every step's loss agrees within 1e-4 (relative); it writes both metrics files
# and the GPU's name to $OUT.
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
nvidia-smi -L | tee "$OUT/gpu.txt"
ldd "$BIN" | grep -E "cuda|cublas|curand|nvrtc" | tee -a "$OUT/gpu.txt"

WORK=$(mktemp -d)
FIXTURES=crates/florence-train/tests/fixtures/train
mkdir -p "$WORK/model" && cp "$FIXTURES"/model/* "$WORK/model/" && cp .device/tokenizer.json "$WORK/model/"
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
python3 - "$OUT/metrics-cpu.jsonl" "$OUT/metrics-cuda.jsonl" <<'PY'
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
