#!/bin/sh
# The README's example report: fine-tunes the training fixtures' tiny random-weight model for a
# few steps, evaluates the base model against the run's final model on the held-out images, and
# opens the HTML report in headless Chromium for a checked screenshot.
#
#   sh tools/eval/example.sh [WORK_DIR]      (needs chromium and node: see screenshot.mjs)
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${1:-/tmp/florence-eval-example}
FIXTURES="$ROOT/crates/florence-train/tests/fixtures/train"
rm -rf "$WORK" && mkdir -p "$WORK/model"
cp "$FIXTURES"/model/* "$WORK/model/"
cp "$ROOT/../shared/testdata/tokenizer-florence/tokenizer.json" "$WORK/model/"
cat > "$WORK/config.yaml" <<YAML
model_name: model
task_prompt: <CAPTION>
dataset_path: $FIXTURES/data
epochs: 20
optimizer: CAME
learning_rate: 3e-4
lr_scheduler: REX
train_batch_size: 2
eval_steps: 10
save_steps: 100
eval_split: 3
YAML
cargo build --release -q -p florence-cli
FLORENCE="${CARGO_TARGET_DIR:-$ROOT/target}/release/florence"
"$FLORENCE" train "$WORK/config.yaml" --output "$WORK/run" -q
"$FLORENCE" eval --references "$WORK/run/eval_image_paths.jsonl" \
    --model base="$WORK/model" --model tuned="$WORK/run/final" --metrics-from "$WORK/run" \
    --num-beams 1 --max-new-tokens 24 --output "$WORK/report"
[ -d "$ROOT/tools/eval/node_modules" ] || npm install --prefix "$ROOT/tools/eval" --silent
node "$ROOT/tools/eval/screenshot.mjs" "$WORK/report/report.html" "$WORK/report.png"
echo "screenshot: $WORK/report.png"
