#!/usr/bin/env bash
# SAMSum dialogue summarization, baseline vs R-Drop at the same number of steps, same model / seed / batches, on CPU.
# Usage: bash benchmarks/summarization_samsum.sh [OUT_DIR] [STEPS] [MODES] [EXTRA FLAGS...]
#   (from the repo root, venv active; MODES defaults to "none rdrop")
# Trains on train, evaluates ROUGE on validation during training (a fixed 200-dialogue subset) and on the whole
# validation split at the end, then summarizes the whole test split with the export.  Writes OUT_DIR/<mode>/ (runs),
# OUT_DIR/<mode>.test.hyp and one JSON line per mode in OUT_DIR/results.jsonl (wall time, valid and test ROUGE).
# Recipe samsum_small (bart_small: 3+3 layers, d 256, byte-level BPE 8k; 4,096 tokens per batch; lr 5e-4 with
# polynomial decay; label smoothing 0.1; alpha 0.7); EXTRA FLAGS override it (e.g. --task.model minilm2minilm).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/summarization_samsum}
STEPS=${2:-3000}
MODES=${3:-none rdrop}
shift $(( $# < 3 ? $# : 3 ))
DATA=../shared/data/samsum
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
for MODE in $MODES; do
  RUN="$OUT/$MODE"
  RESUME=()
  [ -d "$RUN/checkpoints" ] && RESUME=(--resume auto)
  START=$(date +%s.%N)
  python -m engine.train --task summarization --recipe samsum_small --output_dir "$RUN" \
    --ds_config ds_configs/zero2.json --task.data_dir "$DATA" --task.cache_dir "$OUT/bpe" \
    --train.max_steps "$STEPS" --seed 1 --rdrop.mode "$MODE" --log.progress false "${RESUME[@]}" "$@" \
    >> "$RUN.log" 2>&1
  END=$(date +%s.%N)
  python -m tasks.summarization summarize --model "$RUN/hf_model" --input "$DATA/samsum-test.csv.gz" \
    --column dialogue --reference_column summary --output "$OUT/$MODE.test.hyp" 2> "$OUT/$MODE.test.log"
  SCORE=$(grep '^{' "$OUT/$MODE.test.log" | tail -1)
  python - "$MODE" "$STEPS" "$START" "$END" "$SCORE" "$RUN/metrics.jsonl" >> "$OUT/results.jsonl" <<'PY'
import json, sys
mode, steps, start, end, score, metrics = sys.argv[1:]
evals = [json.loads(l) for l in open(metrics) if '"eval"' in l]
last = evals[-1]
print(json.dumps({"mode": mode, "steps": int(steps), "wall_s_this_sitting": round(float(end) - float(start), 1),
                  "valid": {k: round(last[k], 2) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum", "nll")},
                  "valid_examples": last["gen_examples"], "test": json.loads(score)}))
PY
  tail -1 "$OUT/results.jsonl"
done
