"""Fault injection (issue 12): preemption, kills during saves, torn and truncated checkpoints, a checkpoint that
carries a pickle payload, divergence at a non-log step, and a table of bad inputs.  Each must end in the state
the README promises: one line and a documented exit status, no torn checkpoint ever visible, `--resume auto`
continuing exactly.

Most cases run the real entry point in this process (engine.train.main, a world of one: ~1-2 s each); only what
needs real processes goes through launchers: signals to launch.sh / the `deepspeed` runner / a process group,
kill -9 in the middle of a save, the save deadline, and two --no_ssh launchers with different output dirs.
Faults land on an exact step through tests/fault_task.py and the RDROP_FAILPOINT hook of engine/checkpoint.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint, preempt, preflight
from engine.config import ConfigError, parse_args
from engine.ds_config import load, resolve
from engine.train import main
from tests.helpers import DATA, ROOT, env, free_port, load_weights, metrics, run

FAST = ["--task.model", "tiny", "--optim.impl", "torch", "--log.progress", "false", "--log.tensorboard", "false",
        "--task.max_train_examples", "64", "--task.max_eval_examples", "20", "--train.micro_batch_size", "8",
        "--optim.warmup_steps", "0", "--optim.schedule", "constant", "--checkpoint.export_hf", "false",
        "--checkpoint.keep_last", "0", "--eval.every_steps", "0", "--log.every_steps", "1"]
LAUNCH = ROOT / "launch.sh"
DEADLINE_S = 120           # a launcher run that has not ended by then hangs


def args(out, *extra, task="image_classification", ds="zero2"):
    return ["--task", task, "--output_dir", str(out), "--ds_config", f"ds_configs/{ds}.json", *FAST,
            *[str(a) for a in extra]]


def fault_args(out, *extra, ds="zero2"):
    return args(out, *extra, task="tests.fault_task", ds=ds)


@pytest.fixture
def train(monkeypatch, capsys):
    """engine.train.main in this process: a fresh world of one on a free port; returns (rc, stdout, stderr)."""
    def go(argv):
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "RDROP_FAILPOINT"):
            monkeypatch.setenv(k, "x")
            monkeypatch.delenv(k)            # restored (removed) after the test, whatever init sets
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err
    return go


def one_line_error(rc, err, *expect, code=2):
    assert rc == code, (rc, err[-3000:])
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    for e in expect:
        assert e in lines[0], (e, lines[0])
    assert "Traceback" not in err
    return lines[0]


def latest(out) -> str:
    return (Path(out) / "checkpoints" / "latest").read_text().strip()


def visible(out) -> list[str]:
    return sorted(p.name for p in (Path(out) / "checkpoints").iterdir() if not p.name.startswith("."))


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """A finished 1-rank ZeRO-2 run with complete checkpoints at steps 2 and 4 (copied by the tests that break it)."""
    out = tmp_path_factory.mktemp("run4") / "run"
    with pytest.MonkeyPatch.context() as mp:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "RDROP_FAILPOINT"):
            mp.setenv(k, "x")
            mp.delenv(k)
        mp.setenv("MASTER_PORT", str(free_port()))
        mp.setenv("DS_ACCELERATOR", "cpu")
        assert main(args(out, "--train.max_steps", 4, "--checkpoint.every_steps", 2,
                         "--checkpoint.save_best", "false")) == 0
    assert visible(out) == ["global_step2", "global_step4", "latest", "zero_to_fp32.py", "zero_to_torch.py"]
    return out


def copy_run(src, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst, symlinks=True)
    return dst


def rewrite_manifest_size(ckpt: Path, name: str) -> None:
    m = json.loads((ckpt / "manifest.json").read_text())
    m["files"][name] = (ckpt / name).stat().st_size
    (ckpt / "manifest.json").write_text(json.dumps(m))


# ================================================================================ 2. checkpoints cannot be torn
def test_truncated_checkpoint_is_named_and_auto_falls_back(run4, train, tmp_path):
    out = copy_run(run4, tmp_path)
    shard = out / "checkpoints" / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    rc, _, err = train(args(out, "--resume", out / "checkpoints" / "global_step4", "--train.max_steps", 6))
    one_line_error(rc, err, "global_step4 is incomplete", f"truncated zero_pp_rank_0_mp_rank_00_optim_states.pt "
                   f"({size // 2} of {size} bytes)", "--resume auto")
    rc, out_text, err = train(args(out, "--resume", "auto", "--train.max_steps", 6, "--checkpoint.every_steps", 2))
    assert rc == 0, err[-3000:]
    assert "skipped incomplete checkpoint(s)" in out_text and "global_step4 (truncated" in out_text
    assert f"resumed from {out / 'checkpoints' / 'global_step2'} at step 2" in out_text
    assert latest(out) == "global_step6" and checkpoint.verify(str(out / "checkpoints"), "global_step4") is None


def test_partial_and_manifestless_saves_are_never_resumed(run4, train, tmp_path):
    out = copy_run(run4, tmp_path)
    root = out / "checkpoints"
    # what a kill in the middle of a save leaves: a hidden directory with part of the files; pointers unchanged
    (root / ".tmp-global_step6").mkdir()
    shutil.copy(root / "global_step4" / "mp_rank_00_model_states.pt", root / ".tmp-global_step6")
    # a step directory without manifest and without its model file (a copy cut short), named by latest
    shutil.copytree(root / "global_step4", root / "global_step8")
    (root / "global_step8" / "manifest.json").unlink()
    (root / "global_step8" / "mp_rank_00_model_states.pt").unlink()
    (root / "latest").write_text("global_step8")
    assert checkpoint.verify(str(root), "global_step8") == \
        "no manifest.json and missing mp_rank_00_model_states.pt"
    assert checkpoint.verify(str(root), ".tmp-global_step6") == "it is a save that never finished"
    notes = []
    assert checkpoint.find("auto", str(out), log=notes.append) == (str(root), "global_step4")
    assert "global_step8 (no manifest.json" in notes[0]
    rc, _, err = train(args(out, "--resume", root / "global_step8", "--train.max_steps", 6))
    one_line_error(rc, err, "global_step8 is incomplete (no manifest.json and missing mp_rank_00_model_states.pt)")
    rc, text, err = train(args(out, "--resume", "auto", "--train.max_steps", 5))
    assert rc == 0 and "at step 4" in text, err[-3000:]
    assert not (root / ".tmp-global_step6").exists()         # swept
    assert latest(out) == "global_step5"


def _kill9_run(out, *extra, failpoint):
    proc = run(fault_args(out, "--eval.batch_size", 20, *extra), check=False, timeout=DEADLINE_S,
               RDROP_FAILPOINT=failpoint)
    return proc


@pytest.mark.dist
def test_kill9_during_a_step_save_and_during_a_best_save(tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    # 1. SIGKILL once every file of the step-4 checkpoint is written, before the directory is renamed into place
    p = _kill9_run(out, "--train.max_steps", 6, "--checkpoint.every_steps", 2, "--checkpoint.save_best", "false",
                   failpoint="save:written@2:kill")
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert latest(out) == "global_step2" and visible(out)[:2] == ["global_step2", "latest"]
    assert (root / ".tmp-global_step4").is_dir()
    # 2. continue; evaluate every step (each evaluation is a new best): SIGKILL the second best save after its
    #    directory was renamed, before the best link moved to it
    p = _kill9_run(out, "--resume", "auto", "--train.max_steps", 6, "--checkpoint.every_steps", 2,
                   "--eval.every_steps", 1, failpoint="save:renamed@2:kill")
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "at step 2" in p.stdout
    assert os.readlink(root / "best") == "best_step3"              # the previous best survived
    assert checkpoint.verify(str(root), "best") is None
    assert torch.load(root / "best" / "mp_rank_00_model_states.pt", weights_only=True)["step"] == 3
    assert latest(out) == "global_step2"
    # 3. the same command finishes; nothing partial is left and every pointer names a complete checkpoint
    p = _kill9_run(out, "--resume", "auto", "--train.max_steps", 6, "--checkpoint.every_steps", 2,
                   "--eval.every_steps", 1, failpoint="")
    assert p.returncode == 0, p.stderr[-3000:]
    assert latest(out) == "global_step6" and os.readlink(root / "best") == "best_step6"
    assert [n for n in os.listdir(root) if n.startswith(".") or n.startswith("best_")] == ["best_step6"]
    for tag in ("global_step2", "global_step4", "global_step6", "best"):
        assert checkpoint.verify(str(root), tag) is None, tag


# ================================================================================ 3. checkpoints cannot run code
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resuming_a_finished_run_evaluates_and_exports_its_last_checkpoint(run4, train, tmp_path):
    """A run killed after its final checkpoint but before its export (or one cut short by resuming with a lower
    --train.max_steps): --resume auto trains nothing, evaluates and writes the export from that checkpoint."""
    out = copy_run(run4, tmp_path)
    shutil.rmtree(out / "hf_model", ignore_errors=True)
    before = metrics(out)
    rc, text, err = train(args(out, "--resume", "auto", "--train.max_steps", 4, "--checkpoint.export_hf", "true",
                               "--checkpoint.save_best", "false"))
    assert rc == 0 and "at step 4" in text, err[-3000:]
    assert metrics(out) == before                       # no training step was taken
    evals = metrics(out, "eval")
    assert evals[-1]["step"] == 4
    assert (out / "hf_model" / "config.json").is_file() and (out / "hf_model" / "export.json").is_file()
    assert "settings changed" not in text               # export_hf may change freely; the run's own records too


def test_checkpoint_with_a_pickle_payload_is_refused(run4, train, tmp_path):
    out = copy_run(run4, tmp_path)
    ckpt = out / "checkpoints" / "global_step4"
    states = ckpt / "mp_rank_00_model_states.pt"
    sd = torch.load(states, weights_only=True)
    marker = tmp_path / "payload_ran"
    sd["innocent_looking"] = _Payload(marker)
    torch.save(sd, states)
    rewrite_manifest_size(ckpt, states.name)          # a well-formed checkpoint, apart from the payload
    rc, _, err = train(args(out, "--resume", "auto", "--train.max_steps", 6))
    one_line_error(rc, err, f"refusing to load {states}", "posix.system", "weights_only=True")
    assert not marker.exists()
    # DeepSpeed's own loaders, used by export and averaging tools, refuse it too
    with pytest.raises(checkpoint.CheckpointError, match="posix.system"):
        checkpoint.fp32_state_dict(str(out / "checkpoints"), "global_step4")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with checkpoint.safe_loading(), pytest.raises(checkpoint.CheckpointError, match="posix.system"):
        get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="global_step4")
    assert not marker.exists()
    torch.load(states, weights_only=False)                 # the payload is real: unguarded, it runs
    assert marker.exists()


def test_every_file_deepspeed_writes_loads_weights_only(run4):
    for f in (run4 / "checkpoints" / "global_step4").glob("*.pt"):
        assert checkpoint.unsafe_globals(str(f)) == [], f
    with checkpoint.safe_loading():
        sd = checkpoint.fp32_state_dict(str(run4 / "checkpoints"), "global_step4")
    assert sd and all(torch.isfinite(v).all() for v in sd.values())


# ================================================================================ 4. divergence
def test_nan_loss_at_a_non_log_step_stops_there_and_nothing_is_saved_from_it(train, tmp_path):
    out = tmp_path / "run"
    rc, _, err = train(fault_args(out, "--task.nan_at_step", 3, "--log.every_steps", 10, "--train.max_steps", 8,
                                  "--checkpoint.every_steps", 2, "--eval.every_steps", 1, "--eval.batch_size", 20))
    one_line_error(rc, err, "step 3: loss is nan", "stopped before anything was saved", "--train.nonfinite stop")
    assert latest(out) == "global_step2" and not (out / "checkpoints" / "global_step4").exists()
    assert os.readlink(out / "checkpoints" / "best") == "best_step2"
    assert all(r["step"] <= 2 for r in metrics(out, "eval")) and not metrics(out, "train")


def test_infinite_gradient_with_a_finite_loss_is_caught_on_zero0(train, tmp_path):
    rc, _, err = train(fault_args(tmp_path / "run", "--task.inf_grad_at_step", 2, "--train.max_steps", 4, ds="zero0"))
    line = one_line_error(rc, err, "step 2: loss is", "but the gradient norm is")
    assert re.search(r"loss is [0-9.]+ but the gradient norm is (inf|nan);", line), line


@pytest.mark.parametrize("ds", ["zero0", "zero2"])
def test_skip_policy_leaves_the_weights_as_they_were(train, tmp_path, ds):
    out = tmp_path / "run"
    rc, text, err = train(fault_args(out, "--task.nan_at_step", 3, "--train.nonfinite", "skip", "--train.max_steps",
                                     5, "--checkpoint.every_steps", 1, "--checkpoint.save_best", "false", ds=ds))
    assert rc == 0, err[-3000:]
    assert "step 3: loss is nan; update skipped (1 in a row, limit 5)" in text
    assert [r["step"] for r in metrics(out)] == [1, 2, 4, 5]          # the skipped step stays out of the logs
    w = {s: torch.load(out / "checkpoints" / f"global_step{s}" / "mp_rank_00_model_states.pt",
                       weights_only=True)["module"] for s in (2, 3, 5)}
    assert all(torch.equal(w[2][k], w[3][k]) for k in w[2])           # step 3 changed nothing
    assert all(torch.isfinite(v).all() for v in w[5].values()) and not all(torch.equal(w[3][k], w[5][k])
                                                                            for k in w[3])


def test_too_many_skips_in_a_row_stop(train, tmp_path):
    rc, _, err = train(fault_args(tmp_path / "run", "--task.nan_at_step", 2, "--task.nan_steps", 50,
                                  "--train.nonfinite", "skip", "--train.nonfinite_max_skips", 2,
                                  "--train.max_steps", 8))
    one_line_error(rc, err, "step 4: loss is nan, 3 non-finite steps in a row", "--train.nonfinite_max_skips 2")


def test_exploding_but_finite_loss_is_reported(train, tmp_path):
    rc, text, err = train(fault_args(tmp_path / "run", "--task.scale_at_step", 3, "--train.max_steps", 4))
    assert rc == 0, err[-3000:]
    assert re.search(r"warning: step 3: loss \S+ is \S+x the lowest so far .*the run is diverging", text), text


# ================================================================================ 1. preemption
def test_sigterm_saves_that_step_and_the_resumed_run_is_bit_identical(train, tmp_path):
    """SIGTERM during step 5 (an odd step, with DeepSpeed's FusedAdam: the case that drifted by 1 ulp): the step
    finishes, one checkpoint of it is saved, exit 75; --resume auto then matches the uninterrupted run bit for
    bit, losses and weights."""
    fused = ["--optim.impl", "fused", "--checkpoint.export_hf", "true", "--checkpoint.every_steps", 2]
    straight, part = tmp_path / "straight", tmp_path / "part"
    rc, _, err = train(fault_args(straight, *fused, "--train.max_steps", 8))
    assert rc == 0, err[-3000:]
    rc, text, err = train(fault_args(part, *fused, "--train.max_steps", 8, "--task.sigterm_at_step", 5))
    assert rc == preempt.EXIT_PREEMPTED, err[-3000:]
    assert f"stopped on SIGTERM after step 5: saved {part / 'checkpoints' / 'global_step5'}" in text
    assert latest(part) == "global_step5" and checkpoint.verify(str(part / "checkpoints"), "global_step5") is None
    assert not (part / "hf_model").exists()
    _forget_cpu_adam_state()          # the resume would run in a new process: the CPU Adam op starts afresh
    rc, text, err = train(fault_args(part, *fused, "--train.max_steps", 8, "--resume", "auto"))
    assert rc == 0 and "at step 5" in text, err[-3000:]
    a, b = metrics(straight), metrics(part)
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa, wb = load_weights(straight), load_weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_at_an_evaluation_step_evaluates_that_step_on_resume(train, tmp_path):
    """A preemption ends the step with a save and skips that step's evaluation (the grace period is for saving);
    the resumed run evaluates it first, with the same weights, so the eval curve has no hole (a study's eval at
    step 20 went missing this way in CI). A step that was evaluated before its save is not evaluated twice."""
    ev = ["--eval.every_steps", 2, "--train.max_steps", 6]
    straight, part = tmp_path / "straight", tmp_path / "part"
    rc, _, err = train(fault_args(straight, *ev))
    assert rc == 0, err[-3000:]
    rc, _, err = train(fault_args(part, *ev, "--task.sigterm_at_step", 4))
    assert rc == preempt.EXIT_PREEMPTED, err[-3000:]
    assert [r["step"] for r in metrics(part, "eval")] == [2]
    rc, text, err = train(fault_args(part, *ev, "--resume", "auto"))
    assert rc == 0 and "at step 4" in text, err[-3000:]
    a, b = metrics(straight, "eval"), metrics(part, "eval")
    assert [r["step"] for r in b] == [2, 4, 6]
    drop = lambda r: {k: v for k, v in r.items() if k != "train_s"}      # noqa: E731 - wall time differs
    assert [drop(r) for r in a] == [drop(r) for r in b]
    # stopped (not preempted) at an evaluation step: that step was evaluated before its save; no second record
    stopped = tmp_path / "stopped"
    rc, _, err = train(fault_args(stopped, *ev, "--train.stop_at_step", 4))
    assert rc == 0, err[-3000:]
    rc, _, err = train(fault_args(stopped, *ev, "--resume", "auto"))
    assert rc == 0, err[-3000:]
    assert [r["step"] for r in metrics(stopped, "eval")] == [2, 4, 6]


def _forget_cpu_adam_state():
    """DeepSpeed's CPU FusedAdam op keeps beta1**t / beta2**t in a process-wide C++ object (one per Adam/AdamW
    mode).  In this process it still holds the interrupted run's step, which would hide the drift a resumed
    process shows; a call at a far-away step puts it where a fresh process starts (pow on the next step)."""
    from deepspeed.ops.op_builder import FusedAdamBuilder
    op = FusedAdamBuilder().load()
    one = lambda: torch.zeros(1)   # noqa: E731
    for mode in (0, 1):
        op.multi_tensor_adam(2048 * 32, torch.zeros(1, dtype=torch.int), [[one()], [one()], [one()], [one()]],
                             0.0, 0.9, 0.999, 1e-8, 10 ** 6, mode, 1, 0.0)


def test_second_signal_and_the_deadline_abort(monkeypatch):
    exits = []
    monkeypatch.setattr(preempt.os, "_exit", exits.append)
    p = preempt.Preemption(grace_s=0, rank=1)
    p._on_signal(signal.SIGTERM, None)
    assert p.requested and p.reason == "SIGTERM" and not exits
    p._on_signal(signal.SIGTERM, None)        # the same signal by a second path (process group + launcher)
    assert not exits
    now = time.monotonic()
    monkeypatch.setattr(preempt.time, "monotonic", lambda: now + preempt.SAME_SIGNAL_S + 1)
    p._on_signal(signal.SIGTERM, None)        # a real second signal: abort
    assert exits == [128 + signal.SIGTERM]
    q = preempt.Preemption(grace_s=0)
    q._on_signal(signal.SIGINT, None)
    q.finish()                                # the checkpoint is saved: later signals change nothing
    q._on_signal(signal.SIGINT, None)
    assert exits == [143]
    monkeypatch.undo()
    exits2 = []
    monkeypatch.setattr(preempt.os, "_exit", exits2.append)
    r = preempt.Preemption(grace_s=0.3)
    r.request("SIGTERM")
    time.sleep(1.0)
    assert exits2 == [143]                    # --train.save_grace_s passed


def _rank_pids(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"engine.train" in argv and b"-m" in argv and marker.encode() in argv and \
                    argv[argv.index(b"engine.train") - 1] == b"-m":
                pids.append(int(d.name))
    return pids


def _wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _stopped_step(text: str, reason: str) -> int:
    m = re.search(rf"\[engine\] stopped on {reason} after step (\d+): saved", text)
    assert m, text[-4000:]
    return int(m.group(1))


LONG = ["--train.max_steps", 100000, "--checkpoint.every_steps", 4, "--checkpoint.keep_last", 2,
        "--log.every_steps", 10, "--checkpoint.save_best", "false", "--dist.timeout_s", 60]


def _start(cmd, **extra_env) -> subprocess.Popen:
    e = env(**extra_env)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    return subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc, timeout=DEADLINE_S) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"still running after {timeout} s:\n{proc.communicate()[0][-4000:]}")


def _shm_clean(port):
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        f.unlink()


@pytest.mark.dist
def test_sigterm_to_launch_sh_saves_exits_75_and_resumes(tmp_path):
    out, port = tmp_path / "run", free_port()
    cmd = ["bash", LAUNCH, "--master_port", port, "--nproc_per_node", 2, "--", *args(out, *LONG)]
    proc = _start(cmd)
    try:
        _wait((out / "checkpoints" / "latest").is_file, DEADLINE_S, "the first checkpoint")
        _wait(lambda: len(_rank_pids(str(out))) == 2, 30, "2 ranks")
        os.kill(proc.pid, signal.SIGTERM)               # launch.sh itself: what srun / a scheduler signals
        text = _finish(proc)
        leaked = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    finally:
        _shm_clean(port)
    assert proc.returncode == preempt.EXIT_PREEMPTED, text[-4000:]
    assert "launch.sh: got SIGTERM, passing it to the ranks" in text
    step = _stopped_step(text, "SIGTERM")
    assert latest(out) == f"global_step{step}" and checkpoint.verify(str(out / "checkpoints"), latest(out)) is None
    assert not _rank_pids(str(out))
    assert not leaked, leaked                           # launch.sh removes DeepSpeed's shm buffers on the way out
    proc = _start(["bash", LAUNCH, "--master_port", port, "--nproc_per_node", 2, "--",
                   *args(out, "--resume", "auto", "--train.max_steps", step + 1)])
    text = _finish(proc)
    _shm_clean(port)
    assert proc.returncode == 0, text[-4000:]
    assert f"at step {step}" in text and latest(out) == f"global_step{step + 1}"


@pytest.mark.dist
@pytest.mark.parametrize("target", ["process_group", "runner_only"])
def test_sigterm_to_a_bare_deepspeed_launch(tmp_path, target):
    """Without launch.sh: the whole process group (ranks save; the runner dies at once, DeepSpeed has no handler
    for it) or only the `deepspeed` runner (its ranks notice their launcher's parent is gone and stop)."""
    out, port = tmp_path / "run", free_port()
    proc = _start([sys.executable, Path(sys.executable).parent / "deepspeed", "--num_gpus", 2, "--master_port", port,
                   "--module", "engine.train", *args(out, *LONG)])
    try:
        _wait((out / "checkpoints" / "latest").is_file, DEADLINE_S, "the first checkpoint")
        _wait(lambda: len(_rank_pids(str(out))) == 2, 30, "2 ranks")
        if target == "process_group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        text = _finish(proc)
        _wait(lambda: not _rank_pids(str(out)), 60, "the ranks to save and exit")
    finally:
        _shm_clean(port)
        for pid in _rank_pids(str(out)):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGTERM       # DeepSpeed's runner itself has no SIGTERM handler
    root = out / "checkpoints"
    _wait(lambda: checkpoint.read_pointer(str(root / "latest")) and
          checkpoint.verify(str(root), latest(out)) is None and not any(n.startswith(".tmp") for n in
                                                                         os.listdir(root)), 10, "a complete latest")
    # runner_only: every rank watches its parent; whichever notices the launcher's exit first tells the others, so
    # rank 0 (the one that prints) may report either reason under load
    step = _stopped_step(text, "SIGTERM" if target == "process_group" else "(?:launcher exit|another rank was "
                                                                            "signalled)")
    assert latest(out) == f"global_step{step}" and max(r["step"] for r in metrics(out)) == step


@pytest.mark.dist
def test_one_signalled_rank_stops_every_rank_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    proc = run(fault_args(out, "--task.sigterm_at_step", 3, "--task.sigterm_rank", 1, "--train.max_steps", 8,
                          "--checkpoint.every_steps", 2), nproc=2, launcher="deepspeed", check=False, timeout=DEADLINE_S)
    assert proc.returncode == preempt.EXIT_PREEMPTED, proc.stderr[-3000:]
    assert latest(out) == "global_step3" and checkpoint.verify(str(out / "checkpoints"), "global_step3") is None
    assert sorted(json.loads((out / "checkpoints" / "global_step3" / "manifest.json").read_text())["files"]) == [
        "config.json", "mp_rank_00_model_states.pt", "rng_state_rank0.pt", "rng_state_rank1.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


@pytest.mark.dist
def test_save_deadline_aborts_cleanly(tmp_path):
    """--train.save_grace_s: the preemption save (held up 5 s by a failpoint) is abandoned after 1 s; the partial
    save stays invisible and latest still names the previous checkpoint."""
    out = tmp_path / "run"
    proc = run(fault_args(out, "--task.sigterm_at_step", 3, "--train.max_steps", 8, "--checkpoint.every_steps", 2,
                          "--train.save_grace_s", 1), check=False, timeout=DEADLINE_S,
               RDROP_FAILPOINT="save:written@2:sleep=5")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "--train.save_grace_s 1 s passed after SIGTERM: aborting without saving" in proc.stderr
    assert latest(out) == "global_step2" and visible(out)[:2] == ["global_step2", "latest"]
    assert checkpoint.find("auto", str(out)) == (str(out / "checkpoints"), "global_step2")


# ================================================================================ 5. nodes without a shared disk
@pytest.mark.dist
def test_node_local_output_dirs_fail_before_training(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    procs = [_start(["bash", LAUNCH, "--hostfile", hostfile, "--launcher", "nossh", "--node_rank", r, "--master_addr",
                     "127.0.0.1", "--master_port", port, "--", *args(tmp_path / f"node{r}", "--train.max_steps", 4)])
             for r in (0, 1)]
    texts = [_finish(p) for p in procs]
    _shm_clean(port)
    assert [p.returncode for p in procs] == [2, 2], texts[0][-3000:] + texts[1][-3000:]
    lines = [ln for ln in texts[0].splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "is not shared between the nodes: rank 1" in lines[0], texts[0][-3000:]
    assert "put --output_dir on a file system every node mounts" in lines[0]
    for r in (0, 1):
        assert not (tmp_path / f"node{r}" / "checkpoints").exists() and not (tmp_path / f"node{r}" /
                                                                              "metrics.jsonl").exists()


# ================================================================================ 6. bad inputs, before training
def _resolved(extra=()):
    cfg = parse_args(["--task", "image_classification", "--output_dir", "/tmp/never", "--ds_config",
                      "ds_configs/zero2.json", *extra])
    return resolve(load(str(ROOT / "ds_configs" / "zero2.json")), cfg, 1, "zero2.json", on_cpu=True)


DS_CASES = {
    "section_not_object": (lambda d: d.update(zero_optimization=2), '"zero_optimization" must be an object'),
    "bf16_true": (lambda d: d.update(bf16=True), '"bf16" must be an object'),
    "number_is_string": (lambda d: d.update(steps_per_print="10"), '"steps_per_print" must be a number'),
    "misspelled_top_level": (lambda d: d.update(zero_optimisation={"stage": 3}),
                             'unknown key(s) "zero_optimisation" (did you mean "zero_optimization"?)'),
    "unknown_top_level": (lambda d: d.update(my_setting=1), 'unknown key(s) "my_setting"'),
    "misspelled_nested": (lambda d: d["zero_optimization"].update(stgae=1),
                          "zero_optimization.stgae: Extra inputs are not permitted: did you mean "
                          "zero_optimization.stage?"),
    "bad_value": (lambda d: d["zero_optimization"].update(stage="two"), "zero_optimization.stage: Input should be"),
    "misspelled_monitor": (lambda d: d["tensorboard"].update(enabeld=True), "tensorboard.enabeld: Extra inputs"),
}


@pytest.mark.parametrize("case", sorted(DS_CASES))
def test_bad_deepspeed_json_is_one_line(case):
    mutate, expect = DS_CASES[case]
    ds = _resolved()
    mutate(ds)
    with pytest.raises(ConfigError) as e:
        preflight.check_ds_config(ds, "my.json")
    assert "\n" not in str(e.value) and str(e.value).startswith("my.json") and expect in str(e.value), str(e.value)


def test_every_shipped_ds_config_passes_the_check():
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        if "fp16" in path.name:
            continue                       # refused on CPU by ds_config.resolve already
        cfg = parse_args(["--task", "image_classification", "--output_dir", "/tmp/never", "--ds_config", str(path)])
        preflight.check_ds_config(resolve(load(str(path)), cfg, 1, path.name, on_cpu=True), path.name)


@pytest.mark.parametrize("flags, expect", [
    (["--optim.lr", "nan"], "--optim.lr is nan: pass a finite number"),
    (["--rdrop.alpha", "inf"], "--rdrop.alpha is inf: pass a finite number"),
    (["--task.dropout", "nan"], "--task.dropout is nan"),
    (["--train.nonfinite", "ignore"], "--train.nonfinite must be one of stop|skip"),
    (["--train.save_grace_s", "-1"], "--train.save_grace_s must be >= 0"),
])
def test_non_finite_and_bad_flags(flags, expect):
    with pytest.raises(ConfigError) as e:
        parse_args(["--task", "image_classification", "--output_dir", "/tmp/never", "--ds_config",
                    "ds_configs/zero2.json", *flags])
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_warmup_longer_than_the_run_is_a_warning():
    cfg = parse_args(["--task", "image_classification", "--output_dir", "/tmp/never", "--ds_config",
                      "ds_configs/zero2.json", "--optim.warmup_steps", "50"])
    (w,) = [w for w in preflight.warnings_for_run(cfg, 40) if "warmup" in w]
    assert "--optim.warmup_steps 50 is not shorter than the run (40 steps)" in w


def _png(path, ok=True):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    if ok:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    else:
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")


def _image_folder(tmp_path, bad_split=None, splits=("train", "test")):
    d = tmp_path / "images"
    for split in splits:
        for c in ("a", "b"):
            for i in range(4):
                _png(d / split / c / f"{i}.png")
    if bad_split:
        _png(d / bad_split / "b" / "broken.png", ok=False)
    return d


def test_bad_data_fails_before_training(train, tmp_path):
    """Every split the run needs is built and read up front: the eval split included (it used to fail only at
    the first evaluation, after training)."""
    cases = [
        (_image_folder(tmp_path / "a", bad_split="test"), "the test split:", "broken.png is not a readable image"),
        (_image_folder(tmp_path / "b", splits=("train",)), "no test data in", ""),
    ]
    corrupt = tmp_path / "parquet"
    corrupt.mkdir()
    (corrupt / "train-00000.parquet").write_bytes(b"PAR1 this is not parquet")
    cases.append((corrupt, "train-00000.parquet is not a readable parquet file", ""))
    for i, (data_dir, expect, expect2) in enumerate(cases):
        out = tmp_path / f"out{i}"
        rc, _, err = train(args(out, "--task.data_dir", data_dir, "--train.max_steps", 2))
        one_line_error(rc, err, expect, expect2)
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_invalid_utf8_in_the_validation_split_fails_before_training(train, tmp_path):
    glue = DATA / "glue" / "RTE"
    d = tmp_path / "RTE"
    d.mkdir()
    (d / "train.tsv").write_text("\n".join((glue / "train.tsv").read_text().splitlines()[:41]) + "\n")
    dev = (glue / "dev.tsv").read_text().splitlines()[:11]
    (d / "dev.tsv").write_bytes(("\n".join(dev[:3]) + "\n").encode() + b"\xff\xfe broken\n" +
                                ("\n".join(dev[3:]) + "\n").encode())
    out = tmp_path / "out"
    rc, _, err = train(["--task", "glue", "--task.name", "rte", "--task.data_dir", d, "--task.model", "tiny",
                        "--output_dir", out, "--ds_config", "ds_configs/zero2.json", "--optim.impl", "torch",
                        "--log.progress", "false", "--train.max_steps", 2, "--train.micro_batch_size", 4])
    one_line_error(rc, err, f"{d / 'dev.tsv'} is not valid UTF-8 (line 4")
    assert not (out / "metrics.jsonl").exists()


def test_resume_against_another_model_task_stage_or_rank_count(run4, train, tmp_path):
    out = copy_run(run4, tmp_path)
    rc, _, err = train(args(out, "--resume", "auto", "--train.max_steps", 6, "--task.model", "small"))
    one_line_error(rc, err, "could not load checkpoint", "task_args.model: tiny -> small")
    rc, _, err = train(fault_args(out, "--resume", "auto", "--train.max_steps", 6))
    one_line_error(rc, err, "the checkpoint is a 'image_classification' run, this is a 'tests.fault_task' run")
    ckpt = out / "checkpoints" / "global_step4"
    cfg = json.loads((ckpt / "config.json").read_text())
    zero3 = json.loads(json.dumps(cfg))
    zero3["ds_config_resolved"]["zero_optimization"]["stage"] = 3
    with pytest.raises(ConfigError, match="saved with ZeRO stage 2, this run uses stage 3: resume with the run's "
                                          "--ds_config, or convert"):
        preflight.check_resume(cfg, zero3, 1, False, str(ckpt))
    cfg["world_size"] = 2
    (ckpt / "config.json").write_text(json.dumps(cfg))
    rewrite_manifest_size(ckpt, "config.json")
    rc, _, err = train(args(out, "--resume", "auto", "--train.max_steps", 6))
    one_line_error(rc, err, "saved by 2 ranks, this run has 1", "deepspeed.checkpoint.ds_to_universal",
                   "--checkpoint.universal true")


def test_output_dir_that_cannot_be_created(train, tmp_path):
    (tmp_path / "file").write_text("x")
    rc, _, err = train(args(tmp_path / "file" / "run", "--train.max_steps", 2))
    one_line_error(rc, err, "cannot create --output_dir", "choose a directory you can write to")


@pytest.fixture
def small_mount(tmp_path):
    """A tmpfs of the given size (root only; skipped elsewhere)."""
    mounted = []

    def mount(size: str, ro: bool = False) -> Path:
        d = tmp_path / f"mnt{len(mounted)}"
        d.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        return d
    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_output_dir_that_cannot_be_written(train, small_mount):
    d = small_mount("1m", ro=True)
    rc, _, err = train(args(d, "--train.max_steps", 2))
    one_line_error(rc, err, f"cannot write to --output_dir {d}")


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(train, small_mount):
    d = small_mount("600k")
    out = d / "run"
    rc, _, err = train(args(out, "--train.max_steps", 4, "--checkpoint.every_steps", 2,
                            "--checkpoint.save_best", "false"))
    line = one_line_error(rc, err, "checkpoint global_step4 not saved: no space left on tmpfs (mounted at "
                          f"{d})", "the previous checkpoint global_step2 is intact")
    assert "--resume auto" in line
    assert latest(out) == "global_step2" and checkpoint.verify(str(out / "checkpoints"), "global_step2") is None
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp")]
