"""Test ROUGE and source use of every run of the SAMSum study, through each run's export (DIR/runs/ARM/seedN/hf_model).

    PYTHONPATH=. python results/summarization_samsum_study/collect.py STUDY_DIR > results/summarization_samsum_study/test.json

Per run: ROUGE-1/2/L/Lsum on the whole test split (819 dialogues) with the run's own decoding settings (the
`summarize` tool's code path: tasks._seq2seq.generate_lines), and the mean NLL per summary token of 100 validation
references given their own dialogue vs given another one (results/summarization_samsum/source_use.py: a model that
ignores its input scores both the same).  Then mean +- std over seeds per arm and each arm minus the baseline, paired
by seed.  Runs that have not finished (no export yet) are left out; each run's scores are kept in its directory
(collect.json) so that calling this again while a study is running scores only the runs finished since.
"""
import json
import os
import statistics
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DATA = os.path.join(ROOT, "..", "shared", "data", "samsum")


def test_rouge(model_dir):
    from tasks import _seq2seq, _text
    from tasks import summarization as sm
    bundle = _seq2seq.load_bundle(sm.Summarization, model_dir)
    m = bundle.settings
    table = _text.read_table(os.path.join(DATA, "samsum-test.csv.gz"), ["dialogue", "summary"])
    hyps = _seq2seq.generate_lines(bundle, table["dialogue"], m["beam"], m["lenpen"], m["max_len_a"], m["max_len_b"],
                                   32, m["min_len"], m["no_repeat_ngram_size"])
    out = {k: round(v, 2) for k, v in sm.rouge_scores(hyps, table["summary"]).items()}
    out["dialogues"] = len(hyps)
    out["distinct_summaries"] = len(set(hyps))
    return out


def source_use(model_dir):
    script = os.path.join(ROOT, "results", "summarization_samsum", "source_use.py")
    r = subprocess.run([sys.executable, script, model_dir, DATA, "100"], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONPATH": ROOT})
    return json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])


def main():
    study = sys.argv[1]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    runs = {}
    for arm in sorted(os.listdir(os.path.join(study, "runs"))):
        for seed in sorted(os.listdir(os.path.join(study, "runs", arm))):
            model_dir = os.path.join(study, "runs", arm, seed, "hf_model")
            if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
                continue                                  # not finished: its export is written at the end
            cache = os.path.join(study, "runs", arm, seed, "collect.json")
            if os.path.isfile(cache) and os.path.getmtime(cache) > os.path.getmtime(
                    os.path.join(model_dir, "model.safetensors")):
                with open(cache) as f:
                    runs[f"{arm}/{seed}"] = json.load(f)  # scored by an earlier call, export unchanged since
            else:
                runs[f"{arm}/{seed}"] = {"test": test_rouge(model_dir), "source_use_nll": source_use(model_dir)}
                with open(cache, "w") as f:
                    json.dump(runs[f"{arm}/{seed}"], f)
            print(f"[collect] {arm}/{seed}: {json.dumps(runs[f'{arm}/{seed}'])}", file=sys.stderr, flush=True)
    summary = {}
    for arm in sorted({k.split("/")[0] for k in runs}):
        mine = [v for k, v in runs.items() if k.startswith(arm + "/")]
        summary[arm] = {k: f"{statistics.mean(r['test'][k] for r in mine):.2f} +- "
                           f"{statistics.stdev(r['test'][k] for r in mine) if len(mine) > 1 else 0.0:.2f}"
                        for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
        summary[arm]["seeds"] = len(mine)
    diffs = {}                                            # R-Drop minus baseline, paired by seed
    for arm in summary:
        if arm == "none":
            continue
        seeds = sorted(k.split("/")[1] for k in runs if k.startswith(arm + "/") and f"none/{k.split('/')[1]}" in runs)
        diffs[arm] = {k: [round(runs[f"{arm}/{s}"]["test"][k] - runs[f"none/{s}"]["test"][k], 2) for s in seeds]
                      for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
        diffs[arm]["seeds"] = seeds
    print(json.dumps({"runs": runs, "mean_std_over_seeds": summary, "minus_none_per_seed": diffs}, indent=2))


if __name__ == "__main__":
    main()
