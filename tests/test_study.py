"""engine.study: a tiny spec run for real over three sittings (one run, an interrupted sitting, the rest), then
reported; the report's statistics on hand-made run directories; spec errors."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import time

import pytest

from engine import study
from tests.helpers import PY, ROOT, env, metrics

TINY_SPEC = {
    "name": "tiny", "task": "image_classification", "ds_config": "ds_configs/zero2.json", "nproc": 1,
    "flags": {"task.model": "tiny", "optim.impl": "torch", "train.max_steps": 60, "train.micro_batch_size": 8,
              "eval.every_steps": 20, "eval.batch_size": 90, "task.max_eval_examples": 90, "log.every_steps": 1,
              "checkpoint.every_steps": 10, "checkpoint.save_best": False, "log.tensorboard": False},
    "arms": {"none": {"rdrop.mode": "none"}},
    "sweep": {"flag": "rdrop.alpha", "values": [1.0], "flags": {"rdrop.mode": "rdrop"}},
    "baseline": "none", "seeds": [1, 2],
}


def _study(args, **kw):
    return subprocess.run([PY, "-m", "engine.study", *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=kw.get("timeout", 600))


def _states(d):
    return {p.parent.relative_to(d / "runs").as_posix(): json.loads(p.read_text())["state"]
            for p in sorted((d / "runs").rglob(study.STATE_FILE))}


def _has_train_record(run_dir) -> bool:
    try:
        return bool(metrics(run_dir))
    except (OSError, ValueError):           # not there yet, or a line being written
        return False


def test_study_runs_resumes_after_an_interrupt_and_reports(tmp_path):
    spec_path, d = tmp_path / "spec.json", tmp_path / "study"
    spec_path.write_text(json.dumps(TINY_SPEC))
    # sitting 1: one run only
    p = _study(["run", str(spec_path), "--dir", str(d), "--max_runs", "1"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "4 runs" in p.stdout and "done none/seed1" in p.stdout
    assert _states(d) == {"none/seed1": "done"}
    assert not (d / "runs" / "none" / "seed1" / "checkpoints").exists()       # deleted once done
    first_log = (d / "runs" / "none" / "seed1" / "train.log").read_text()

    # sitting 2: interrupted (SIGTERM to the study) as soon as a running run has logged its first step; the run
    # saves the step it is in (engine/preempt.py), so no periodic checkpoint is needed. Waiting for the step-10
    # checkpoint instead raced the run's last 50 steps on a quiet machine (the run could finish first).
    proc = subprocess.Popen([PY, "-m", "engine.study", "run", str(spec_path), "--dir", str(d), "--parallel", "2",
                             "--progress_s", "0"], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    target = d / "runs" / "alpha=1.0" / "seed1"
    deadline = time.time() + 300
    while time.time() < deadline and not _has_train_record(target):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted alpha=1.0/seed1" in out
    states = _states(d)
    assert states["none/seed1"] == "done" and states["alpha=1.0/seed1"] == "interrupted", states
    stopped_at = metrics(target)[-1]["step"]
    assert 1 <= stopped_at < 60

    # sitting 3: the rest; the finished run is skipped, the interrupted ones continue from their checkpoints
    p = _study(["run", str(spec_path), "--dir", str(d), "--parallel", "2"])
    assert p.returncode == 0, p.stdout + p.stderr
    n_done = sum(v == "done" for v in states.values())      # none/seed2 may have finished in sitting 2 under load
    assert f"{n_done} done" in p.stdout and "resuming after step" in p.stdout
    assert set(_states(d).values()) == {"done"} and len(_states(d)) == 4
    assert (d / "runs" / "none" / "seed1" / "train.log").read_text() == first_log
    assert "resumed from" in (target / "train.log").read_text()
    for run_dir in (d / "runs").glob("*/seed*"):
        assert [r["step"] for r in metrics(run_dir)] == list(range(1, 61)), run_dir       # nothing lost or doubled
        ev = metrics(run_dir, "eval")
        assert [r["step"] for r in ev] == [20, 40, 60] and all(r["train_s"] > 0 for r in ev)
        assert ev[0]["train_s"] < ev[1]["train_s"] < ev[2]["train_s"]                     # summed over sittings
    st = json.loads((target / study.STATE_FILE).read_text())
    assert len(st["sessions"]) == 2 and st["sessions"][0]["rc"] != 0 and st["sessions"][1]["rc"] == 0

    p = _study(["status", str(d)])
    assert p.returncode == 0 and "4 done" in p.stdout
    # a changed flag for runs that already exist is refused with one line
    spec_path.write_text(json.dumps({**TINY_SPEC, "flags": {**TINY_SPEC["flags"], "train.max_steps": 70}}))
    p = _study(["run", str(spec_path), "--dir", str(d)])
    assert p.returncode == 2 and "started with other flags" in p.stderr and "\n" not in p.stderr.strip()

    assert study.main(["report", str(d), "--out", str(tmp_path / "rep")]) == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "runs finished: **4 of 4**" in report and "| `alpha=1.0` | 2 |" in report
    assert "Δ vs none" in report and "accuracy" in report
    for png in ("curves.png", "loss.png", "final.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000


def _fake_run(d, arm, seed, finals, train_s, metric="accuracy", total=100, split=None):
    run_dir = d / "runs" / arm / f"seed{seed}"
    run_dir.mkdir(parents=True)
    cfg = {"total_steps": total, **({"eval": {"split": split}} if split else {})}
    (run_dir / "config.json").write_text(json.dumps(cfg))
    recs = [{"kind": "train", "step": s, "loss": 1.0, "nll": 0.5 - s / 1000, "consistency": 0.0}
            for s in range(10, total + 1, 10)]
    recs += [{"kind": "eval", "step": total * (i + 1) // len(finals), metric: v, "loss": 0.8,
              "train_s": train_s * (i + 1) / len(finals)} for i, v in enumerate(finals)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    study.write_state(run_dir, {"state": "done", "metric": metric, "metric_mode": "max", "sessions": [],
                                "wall_s": train_s})


def test_report_numbers_on_hand_made_runs(tmp_path):
    """mean ± std over seeds, the paired difference and its t-interval, best-of-evals, time ratio, the gap."""
    spec = {"name": "fake", "task": "image_classification", "ds_config": "ds_configs/zero2.json",
            "arms": {"none": {"rdrop.mode": "none"}, "rdrop": {"rdrop.mode": "rdrop"}}, "baseline": "none",
            "seeds": [1, 2, 3],
            "sweep": {"flag": "rdrop.alpha", "values": [1.0, 3.0], "flags": {"rdrop.mode": "rdrop"}, "seeds": [1, 2]}}
    d = tmp_path / "s"
    d.mkdir()
    (d / "spec.json").write_text(json.dumps(spec))
    base, arm = [0.90, 0.92, 0.94], [0.93, 0.94, 0.98]
    for s, b, a in zip((1, 2, 3), base, arm):
        _fake_run(d, "none", s, [0.5, 0.95, b], 100.0)
        _fake_run(d, "rdrop", s, [0.4, a - 0.01, a], 170.0)
        if s < 3:
            _fake_run(d, "alpha=1.0", s, [a + 0.01], 170.0)
            _fake_run(d, "alpha=3.0", s, [a - 0.02], 170.0)
    assert study.main(["report", str(d)]) == 0
    text = (d / "report.md").read_text()
    diffs = [3.0, 2.0, 4.0]                                   # points (x100), paired by seed
    m, sd = 3.0, 1.0
    h = 4.302652729911275 * sd / math.sqrt(3)                 # t(0.975, 2) * sd / sqrt(n)
    assert f"**{m:+.2f} [{m - h:+.2f}, {m + h:+.2f}]**" in text
    assert study.mean_std(diffs) == pytest.approx((m, sd))
    assert "| `none` | 3 | 92.00 ± 2.00 | — | 95.00 ± 0.00 |" in text     # best of each run's evals: 0.95
    assert "| `rdrop` | 3 |" in text and "1.70x" in text
    assert "0.400 | 0.800 | 0.400 |" in text                  # train NLL over the last 10% (step 100), gap
    assert "| train NLL | validation loss | gap |" in text     # runs that name no eval split: validation
    # the sweep's arms run on seeds 1-2 only: paired with the baseline's seeds 1-2 (diffs 4 and 3 points)
    h2 = 12.706204736174707 * math.sqrt(0.5) / math.sqrt(2)
    assert f"| `alpha=1.0` | 2 | 94.50 ± 0.71 | **+3.50 [{3.5 - h2:+.2f}, {3.5 + h2:+.2f}]" not in text  # CI crosses 0
    assert f"| `alpha=1.0` | 2 | 94.50 ± 0.71 | +3.50 [{3.5 - h2:+.2f}, {3.5 + h2:+.2f}] |" in text
    assert (d / "sweep.png").stat().st_size > 1000 and "sweep.png" in text
    # unpaired when the seeds differ: Welch
    d_, lo, hi, how = study.diff_ci({1: 1.0, 2: 2.0}, {3: 0.0, 4: 0.5, 5: 1.0})
    assert how == "welch" and d_ == pytest.approx(1.0) and lo < 1.0 < hi


def test_report_names_the_split_the_runs_evaluated(tmp_path):
    """A study evaluated on test says so in its table and plots (read from each run's config.json); a mix of
    splits, or validation aliases, reads "validation"."""
    spec = {"name": "fake", "task": "image_classification", "ds_config": "ds_configs/zero2.json",
            "arms": {"none": {"rdrop.mode": "none"}, "rdrop": {"rdrop.mode": "rdrop"}}, "baseline": "none",
            "seeds": [1]}
    d = tmp_path / "s"
    d.mkdir()
    (d / "spec.json").write_text(json.dumps(spec))
    _fake_run(d, "none", 1, [0.9], 100.0, split="test")
    _fake_run(d, "rdrop", 1, [0.92], 170.0, split="test")
    assert study.main(["report", str(d)]) == 0
    text = (d / "report.md").read_text()
    assert "on the eval split (test)" in text and "| train NLL | test loss | gap |" in text
    runs = lambda *splits: {"a": [{"split": sp} for sp in splits]}   # noqa: E731
    assert study.split_label(runs("test", "test")) == "test"
    assert study.split_label(runs("test", "validation")) == "validation"
    assert study.split_label(runs("valid")) == study.split_label(runs(None)) == "validation"
    assert study.split_label(runs("dev")) == "validation"


@pytest.mark.parametrize("change, expect", [
    ({"bogus": 1}, "unknown spec key 'bogus'"),
    ({"baseline": "nope"}, "baseline 'nope' is not an arm"),
    ({"arms": {"none": {"seed": 3}}}, "which the study sets itself"),
    ({"arms": {"none": {"optim.lrr": 1e-3}}}, "run none/seed1: unknown option --optim.lrr; did you mean --optim.lr?"),
    ({"seeds": [1, 1]}, "distinct integers"),
])
def test_spec_errors_are_one_line_exit_2(tmp_path, capsys, change, expect):
    spec = {"name": "bad", "task": "image_classification", "ds_config": "ds_configs/zero2.json",
            "arms": {"none": {"rdrop.mode": "none"}}, "baseline": "none", "seeds": [1], **change}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert study.main(["run", str(path), "--dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and "\n" not in err
    assert not (tmp_path / "d" / "runs").exists()
