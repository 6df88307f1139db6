#!/usr/bin/env bash
# Rebuild models/recall-qwen3 from scratch on CPU: the recall model
# (experiments/recall/train_recall_model.py, about 15-25 minutes on one core), a corpus of held-out
# contexts, then its KVzap surrogates (MLP and linear, training/train_surrogate.py with the model's
# own "<repeat>" turn; about 1 minute each).
# Every step is seeded; a step whose output exists is skipped (delete it to redo it).
#
#   bash experiments/recall/build_recall_model.sh [OUT_DIR]      # default: models/recall-qwen3
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-models/recall-qwen3}
RUN=.cache/recall_run
CORPUS=.cache/recall_corpus

if [ ! -f "$RUN/model/model.safetensors" ]; then
  "$PY" -m experiments.recall.train_recall_model --out "$RUN"
fi
mkdir -p "$OUT"
cp "$RUN"/model/* "$RUN"/run.json "$OUT"/

if [ ! -f "$CORPUS/context_00399.txt" ]; then
  "$PY" -m experiments.recall.recall_task --corpus "$CORPUS" --n 400
fi
for kind in mlp linear; do
  if [ ! -f "$OUT/kvzap-$kind/model.safetensors" ]; then
    "$PY" -m training.train_surrogate --model "$OUT" --data "$CORPUS" --kind "$kind" \
      --out "$OUT/kvzap-$kind" --targets "$RUN/surrogate-targets" \
      --repeat-format "<|endoftext|> {context} <repeat> {context}" \
      --min-tokens 100 --max-tokens 600 --tokens-per-prompt 200 \
      --prompts-per-subset 380 --test-per-subset 20
  fi
done
echo "built $OUT"
