#!/usr/bin/env bash
# Rebuild the surrogates bundled for SmolLM2-135M-Instruct (vllm_kvzap/surrogates/), offline:
# corpus (training/build_corpus.py) -> KVzip+ targets -> MLP and linear fits -> published format.
# About 25 min on 2 CPU cores (target extraction: ~6 s per prompt).
# Usage: bash training/train_smollm2_surrogates.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=.cache/SmolLM2-135M-Instruct
NAME=SmolLM2-135M-Instruct
$PY -m tools.smollm2
$PY -m training.build_corpus --out .cache/corpus
for kind in mlp linear; do
  $PY -m training.train_surrogate --model "$MODEL" \
      --data .cache/corpus/python-docs .cache/corpus/package-readmes .cache/corpus/licenses \
      --kind "$kind" --hidden-dim 72 --min-tokens 500 --max-tokens 800 \
      --prompts-per-subset 60 --tokens-per-prompt 200 \
      --out ".cache/train/KVzap-$kind-$NAME" --targets .cache/train/targets
  dest="vllm_kvzap/surrogates/KVzap-$kind-$NAME"
  mkdir -p "$dest"
  cp ".cache/train/KVzap-$kind-$NAME"/{config.json,model.safetensors,r2.json,r2.png} "$dest/"
done
echo "bundled: vllm_kvzap/surrogates/KVzap-{mlp,linear}-$NAME"
