#!/usr/bin/env bash
# WikiText-2, recipe wikitext2_small (GPT 'small' preset, fused loss, 512 target tokens per step), baseline vs R-Drop
# (alpha 1.0) at the same number of steps, seed 1. Both arms run side by side (one process each, 1 rank x 1 thread,
# accumulation 2 = the recipe's 2 ranks x 256 tokens: the same batches and weights, tested in test_engine_runs) so
# that their speeds are measured under the same load. Resumable: rerun the same command (--resume auto).
# Usage (repo root, venv active): bash results/lm_wikitext2/run.sh RUNS [STEPS]
set -euo pipefail
RUNS=${1:?RUNS dir}; STEPS=${2:-4000}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
mkdir -p "$RUNS"
for ARM in baseline rdrop; do
  MODE=$([ $ARM = baseline ] && echo none || echo rdrop)
  ( echo "[run_arm] start $(date -Iseconds)"
    python -m engine.train --task language_modeling --recipe wikitext2_small --output_dir "$RUNS/$ARM" \
      --ds_config ds_configs/zero2.json --optim.impl torch --train.grad_accum 2 --train.max_steps "$STEPS" \
      --task.cache_dir "$RUNS/lm_data" --rdrop.mode $MODE --seed 1 --dist.omp_threads 1 --log.progress false \
      --resume auto
    echo "[run_arm] end $(date -Iseconds)" ) >> "$RUNS/$ARM.log" 2>&1 &
  [ $ARM = baseline ] && sleep 90      # rank 0 of the first arm builds the shared vocabulary cache first
done
wait
