"""Studies: compare R-Drop modes or alphas over seeds, as ordinary ``engine.train`` runs, and report the result.

    python -m engine.study run SPEC.json --dir DIR [--parallel N] [--cores C] [--max_runs K] [--dry_run]
    python -m engine.study status DIR
    python -m engine.study report DIR [--out OUT]

A spec (JSON) names a task, common flags, optional groups (e.g. one per GLUE task), the arms to compare (each a
few flags, e.g. ``{"rdrop.mode": "none"}``, or an alpha sweep), the baseline arm and the seeds::

    {"name": "digits_vit", "task": "image_classification", "ds_config": "ds_configs/zero2.json", "nproc": 1,
     "flags": {"train.max_epochs": 30, "eval.every_steps": 66},
     "arms": {"none": {"rdrop.mode": "none"}, "rdrop": {"rdrop.mode": "rdrop"}},
     "sweep": {"flag": "rdrop.alpha", "values": [0.3, 3.0], "flags": {"rdrop.mode": "rdrop"}},
     "baseline": "none", "seeds": [1, 2, 3]}

Every (group, arm, seed) becomes one run directory ``DIR/runs/[GROUP/]ARM/seedN`` trained by
``python -m engine.train --task T --ds_config C [flags: spec < group < arm] --output_dir RUN --seed N --resume auto``
(``nproc`` > 1: through the ``deepspeed`` launcher).  Relative paths in a spec are relative to the repository root,
where runs start.  Runs go seed by seed, so a study cut short still has every arm at the same seeds.  ``--parallel N``
runs N at once with OMP_NUM_THREADS = cores / (N x nproc) each.

Sittings: ``run`` skips finished runs and continues interrupted ones with ``--resume auto`` (from their last
checkpoint: set ``checkpoint.every_steps``), so a study can span several sittings; Ctrl-C or SIGTERM stops the
running trainings and marks them interrupted.  A run whose flags changed since it started is refused (choose a new
``--dir``, or delete that run's directory).  Each run keeps ``study_run.json`` (command, state, sessions, wall time)
and ``train.log``; checkpoints are deleted once a run is done unless ``"keep_checkpoints": true``.

``report`` reads every run's metrics.jsonl and writes ``report.md`` and PNG plots: final metric mean +- std over
seeds per arm, the difference to the baseline with a 95% t-interval (paired by seed: the same seed gives the same
initial weights and data order in every arm), the validation metric against steps and against training time
(``train_s`` of the eval records) with seed bands, and train vs validation loss per arm.

Spec keys: name, description, task, ds_config, nproc (ranks per run, default 1), flags, groups ({name: flags}),
arms ({name: flags}), sweep ({"flag", "values", "flags", "seeds", "prefix"}: one arm per value, named
PREFIX=VALUE, on its own seeds if given), baseline, seeds, metric (default: the task's), keep_checkpoints.
"""
from __future__ import annotations

import argparse
import datetime
import difflib
import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC_KEYS = {"name", "description", "task", "ds_config", "nproc", "flags", "groups", "arms", "sweep", "baseline",
             "seeds", "metric", "keep_checkpoints"}
RESERVED = {"output_dir", "seed", "resume", "task", "ds_config"}      # the study sets these itself
NAME_RE = re.compile(r"^[A-Za-z0-9_.=+-]+$")
STATE_FILE = "study_run.json"


class StudyError(ValueError):
    """Bad spec or study directory: one line that names the fix."""


# ---------------------------------------------------------------------------------------------- the spec

@dataclass
class Run:
    group: str
    arm: str
    seed: int
    dir: Path
    argv: list[str]

    @property
    def key(self) -> str:
        return "/".join(p for p in (self.group, self.arm, f"seed{self.seed}") if p)


@dataclass
class Study:
    spec: dict
    dir: Path
    runs: list[Run] = field(default_factory=list)

    @property
    def groups(self) -> list[str]:
        return list(self.spec.get("groups") or {"": {}})

    @property
    def arms(self) -> dict[str, dict]:
        return arms_of(self.spec)

    @property
    def baseline(self) -> str:
        return self.spec["baseline"]


def _flag_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _flags(d: dict, where: str) -> dict:
    if not isinstance(d, dict):
        raise StudyError(f"{where} must be an object of flags like {{\"rdrop.mode\": \"none\"}}")
    for k in d:
        if k.lstrip("-") in RESERVED:
            raise StudyError(f"{where} sets {k!r}, which the study sets itself: use the spec's top-level "
                             "\"task\" / \"ds_config\" / \"seeds\", or remove it")
    return {k.lstrip("-"): v for k, v in d.items()}


def arms_of(spec: dict) -> dict[str, dict]:
    """The arms in order: the explicit ones, then one per sweep value (named FLAG_LEAF=VALUE)."""
    arms = {name: _flags(flags, f"arm {name!r}") for name, flags in (spec.get("arms") or {}).items()}
    sweep = spec.get("sweep")
    if sweep:
        if not isinstance(sweep, dict) or "flag" not in sweep or not isinstance(sweep.get("values"), list) or \
                set(sweep) - {"flag", "values", "flags", "prefix", "seeds"}:
            raise StudyError('"sweep" must be {"flag": "rdrop.alpha", "values": [...], "flags": {...}} with optional '
                             '"seeds" (default: the spec\'s) and "prefix" (default: the flag\'s last part)')
        leaf = sweep.get("prefix") or sweep["flag"].split(".")[-1]
        for v in sweep["values"]:
            name = f"{leaf}={_flag_value(v)}"
            arms[name] = {**_flags(sweep.get("flags") or {}, '"sweep.flags"'), sweep["flag"]: v}
    return arms


def sweep_value(spec: dict, arm: str):
    """The swept value of ``arm`` (None when the arm is not part of the sweep)."""
    sweep = spec.get("sweep") or {}
    if not sweep:
        return None
    leaf = sweep.get("prefix") or sweep["flag"].split(".")[-1]
    for v in sweep.get("values", []):
        if arm == f"{leaf}={_flag_value(v)}":
            return v
    return None


def load_spec(path: str) -> dict:
    try:
        with open(path) as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise StudyError(f"spec {path} does not exist: pass a JSON file (see python -m engine.study --help)") from None
    except json.JSONDecodeError as e:
        raise StudyError(f"spec {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    check_spec(spec)
    return spec


def check_spec(spec: dict) -> None:
    if not isinstance(spec, dict):
        raise StudyError("a spec is a JSON object")
    for k in spec:
        if k not in SPEC_KEYS:
            close = difflib.get_close_matches(k, SPEC_KEYS, n=1)
            raise StudyError(f"unknown spec key {k!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                          f"; known keys: {', '.join(sorted(SPEC_KEYS))}"))
    for k in ("name", "task", "ds_config", "baseline", "seeds"):
        if not spec.get(k):
            raise StudyError(f"the spec needs {k!r}")
    if not NAME_RE.match(spec["name"]):
        raise StudyError(f"spec name {spec['name']!r}: use letters, digits and _.=+-")
    seeds = spec["seeds"]
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise StudyError(f'"seeds" must be a list of distinct integers, got {seeds!r}')
    sseeds = (spec.get("sweep") or {}).get("seeds", seeds) if isinstance(spec.get("sweep"), dict) else seeds
    if not isinstance(sseeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in sseeds) \
            or len(set(sseeds)) != len(sseeds):
        raise StudyError(f'"sweep.seeds" must be a list of distinct integers, got {sseeds!r}')
    nproc = spec.get("nproc", 1)
    if not isinstance(nproc, int) or nproc < 1:
        raise StudyError(f'"nproc" must be an integer >= 1, got {nproc!r}')
    _flags(spec.get("flags") or {}, '"flags"')
    for g, flags in (spec.get("groups") or {}).items():
        if not NAME_RE.match(g):
            raise StudyError(f"group name {g!r}: use letters, digits and _.=+-")
        _flags(flags, f"group {g!r}")
    arms = arms_of(spec)
    if not arms:
        raise StudyError('the spec needs "arms" (or a "sweep"): e.g. {"none": {"rdrop.mode": "none"}, '
                         '"rdrop": {"rdrop.mode": "rdrop"}}')
    for a in arms:
        if not NAME_RE.match(a):
            raise StudyError(f"arm name {a!r}: use letters, digits and _.=+-")
    if spec["baseline"] not in arms:
        raise StudyError(f"baseline {spec['baseline']!r} is not an arm: choose one of {', '.join(arms)}")


def build(spec: dict, study_dir: str, validate: bool = True) -> Study:
    """Expand the spec into runs (seed-major order) and, with ``validate``, parse every run's flags now, so a typo
    stops the study before anything runs."""
    study = Study(spec, Path(study_dir).resolve())
    groups = spec.get("groups") or {"": {}}
    arms = arms_of(spec)
    swept = {a for a in arms if sweep_value(spec, a) is not None}
    sweep_seeds = (spec.get("sweep") or {}).get("seeds") or spec["seeds"]
    for seed in list(dict.fromkeys(spec["seeds"] + sweep_seeds)):
        for g, gflags in groups.items():
            for a, aflags in arms.items():
                if seed not in (sweep_seeds if a in swept else spec["seeds"]):
                    continue
                d = study.dir / "runs" / g / a / f"seed{seed}" if g else study.dir / "runs" / a / f"seed{seed}"
                merged = {**_flags(spec.get("flags") or {}, '"flags"'), **_flags(gflags, f"group {g!r}"), **aflags}
                argv = ["--task", spec["task"], "--ds_config", spec["ds_config"]]
                for k, v in merged.items():           # top-level keys (recipe) first, as parse_args reads them
                    if "." not in k:
                        argv += [f"--{k}", _flag_value(v)]
                for k, v in merged.items():
                    if "." in k:
                        argv += [f"--{k}", _flag_value(v)]
                argv += ["--output_dir", str(d), "--seed", str(seed), "--resume", "auto", "--log.progress", "false"]
                study.runs.append(Run(g, a, seed, d, argv))
    if validate:
        for g in groups:
            run = next(r for r in study.runs if r.group == g)
            check_argv(run)
        for run in study.runs:
            check_argv(run, quick=True)
    return study


_checked: dict = {}


def check_argv(run: Run, quick: bool = False) -> dict:
    """Parse the run's command line as engine.train would (from the repository root).  Returns the metric name and
    mode of the run's task.  ``quick`` parses once per distinct set of flags."""
    from engine.config import ConfigError, parse_args
    key = tuple(a for a in run.argv if a != str(run.dir))
    if key in _checked:
        return _checked[key]
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        cfg = parse_args(run.argv)
        try:
            task = cfg.task_class(cfg, None)
            info = {"metric": task.metric, "metric_mode": task.metric_mode}
        except Exception:                              # a task whose constructor needs more than the config
            info = {"metric": None, "metric_mode": "max"}
    except ConfigError as e:
        raise StudyError(f"run {run.key}: {e}") from None
    finally:
        os.chdir(cwd)
    _checked[key] = info
    return info


# ---------------------------------------------------------------------------------------------- run state

def read_state(run_dir: Path) -> dict | None:
    p = run_dir / STATE_FILE
    if not p.is_file():
        return None
    with open(p) as f:
        return json.load(f)


def write_state(run_dir: Path, state: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, run_dir / STATE_FILE)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:          # a line being written right now
                    pass
    return out


def run_config(run_dir: Path) -> dict:
    """The run's resolved config.json as the trainer wrote it ({} before it started)."""
    p = run_dir / "config.json"
    if not p.is_file():
        return {}
    with open(p) as f:
        return json.load(f)


def total_steps(run_dir: Path) -> int | None:
    return run_config(run_dir).get("total_steps")


def progress(run_dir: Path) -> tuple[int, int | None]:
    """(last logged step, total steps) of a run."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    return (records[-1]["step"] if records else 0), total_steps(run_dir)


def resume_step(run_dir: Path) -> int:
    """The step ``--resume auto`` continues from (0: none)."""
    latest = run_dir / "checkpoints" / "latest"
    m = re.match(r"global_step(\d+)$", latest.read_text().strip()) if latest.is_file() else None
    return int(m.group(1)) if m else 0


def is_complete(run_dir: Path) -> bool:
    """The run evaluated at its last step (what the trainer does when it reaches max_steps)."""
    total = total_steps(run_dir)
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    return total is not None and bool(evals) and evals[-1]["step"] >= total


def run_state(run: Run) -> str:
    st = read_state(run.dir)
    if st is None:
        return "pending"
    return st.get("state", "pending")


# ---------------------------------------------------------------------------------------------- running

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _fmt_s(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def command(run: Run, nproc: int, port: int) -> list[str]:
    py = sys.executable
    if nproc == 1:
        return [py, "-m", "engine.train", *run.argv]
    return [py, str(Path(py).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port),
            "--module", "engine.train", *run.argv]


def child_env(threads: int, port: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS=str(threads), MASTER_PORT=str(port), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def clean_shm(port: int) -> None:
    """DeepSpeed's CPU all-reduce leaves /dev/shm buffers named after the port (see the README)."""
    for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            os.unlink(f)
        except OSError:
            pass


class Runner:
    def __init__(self, study: Study, parallel: int, cores: int, progress_s: float, log=print):
        self.study, self.parallel, self.progress_s, self.log = study, parallel, progress_s, log
        self.nproc = int(study.spec.get("nproc", 1))
        self.threads = max(1, cores // (parallel * self.nproc))
        self.cores = cores
        self.running: dict = {}        # key -> (run, Popen, port, start time, log file)
        self.start_steps: dict = {}    # key -> the step the run (re)started from
        self.stop_signal = None
        self.failed: list[str] = []
        self.finished: list[str] = []

    def _on_signal(self, signum, _frame):
        self.stop_signal = signum

    def start(self, run: Run, index: int, total: int) -> None:
        state = read_state(run.dir) or {"key": run.key, "argv": run.argv, "sessions": []}
        info = check_argv(run, quick=True)
        state.update(state="running", metric=info["metric"], metric_mode=info["metric_mode"])
        port = _free_port()
        cmd = command(run, self.nproc, port)
        state["sessions"].append({"start": _now(), "threads": self.threads, "nproc": self.nproc,
                                  "parallel": self.parallel, "host": socket.gethostname(), "command": cmd})
        write_state(run.dir, state)
        logf = open(run.dir / "train.log", "a")
        logf.write(f"\n===== {_now()} {' '.join(cmd)}\n")
        logf.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(self.threads, port), stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
        resumed = self.start_steps[run.key] = resume_step(run.dir)
        how = f"resuming after step {resumed}" if resumed else ("new" if not progress(run.dir)[0] else
                                                                  "restarting: no checkpoint yet")
        self.log(f"[study] start {index}/{total} {run.key} ({how}; {self.nproc} rank(s) x {self.threads} "
                 f"thread(s), pid {proc.pid})")
        self.running[run.key] = (run, proc, port, time.time(), logf)

    def finish(self, key: str, rc: int, interrupted: bool = False) -> None:
        run, proc, port, t0, logf = self.running.pop(key)
        logf.close()
        clean_shm(port)
        wall = time.time() - t0
        state = read_state(run.dir)
        state["sessions"][-1].update(end=_now(), wall_s=round(wall, 1), rc=rc)
        state["wall_s"] = round(sum(s.get("wall_s", 0.0) for s in state["sessions"]), 1)
        complete = is_complete(run.dir)
        if interrupted and not complete:
            state["state"] = "interrupted"
            self.log(f"[study] interrupted {run.key} at step {progress(run.dir)[0]} (resumes from its last "
                     "checkpoint next time)")
        elif complete:      # also a run killed (or crashed at exit) after its final evaluation: nothing is missing
            if rc != 0:
                self.log(f"[study] {run.key} exited with {rc} after its final evaluation: counted as done")
            state["state"] = "done"
            if not self.study.spec.get("keep_checkpoints", False):
                for sub in ("checkpoints", "hf_model"):
                    shutil.rmtree(run.dir / sub, ignore_errors=True)
            ev = [r for r in read_jsonl(run.dir / "metrics.jsonl") if r.get("kind") == "eval"][-1]
            metric = state.get("metric")
            shown = f"{metric}={ev[metric]:.4f}" if metric in ev else ", ".join(
                f"{k}={v:.4f}" for k, v in ev.items() if k not in ("kind", "step", "train_s"))
            self.finished.append(key)
            self.log(f"[study] done {run.key} in {_fmt_s(wall)}: {shown} (step {ev['step']})")
        elif rc == 0:
            state["state"] = "stopped"
            self.log(f"[study] {run.key} stopped before its last step (train.stop_at_step?); it resumes next time")
        else:
            state["state"] = "failed"
            tail = (run.dir / "train.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
            self.failed.append(key)
            self.log(f"[study] FAILED {run.key} (exit {rc}): {tail[0][:200]}  [log: {run.dir / 'train.log'}]")
        write_state(run.dir, state)

    def report_progress(self) -> None:
        for key, (run, _proc, _port, t0, _f) in self.running.items():
            step, total = progress(run.dir)
            el = time.time() - t0
            if total and step:
                start_step = self.start_steps.get(key, 0)
                eta = el / (step - start_step) * (total - step) if step > start_step else float("nan")
                eta_s = _fmt_s(eta) if math.isfinite(eta) else "?"
                self.log(f"[study] ... {key} step {step}/{total} ({100 * step / total:.0f}%), {_fmt_s(el)} so far, "
                         f"about {eta_s} left")
            else:
                self.log(f"[study] ... {key} starting ({_fmt_s(el)})")

    def stop_all(self) -> None:
        for key, (run, proc, *_rest) in list(self.running.items()):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 30
        for key, (run, proc, *_rest) in list(self.running.items()):
            try:
                proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            self.finish(key, proc.returncode, interrupted=True)

    def go(self, todo: list[Run], max_runs: int = 0) -> int:
        total = len(self.study.runs)
        done_before = total - len(todo)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        queue = list(todo[:max_runs] if max_runs else todo)
        started, last_progress = 0, time.time()
        try:
            while (queue or self.running) and self.stop_signal is None:
                while queue and len(self.running) < self.parallel and self.stop_signal is None:
                    started += 1
                    self.start(queue.pop(0), done_before + started, total)
                time.sleep(0.5)
                for key, (run, proc, *_rest) in list(self.running.items()):
                    if proc.poll() is not None:
                        self.finish(key, proc.returncode)
                if self.progress_s and time.time() - last_progress >= self.progress_s:
                    last_progress = time.time()
                    self.report_progress()
            if self.stop_signal is not None:
                self.log(f"[study] signal {self.stop_signal}: stopping {len(self.running)} running run(s)")
                self.stop_all()
                return 130
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return 1 if self.failed else 0


def cmd_run(args) -> int:
    spec = load_spec(args.spec)
    study_dir = Path(args.dir).resolve()
    study = build(spec, str(study_dir))
    # a run that already started with other flags is refused: its checkpoints belong to the old command
    changed = [r.key for r in study.runs if (st := read_state(r.dir)) and st.get("argv") != r.argv]
    if changed:
        raise StudyError(f"{len(changed)} run(s) started with other flags ({', '.join(changed[:3])}"
                         f"{', ...' if len(changed) > 3 else ''}): use a new --dir, or delete those run directories")
    study_dir.mkdir(parents=True, exist_ok=True)
    with open(study_dir / "spec.json", "w") as f:
        json.dump(spec, f, indent=2)
    for r in study.runs:       # a run that finished while its study was killed (state "running") is done
        st = read_state(r.dir)
        if st and st.get("state") != "done" and is_complete(r.dir):
            st["state"] = "done"
            write_state(r.dir, st)
    states = {r.key: run_state(r) for r in study.runs}
    todo = [r for r in study.runs if states[r.key] != "done"]
    cores = args.cores or len(os.sched_getaffinity(0))
    parallel = max(1, args.parallel)
    runner = Runner(study, parallel, cores, args.progress_s)
    n_done = len(study.runs) - len(todo)
    resumed = sum(1 for r in todo if states[r.key] != "pending")
    print(f"[study] {spec['name']}: {len(study.runs)} runs ({len(study.groups)} group(s) x {len(study.arms)} arm(s) "
          f"x seeds {spec['seeds']}" + (f", sweep seeds {spec['sweep']['seeds']}" if (spec.get("sweep") or {}).get(
              "seeds") else "") + f"); {n_done} done, {resumed} to resume, {len(todo) - resumed} new; "
          f"{parallel} at a time, {runner.nproc} rank(s) x {runner.threads} thread(s) each on {cores} core(s)",
          flush=True)
    if args.dry_run:
        for r in todo:
            print(f"[study] would run {r.key}: {' '.join(command(r, runner.nproc, 0))}")
        return 0
    session = {"start": _now(), "argv": sys.argv, "parallel": parallel, "cores": cores, "threads": runner.threads,
               "nproc": runner.nproc, "host": socket.gethostname()}
    t0 = time.time()
    code = runner.go(todo, args.max_runs)
    session.update(end=_now(), wall_s=round(time.time() - t0, 1), finished=runner.finished, failed=runner.failed,
                   exit=code)
    with open(study_dir / "study.jsonl", "a") as f:
        f.write(json.dumps(session) + "\n")
    left = sum(1 for r in study.runs if run_state(r) != "done")
    print(f"[study] this sitting: {len(runner.finished)} run(s) finished, {len(runner.failed)} failed, in "
          f"{_fmt_s(time.time() - t0)}; {left} of {len(study.runs)} still to run"
          + (" (run the same command again to continue)" if left else "")
          + f"; report: python -m engine.study report {args.dir}", flush=True)
    return code


def cmd_status(args) -> int:
    study_dir = Path(args.dir)
    spec = load_spec(str(study_dir / "spec.json"))
    study = build(spec, str(study_dir), validate=False)
    counts: dict[str, int] = {}
    for r in study.runs:
        st = run_state(r)
        counts[st] = counts.get(st, 0) + 1
        step, total = progress(r.dir)
        wall = (read_state(r.dir) or {}).get("wall_s")
        print(f"{r.key:40s} {st:12s} step {step}/{total or '?'}" + (f"  {_fmt_s(wall)}" if wall else ""))
    print("[study] " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 0


# ---------------------------------------------------------------------------------------------- report

def t_quantile(n: int) -> float:
    """Two-sided 95% quantile of Student's t with n degrees of freedom."""
    from scipy.stats import t
    return float(t.ppf(0.975, n))


def mean_std(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))


def diff_ci(arm: dict[int, float], base: dict[int, float]) -> tuple[float, float, float, str]:
    """(difference of means, CI low, CI high, how): paired by seed when the seeds match, else Welch."""
    common = sorted(set(arm) & set(base))
    if len(common) == len(arm):                          # every seed of the arm has its baseline run
        d = [arm[s] - base[s] for s in common]
        m, sd = mean_std(d)
        if len(d) < 2:
            return m, float("nan"), float("nan"), "paired"
        h = t_quantile(len(d) - 1) * sd / math.sqrt(len(d))
        return m, m - h, m + h, "paired"
    a, b = list(arm.values()), list(base.values())
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if len(a) < 2 or len(b) < 2:
        return ma - mb, float("nan"), float("nan"), "welch"
    va, vb = sa ** 2 / len(a), sb ** 2 / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1)) + (vb ** 2 / (len(b) - 1))) if se > 0 else len(a) + len(b) - 2
    h = t_quantile(df) * se
    return ma - mb, ma - mb - h, ma - mb + h, "welch"


def load_run(run: Run) -> dict | None:
    """A finished run's curves and end-of-training numbers, or None."""
    st = read_state(run.dir)
    if not st or st.get("state") != "done":
        return None
    recs = read_jsonl(run.dir / "metrics.jsonl")
    # the last record per step (a run resumed after its final evaluation evaluates that step again)
    evals = list({r["step"]: r for r in recs if r.get("kind") == "eval"}.values())
    trains = [r for r in recs if r.get("kind") == "train"]
    cfg = run_config(run.dir)
    total = cfg.get("total_steps") or (evals[-1]["step"] if evals else 0)
    tail = [r for r in trains if r["step"] > 0.9 * total] or trains[-1:]
    return {"evals": evals, "trains": trains, "total": total, "final": evals[-1] if evals else {},
            "split": (cfg.get("eval") or {}).get("split"),
            "train_nll": sum(r["nll"] for r in tail) / len(tail) if tail else float("nan"),
            "wall_s": st.get("wall_s", float("nan")), "metric": st.get("metric"),
            "metric_mode": st.get("metric_mode", "max")}


def _fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _pm(m: float, s: float, digits: int = 4) -> str:
    if not math.isfinite(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if math.isfinite(s) else f"{m:.{digits}f}"


def _scale(metric: str, values: list[float]) -> tuple[float, str]:
    """Report fractions in [0, 1] (accuracy, F1, correlations) in points (x100)."""
    if values and all(-1.0 <= v <= 1.0 for v in values) and metric not in ("loss",):
        return 100.0, " (x100)"
    return 1.0, ""


def _by_step(runs: list[dict], key: str, x: str = "step") -> tuple[list, list, list, list]:
    """Mean and std over seeds of eval ``key`` at each eval step; x = step or mean train_s at that step."""
    steps = sorted({r["step"] for run in runs for r in run["evals"] if key in r})
    xs, ms, ss, ns = [], [], [], []
    for s in steps:
        vals = [r[key] for run in runs for r in run["evals"] if r["step"] == s and key in r]
        xv = [r.get(x, float("nan")) for run in runs for r in run["evals"] if r["step"] == s and key in r]
        m, sd = mean_std(vals)
        xs.append(sum(xv) / len(xv))
        ms.append(m)
        ss.append(sd if math.isfinite(sd) else 0.0)
        ns.append(len(vals))
    return xs, ms, ss, ns


def _smooth_train(runs: list[dict], key: str = "nll") -> tuple[list, list]:
    steps = sorted({r["step"] for run in runs for r in run["trains"]})
    by = {s: [] for s in steps}
    for run in runs:
        for r in run["trains"]:
            by[r["step"]].append(r[key])
    ys = [sum(by[s]) / len(by[s]) for s in steps]
    k = max(1, len(ys) // 40)                       # moving average over ~1/40 of the run
    sm = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
    return steps, sm


def _save(fig, out: Path, name: str) -> str:
    """Write one report figure as out/name and free it; returns the file name for the report."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    return name


def split_label(data: dict[str, list[dict]]) -> str:
    """What the runs evaluated on, for labels: "validation" unless every run evaluated another split (e.g. test)."""
    splits = {run.get("split") for runs in data.values() for run in runs}
    if len(splits) == 1 and (sp := splits.pop()) and sp.lower() not in ("valid", "validation", "val", "dev"):
        return sp
    return "validation"


def plots(study: Study, group: str, data: dict[str, list[dict]], metric: str, out: Path, prefix: str,
          ev: str) -> list[str]:
    """The report's PNGs for one group; ``ev`` names the split the runs evaluated (split_label)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = [a for a in study.arms if data.get(a)]
    colors = {a: plt.cm.tab10(i % 10) for i, a in enumerate(study.arms)}
    title = f"{study.spec['name']}" + (f" / {group}" if group else "")
    files = []

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for a in arms:
        for ax, x in ((axes[0], "step"), (axes[1], "train_s")):
            xs, ms, ss, ns = _by_step(data[a], metric, x)
            if x == "train_s":
                xs = [v / 60 for v in xs]
            ax.plot(xs, ms, color=colors[a], label=f"{a} (n={max(ns) if ns else 0})", lw=1.6)
            ax.fill_between(xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)], color=colors[a],
                            alpha=0.15)
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel("training time (min; eval and checkpoints excluded)")
    for ax in axes:
        ax.set_ylabel(f"{ev} {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}: {ev} {metric}, mean ± std over seeds")
    files.append(_save(fig, out, f"{prefix}curves.png"))

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
    for a in arms:
        steps, sm = _smooth_train(data[a])
        axes[0].plot(steps, sm, color=colors[a], lw=1.2, label=f"{a} train (dropout on)")
        xs, ms, ss, _ = _by_step(data[a], "loss")
        if xs:
            axes[0].plot(xs, ms, color=colors[a], lw=1.6, ls="--", marker=".", label=f"{a} {ev}")
            # the (smoothed) train NLL at each eval step, and the gap: eval loss minus that train NLL
            fit = [sm[min(range(len(steps)), key=lambda i: abs(steps[i] - x))] if steps else float("nan")
                   for x in xs]
            axes[1].plot(xs, [m - t for m, t in zip(ms, fit)], color=colors[a], lw=1.6, marker=".", label=a)
            # eval loss against the train NLL reached: at equal fit, which arm generalises better (an arm that
            # only trails in steps lies on the baseline's line; a regulariser lies below it)
            axes[2].plot(fit, ms, color=colors[a], lw=1.6, marker=".", label=a)
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("loss per example (train: NLL of one copy)")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].axhline(0, color="k", lw=0.6)
    axes[1].set_xlabel("optimizer step")
    axes[1].set_ylabel(f"{ev} loss - train NLL")
    axes[1].legend(fontsize=8)
    axes[2].set_xlabel("train NLL at the eval step (smoothed, dropout on)")
    axes[2].set_ylabel(f"{ev} loss")
    axes[2].invert_xaxis()                          # training moves right: lower train NLL
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: train vs {ev} loss (mean over seeds), the generalisation gap, and {ev} loss at "
                 "equal train NLL")
    files.append(_save(fig, out, f"{prefix}loss.png"))

    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(arms) + 2), 4))
    swept = [a for a in arms if sweep_value(study.spec, a) is not None]
    for i, a in enumerate(arms):
        vals = [run["final"].get(metric) for run in data[a] if metric in run["final"]]
        m, s = mean_std(vals)
        ax.scatter([i] * len(vals), vals, color=colors[a], s=14, alpha=0.7)
        ax.errorbar([i + 0.15], [m], yerr=[s if math.isfinite(s) else 0], fmt="o", color="k", capsize=4)
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels(arms, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"final {ev} {metric}")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"{title}: final {metric} per seed (dots), mean ± std" +
                 (f"; sweep over {study.spec['sweep']['flag']}" if swept else ""), fontsize=9)
    files.append(_save(fig, out, f"{prefix}final.png"))

    points = sweep_points(study.spec, arms)
    if len(points) >= 2:                              # Table 2's view: the final metric against the swept value
        flag = study.spec["sweep"]["flag"]
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = sorted(points)
        stats = [mean_std([run["final"][metric] for run in data[points[x]] if metric in run["final"]]) for x in xs]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s if math.isfinite(s) else 0 for _, s in stats], fmt="o-",
                    capsize=4, label=f"{study.spec['sweep'].get('flags', {}).get('rdrop.mode', 'sweep')}")
        for x in xs:
            ax.annotate(f"n={len(data[points[x]])}", (x, stats[xs.index(x)][0]), textcoords="offset points",
                        xytext=(4, 6), fontsize=7)
        if data.get(study.baseline):
            bm, bs = mean_std([run["final"][metric] for run in data[study.baseline] if metric in run["final"]])
            ax.axhline(bm, color="k", lw=1, label=f"{study.baseline} (mean ± std)")
            if math.isfinite(bs):
                ax.axhspan(bm - bs, bm + bs, color="k", alpha=0.1)
        if min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(flag)
        ax.set_ylabel(f"final {ev} {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{title}: final {metric} against {flag}", fontsize=9)
        files.append(_save(fig, out, f"{prefix}sweep.png"))
    return files


def sweep_points(spec: dict, arms: list[str]) -> dict:
    """{swept value: arm} for the sweep's arms and for every other arm with the sweep's flags and a value of the
    swept flag (e.g. the main R-Drop arm of the same mode)."""
    sweep = spec.get("sweep") or {}
    if not sweep:
        return {}
    base = sweep.get("flags") or {}
    out = {}
    for a in arms:
        flags = arms_of(spec)[a]
        v = flags.get(sweep["flag"])
        if isinstance(v, (int, float)) and all(flags.get(k) == val for k, val in base.items()):
            out.setdefault(float(v), a)
    return out


def cmd_report(args) -> int:
    study_dir = Path(args.dir)
    out = Path(args.out) if args.out else study_dir
    out.mkdir(parents=True, exist_ok=True)
    spec = load_spec(str(study_dir / "spec.json"))
    study = build(spec, str(study_dir), validate=False)
    sessions = read_jsonl(study_dir / "study.jsonl")
    lines = [f"# Study `{spec['name']}`", ""]
    if spec.get("description"):
        lines += [spec["description"], ""]
    n_done = sum(1 for r in study.runs if run_state(r) == "done")
    wall = sum(s.get("wall_s", 0.0) for s in sessions)
    hosts = sorted({s.get("host", "?") for s in sessions})
    finals = [d["final"].get("train_s", 0.0) for d in (load_run(r) for r in study.runs) if d is not None]
    lines += [f"- runs finished: **{n_done} of {len(study.runs)}** ({len(study.groups)} group(s) x {len(study.arms)} "
              f"arm(s) x seeds {spec['seeds']}); baseline arm: `{study.baseline}`",
              (f"- wall time of the study: {_fmt_s(wall)} over {len(sessions)} sitting(s) on {', '.join(hosts)}; "
               + ", ".join(f"{s.get('parallel')} run(s) at a time x {s.get('nproc')} rank(s) x {s.get('threads')} "
                           f"thread(s) on {s.get('cores')} core(s)" for s in sessions[-1:]))
              if sessions else "- wall time of the study: not recorded (no study.jsonl)",
              f"- training time summed over the finished runs: {_fmt_s(sum(finals))} (train_s of each run's last "
              "evaluation, kept across interruptions; a sitting that was killed writes no study.jsonl line)",
              "- every run: `python -m engine.train " + " ".join(study.runs[0].argv).replace(str(study.dir), "DIR")
              + "` (that is the first run; the others differ in the arm's flags, the group's and `--seed`)",
              "- arms: " + "; ".join(f"`{a}` = " + (" ".join(f"--{k} {_flag_value(v)}" for k, v in f.items()) or
                                                   "(common flags only)") for a, f in study.arms.items()), ""]
    summary = []
    for g in study.groups:
        runs = [r for r in study.runs if r.group == g]
        data: dict[str, list[dict]] = {}
        seeds: dict[str, list[int]] = {}
        for r in runs:
            d = load_run(r)
            if d is not None:
                data.setdefault(r.arm, []).append(d)
                seeds.setdefault(r.arm, []).append(r.seed)
        if g:
            lines += [f"## {g}", ""]
        if not data:
            lines += ["No finished runs yet.", ""]
            continue
        first = next(iter(data.values()))[0]
        metric = spec.get("metric") or first["metric"] or next(
            k for k in first["final"] if k not in ("kind", "step", "train_s"))
        mode = first.get("metric_mode", "max")
        allv = [run["final"].get(metric) for runs_ in data.values() for run in runs_ if metric in run["final"]]
        scale, unit = _scale(metric, allv)
        base = {s: run["final"][metric] * scale for s, run in zip(seeds.get(study.baseline, []),
                                                                    data.get(study.baseline, []))}
        base_time = mean_std([run["final"].get("train_s", float("nan")) for run in data.get(study.baseline, [])])[0]
        ev = split_label(data)
        lines += [f"Metric: **{metric}**{unit} on the eval split ({ev}) at the last step ({first['total']} steps; "
                  f"{'higher' if mode == 'max' else 'lower'} is better). Δ: difference to `{study.baseline}` with a "
                  "95% t-interval, paired by seed when both arms have the same seeds. Best: the best evaluation of "
                  "each run, averaged (selected on the eval split itself, so optimistic). Train NLL: per example and "
                  f"copy over the last 10% of steps, with dropout on; gap = final {ev} loss - train NLL.", "",
                  f"| arm | n | final {metric} | Δ vs {study.baseline} [95% CI] | best {metric} | train time | "
                  f"time / baseline | train NLL | {ev} loss | gap |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for a in study.arms:
            if a not in data:
                lines.append(f"| `{a}` | 0 | no finished runs |  |  |  |  |  |  |  |")
                continue
            vals = {s: run["final"][metric] * scale for s, run in zip(seeds[a], data[a]) if metric in run["final"]}
            m, sd = mean_std(list(vals.values()))
            sign = 1 if mode == "max" else -1
            bests = [(max if mode == "max" else min)(e[metric] for e in run["evals"] if metric in e) * scale
                     for run in data[a]]
            bm, bs = mean_std(bests)
            if a == study.baseline:
                delta = "—"
            else:
                d, lo, hi, how = diff_ci(vals, base)
                delta = f"{d:+.2f}"
                if math.isfinite(lo):
                    delta = f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
                    if lo > 0 or hi < 0:              # the interval excludes 0
                        delta = f"**{delta}**"
                    if how == "welch":
                        delta += " (unpaired)"
                summary.append((g, a, m, sd, d, lo, hi, len(vals), sign))
            t_m = mean_std([run["final"].get("train_s", float("nan")) for run in data[a]])[0]
            ratio = t_m / base_time if math.isfinite(base_time) and base_time > 0 else float("nan")
            tr = mean_std([run["train_nll"] for run in data[a]])[0]
            vl = mean_std([run["final"].get("loss", float("nan")) for run in data[a]])[0]
            lines.append(f"| `{a}` | {len(vals)} | {_pm(m, sd, 2)} | {delta} | {_pm(bm, bs, 2)} | "
                         f"{_fmt_s(t_m) if math.isfinite(t_m) else 'n/a'} | {_fmt(ratio, 2)}x | {_fmt(tr, 3)} | "
                         f"{_fmt(vl, 3)} | {_fmt(vl - tr, 3)} |")
        lines += ["", "Per seed (final " + metric + unit + "): " + "; ".join(
            f"`{a}` " + ", ".join(f"s{s}={run['final'].get(metric, float('nan')) * scale:.2f}"
                                  for s, run in zip(seeds[a], data[a])) for a in study.arms if a in data), ""]
        prefix = f"{g}_" if g else ""
        for name in plots(study, g, data, metric, out, prefix, ev):
            lines += [f"![{name}]({name})", ""]
    if len(study.groups) > 1 and summary:
        lines += ["## Summary", "", "| group | arm | n | mean ± std | Δ vs baseline [95% CI] |", "|---|---|---|---|---|"]
        for g, a, m, sd, d, lo, hi, n, _sign in summary:
            lines.append(f"| {g} | `{a}` | {n} | {_pm(m, sd, 2)} | {d:+.2f} [{_fmt(lo, 2)}, {_fmt(hi, 2)}] |")
        lines.append("")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"[study] wrote {out / 'report.md'}")
    return 0


# ---------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or continue) a study")
    r.add_argument("spec")
    r.add_argument("--dir", required=True, help="the study directory (run directories, state, reports)")
    r.add_argument("--parallel", type=int, default=1, help="runs at once (threads per rank = cores / (N x nproc))")
    r.add_argument("--cores", type=int, default=0, help="cores to divide (default: this process's CPU affinity)")
    r.add_argument("--max_runs", type=int, default=0, help="start at most K runs in this sitting (0 = all)")
    r.add_argument("--progress_s", type=float, default=60.0, help="seconds between progress lines (0 = none)")
    r.add_argument("--dry_run", action="store_true", help="validate and print the commands, run nothing")
    s = sub.add_parser("status", help="state of every run")
    s.add_argument("dir")
    rep = sub.add_parser("report", help="write report.md and PNG plots")
    rep.add_argument("dir")
    rep.add_argument("--out", default="", help="where to write them (default: the study directory)")
    args = p.parse_args(argv)
    try:
        return {"run": cmd_run, "status": cmd_status, "report": cmd_report}[args.cmd](args)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
