#!/usr/bin/env bash
# Real fine-tuning runs of the GLUE task (not a test): the offline pretrained all-MiniLM-L6-v2 on MRPC and STS-B
# from ../shared/data/glue, baseline (--rdrop.mode none) vs R-Drop (alpha 1.0, Table 1), same seed, same steps,
# same batches.  Sized for a 2-core CPU machine: 1 rank, batch BATCH (8), max_length 128, STEPS optimizer steps,
# lr 1e-4 (MiniLM is small and the run is very short; the paper's 1e-5 is for thousands of BERT-base updates),
# one torch thread (faster than two on a loaded 2-core machine),
# 10% warmup then linear decay, Adam (0.9, 0.98) eps 1e-6, weight decay 0.01 off biases/LayerNorm, clip 1.0.
# Usage (project venv active, or PYTHON=.venv/bin/python): bash benchmarks/glue_minilm.sh [OUT_ROOT]   (env: STEPS=150 BATCH=8 LR=1e-4 SEED=1 TASKS="mrpc stsb" MODES="none rdrop")
# MODES may include "duplicate" (doubled batch, no consistency term: the control of appendix C.2).
# The closing-note numbers: bash benchmarks/glue_minilm.sh /tmp/glue_minilm (seed 1) and SEED=2 ... /tmp/glue_minilm_seed2,
# plus MODES=duplicate TASKS=stsb for both seeds.
# Results: OUT_ROOT/<task>_<mode>/metrics.jsonl (last "eval" record = dev metrics) and OUT_ROOT/summary.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_ROOT=${1:-/tmp/glue_minilm}
STEPS=${STEPS:-150}
BATCH=${BATCH:-8}
SEED=${SEED:-1}
LR=${LR:-1e-4}
TASKS=${TASKS:-"mrpc stsb"}
MODES=${MODES:-"none rdrop"}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT_ROOT"
declare -A DIRS=([mrpc]=MRPC [stsb]=STS-B [rte]=RTE [cola]=CoLA [sst2]=SST-2)
for task in $TASKS; do
  for mode in $MODES; do
    out="$OUT_ROOT/${task}_${mode}"
    rm -rf "$out"
    cmd=("${PYTHON:-python}" -m engine.train --task glue --output_dir "$out" --ds_config ds_configs/zero2.json --seed "$SEED"
         --task.name "$task" --task.data_dir "../shared/data/glue/${DIRS[$task]}" --task.model minilm
         --task.max_length 128 --task.dropout 0.1 --task.write_predictions false
         --train.max_steps "$STEPS" --train.micro_batch_size "$BATCH"
         --optim.impl torch --optim.lr "$LR" --dist.omp_threads 1 --optim.warmup_steps $((STEPS / 10)) --optim.clip_grad 1.0
         --rdrop.mode "$mode" --rdrop.alpha 1.0
         --eval.batch_size 128 --log.every_steps 10 --log.progress false
         --checkpoint.save_best false --checkpoint.export_hf false)
    echo "[glue_minilm] ${cmd[*]}"
    start=$(date +%s)
    nice -n 10 "${cmd[@]}" > "$out.log" 2>&1
    secs=$(( $(date +%s) - start ))
    rm -rf "$out/checkpoints"          # ~0.7 GB of ZeRO state per run; the metrics are what we keep
    eval_line=$(grep '"kind": "eval"' "$out/metrics.jsonl" | tail -1)
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$task" "$mode" "$STEPS" "$BATCH" "$secs" "$eval_line" | tee -a "$OUT_ROOT/summary.tsv"
  done
done
