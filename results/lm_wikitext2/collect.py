"""metrics.json of the WikiText-2 comparison from the two runs (RUNS/{baseline,rdrop}: metrics.jsonl, config.json,
the launcher log) and evaluate_export.py's output for each (RUNS/ARM.export_eval.json).

    python results/lm_wikitext2/collect.py RUNS > results/lm_wikitext2/metrics.json
"""
import json
import os
import statistics
import sys
from datetime import datetime


def arm(root, name):
    recs = [json.loads(line) for line in open(os.path.join(root, name, "metrics.jsonl"))]
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    cfg = json.load(open(os.path.join(root, name, "config.json")))
    tokens = cfg["train"]["max_tokens"] * cfg["world_size"] * cfg["train"]["grad_accum"]     # target tokens a step
    s_step = [tokens / r["units_per_sec"] for r in train]       # each record: its log interval's mean s/step
    last = [r for r in train if r["step"] > train[-1]["step"] - 200]
    stamps = [line.split()[-1] for line in open(os.path.join(root, f"{name}.log")) if line.startswith("[run_arm]")]
    wall = (datetime.fromisoformat(stamps[-1]) - datetime.fromisoformat(stamps[0])).total_seconds()
    out = {
        "rdrop": cfg["rdrop"], "steps": train[-1]["step"], "tokens_per_step": tokens, "seed": cfg["seed"],
        "s_per_step": {"mean": round(statistics.mean(s_step), 3), "median": round(statistics.median(s_step), 3),
                       "first_half_mean": round(statistics.mean(s_step[:len(s_step) // 2]), 3),
                       "second_half_mean": round(statistics.mean(s_step[len(s_step) // 2:]), 3)},
        "wall_seconds_incl_evaluation": round(wall),
        "train_last_200_steps": {"nll_per_token": statistics.mean(r["nll"] for r in last),
                                 "consistency_per_token": statistics.mean(r["consistency"] for r in last)},
        "evaluations": [{k: r[k] for k in r if k != "kind"} for r in evals],
        "final": {k: v for k, v in evals[-1].items() if k != "kind"},
        "command": cfg["run_command"]["command"], "launcher": cfg["run_command"]["launcher"],
        "world_size": cfg["world_size"], "resumed_with": cfg.get("resumed_with", []),
    }
    path = os.path.join(root, f"{name}.export_eval.json")
    if os.path.isfile(path):
        ev = json.load(open(path))
        out["export_check"] = {"engine_test_ppl": evals[-1]["test_ppl"], "auto_classes_test_ppl": ev["test"]["ppl"],
                               "relative_difference": abs(ev["test"]["ppl"] / evals[-1]["test_ppl"] - 1),
                               "auto_classes_valid_ppl": ev["valid"]["ppl"]}
        out["gap"] = {"train_seen_ppl": ev["train_seen"]["ppl"], "train_unseen_ppl": ev["train_unseen"]["ppl"],
                      "valid_ppl": evals[-1]["ppl"], "valid_minus_train_seen_ppl": evals[-1]["ppl"] -
                      ev["train_seen"]["ppl"], "blocks": ev["train_seen"]["blocks"],
                      "seen_pool_blocks": ev["train_seen"]["pool"], "unseen_pool_blocks": ev["train_unseen"]["pool"]}
    return out


if __name__ == "__main__":
    root = sys.argv[1]
    text = json.dumps({name: arm(root, name) for name in ("baseline", "rdrop")}, indent=2)
    print(text.replace(os.path.abspath(root), "RUNS").replace(root.rstrip("/"), "RUNS"))
