"""Test ROUGE and source use of every run of the SAMSum study, through each run's export (DIR/runs/ARM/seedN/hf_model).

    PYTHONPATH=. python results/summarization_samsum_study/collect.py STUDY_DIR > results/summarization_samsum_study/test.json

Per run: ROUGE-1/2/L/Lsum on the whole test split (819 dialogues) with the run's own decoding settings (the
`summarize` tool's code path: tasks._seq2seq.generate_lines), and the mean NLL per summary token of 100 validation
references given their own dialogue vs given another one (results/summarization_samsum/source_use.py: a model that
ignores its input scores both the same).  Then per arm the mean and std over seeds and the difference to the
spec's baseline with a 95% t-interval (engine.study's statistics, as in report.md: paired by seed when the seeds
match).  Runs that have not finished (no export yet) are left out; each run's scores are kept in its directory
(collect.json) so that calling this again while a study is running scores only the runs finished since.
"""
import importlib.util
import json
import math
import os
import sys

import torch

from engine import study as study_lib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DATA = os.path.join(ROOT, "..", "shared", "data", "samsum")
ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_spec = importlib.util.spec_from_file_location("source_use", os.path.join(ROOT, "results", "summarization_samsum",
                                                                          "source_use.py"))
source_use = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(source_use)


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


def main():
    study = sys.argv[1]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = study_lib.load_spec(os.path.join(study, "spec.json"))
    runs = {}                                             # arm -> seed -> scores
    for arm in sorted(os.listdir(os.path.join(study, "runs"))):
        for seed in sorted(os.listdir(os.path.join(study, "runs", arm))):
            run_dir = os.path.join(study, "runs", arm, seed)
            weights = os.path.join(run_dir, "hf_model", "model.safetensors")
            if not os.path.isfile(weights):
                continue                                  # not finished: its export is written at the end
            cache = os.path.join(run_dir, "collect.json")
            if os.path.isfile(cache) and os.path.getmtime(cache) > os.path.getmtime(weights):
                with open(cache) as f:
                    scores = json.load(f)                 # scored by an earlier call, export unchanged since
            else:
                model_dir = os.path.dirname(weights)
                scores = {"test": test_rouge(model_dir), "source_use_nll": source_use.source_use(model_dir, DATA, 100)}
                with open(cache, "w") as f:
                    json.dump(scores, f)
            runs.setdefault(arm, {})[int(seed.removeprefix("seed"))] = scores
            print(f"[collect] {arm}/{seed}: {json.dumps(scores)}", file=sys.stderr, flush=True)
    base = runs.get(spec.get("baseline", "none"), {})
    summary = {}
    for arm, seeds in runs.items():
        summary[arm] = {"seeds": sorted(seeds)}
        for k in ROUGE:
            m, sd = study_lib.mean_std([r["test"][k] for r in seeds.values()])
            summary[arm][k] = {"mean": _num(m), "std": _num(sd)}
            if seeds is not base and base:
                d, lo, hi, how = study_lib.diff_ci({s: r["test"][k] for s, r in seeds.items()},
                                                   {s: r["test"][k] for s, r in base.items()})
                summary[arm][k]["minus_baseline"] = {"diff": _num(d), "ci95": [_num(lo), _num(hi)], "how": how}
    print(json.dumps({"runs": {f"{a}/seed{s}": r for a, seeds in runs.items() for s, r in sorted(seeds.items())},
                      "per_arm": summary}, indent=2))


def _num(x: float):
    return None if math.isnan(x) else round(x, 2)         # JSON has no NaN (one seed: no std, no interval)


if __name__ == "__main__":
    main()
