"""metrics.json of the SAMSum comparison from RUNS (see command.txt): per arm the commands, training time (train_s:
training steps only, summed over resumes), every evaluation, the final validation ROUGE (all 818 dialogues, the
engine), the test ROUGE (all 819 dialogues, the export through `tasks.summarization summarize`: RUNS/ARM.test_export
.json) and the export check (the same tool on the validation split, RUNS/ARM.valid_export.json, against the engine).

    python results/summarization_samsum/collect.py RUNS > results/summarization_samsum/metrics.json
"""
import json
import os
import statistics
import sys


def arm(root, name):
    recs = [json.loads(line) for line in open(os.path.join(root, name, "metrics.jsonl"))]
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    cfg = json.load(open(os.path.join(root, name, "config.json")))
    tail = [r for r in train if r["step"] > 0.9 * train[-1]["step"]]
    out = {"rdrop": cfg["rdrop"], "seed": cfg["seed"], "steps": train[-1]["step"],
           "command": cfg["run_command"]["command"], "world_size": cfg["world_size"],
           "train_seconds": round(evals[-1].get("train_s", float("nan")), 1),
           "train_nll_per_token_last_10pct": statistics.mean(r["nll"] for r in tail),
           "evaluations": [{k: v for k, v in r.items() if k != "kind"} for r in evals],
           "final_valid": {k: v for k, v in evals[-1].items() if k != "kind"},
           "resumed_with": [r["command"] for r in cfg.get("resumed_with", [])],
           "test_export": json.load(open(os.path.join(root, f"{name}.test_export.json")))}
    su = os.path.join(root, f"{name}.source_use.json")          # source_use.py: NLL given own vs another dialogue
    if os.path.isfile(su):
        out["source_use_nll"] = json.load(open(su))
    path = os.path.join(root, f"{name}.valid_export.json")
    if os.path.isfile(path):
        ev = json.load(open(path))
        out["export_check_valid"] = {"engine": {k: round(evals[-1][k], 4) for k in ev if k in evals[-1]},
                                     "export": ev}
    return out


if __name__ == "__main__":
    root = sys.argv[1]
    text = json.dumps({m: arm(root, m) for m in ("none", "rdrop")}, indent=2)
    print(text.replace(os.path.abspath(root), "RUNS").replace(root.rstrip("/"), "RUNS"))
