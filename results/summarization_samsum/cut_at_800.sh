#!/usr/bin/env bash
# SAMSum: both arms stop at step 800 of their 1200-step schedule; each is then evaluated (all validation
# dialogues) and exported from its step-800 checkpoint, and the export summarizes the test split.
ARM=$1; RUNS=${2:?RUNS};  DATA=../shared/data/samsum
cd "$(dirname "$0")/../.."; export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
COMMON="--task summarization --recipe samsum_small --output_dir $RUNS/$ARM --ds_config ds_configs/zero2.json --task.data_dir $DATA --task.cache_dir $RUNS/bpe --seed 1 --rdrop.mode $ARM --log.progress false --optim.impl torch --optim.lr 7e-4 --optim.warmup_steps 150 --eval.every_steps 400 --checkpoint.every_steps 400 --resume auto"
if [ $ARM = rdrop ]; then
  until [ "$(cat $RUNS/$ARM/checkpoints/latest 2>/dev/null)" = "global_step400" ]; do sleep 3; done
  sleep 2; pkill -9 -f "summarization_samsum.sh $RUNS 1200 rdrop"; pkill -9 -f "output_dir $RUNS/$ARM --ds_config"; sleep 3
  echo "[sum_cut] 2 threads from step 400, stop at 800 $(date -Iseconds)" >> $RUNS/$ARM.log
  python -m engine.train $COMMON --train.max_steps 1200 --train.stop_at_step 800 --dist.omp_threads 2 >> $RUNS/$ARM.log 2>&1
else
  until [ "$(cat $RUNS/$ARM/checkpoints/latest 2>/dev/null)" = "global_step800" ]; do sleep 3; done
  sleep 2; pkill -9 -f "summarization_samsum.sh $RUNS 1200 none"; pkill -9 -f "output_dir $RUNS/$ARM --ds_config"; sleep 3
fi
echo "[sum_cut] final evaluation and export of step 800 $(date -Iseconds)" >> $RUNS/$ARM.log
python -m engine.train $COMMON --train.max_steps 800 --dist.omp_threads 2 >> $RUNS/$ARM.log 2>&1
python -m tasks.summarization summarize --model "$RUNS/$ARM/hf_model" --input "$DATA/samsum-test.csv.gz" \
    --column dialogue --reference_column summary --output "$RUNS/$ARM.test.hyp" 2> "$RUNS/$ARM.test.log"
python -m tasks.summarization summarize --model "$RUNS/$ARM/hf_model" --input "$DATA/samsum-validation.csv.gz" \
    --column dialogue --reference_column summary --output "$RUNS/$ARM.valid.hyp" 2> "$RUNS/$ARM.valid.log"
grep '^{' "$RUNS/$ARM.test.log" | tail -1 > "$RUNS/$ARM.test_export.json"
grep '^{' "$RUNS/$ARM.valid.log" | tail -1 > "$RUNS/$ARM.valid_export.json"
echo "[sum_cut] done $(date -Iseconds)" >> $RUNS/$ARM.log
