"""Every bad input gets one line that names the fix, a non-zero exit, and leaves existing output untouched."""
from __future__ import annotations

import hashlib
import json

import pytest

from engine.config import ConfigError, parse_args
from engine.ds_config import load, resolve
from tests.helpers import ROOT, TINY, run

BASE = ["--task", "image_classification", "--output_dir", "/tmp/never-created", "--ds_config",
        "ds_configs/zero2.json"]


def _err(argv) -> str:
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("extra, expect", [
    (["--optim.lrr", "1e-3"], "did you mean --optim.lr"),
    (["--bogus", "1"], "unknown option --bogus"),
    (["--optim.lr", "fast"], "--optim.lr expects float"),
    (["--train.max_steps", "1.5"], "--train.max_steps expects int"),
    (["--log.tensorboard", "maybe"], "true or false"),
    (["--rdrop.mode", "kl"], "--rdrop.mode must be one of none|rdrop|duplicate"),
    (["--rdrop.alpha", "-1"], "--rdrop.alpha must be >= 0"),
    (["--train.micro_batch_size", "0"], "--train.micro_batch_size must be > 0"),
    (["--optim.schedule", "inverse_sqrt", "--optim.warmup_steps", "0"], "needs --optim.warmup_steps > 0"),
    (["--rdrop.mode", "none", "--rdrop.alpha_schedule", "linear_with_lr"], "has no effect"),
    (["--task.model", "huge"], "is not a ViT preset"),
    (["--task.nope", "1"], "unknown option --task.nope"),
    (["--optim.lr"], "--optim.lr needs a value"),
    (["positional"], "unexpected argument"),
    (["--recipe", "nope"], "unknown --recipe 'nope'"),
])
def test_config_errors_name_the_fix(extra, expect):
    assert expect in _err(BASE + extra)


def test_missing_required_and_unknown_task():
    assert "missing required option(s) --output_dir --ds_config" in _err(["--task", "image_classification"])
    msg = _err(["--task", "imagenet_thing", "--output_dir", "x", "--ds_config", "y"])
    assert "unknown --task 'imagenet_thing'" in msg and "image_classification" in msg


def test_launcher_local_rank_flag_is_accepted():
    cfg = parse_args(BASE + ["--local_rank=1", "--seed", "3"])
    assert cfg.seed == 3
    cfg = parse_args(["--local_rank", "0"] + BASE)
    assert cfg.task == "image_classification"


def test_ds_config_mismatches_are_all_reported_at_once(tmp_path):
    cfg = parse_args(BASE + ["--train.micro_batch_size", "8", "--optim.clip_grad", "1.0"])
    raw = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    raw.update(train_micro_batch_size_per_gpu=16, gradient_clipping=0.5,
               scheduler={"type": "WarmupLR", "params": {}}, fp16={"enabled": True})
    raw["optimizer"] = {"type": "Lamb", "params": {"lr": 0.1}}
    with pytest.raises(ConfigError) as e:
        resolve(raw, cfg, 2, "my.json", on_cpu=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("6 problem(s)")
    for part in ("train_micro_batch_size_per_gpu=16", "gradient_clipping=0.5", "optimizer type 'Lamb'",
                 "optimizer.params.lr=0.1", '"scheduler" block', "fp16, which this CPU does not support",
                 ):
        assert part in msg, part


def test_ds_config_autos_are_filled_and_clipping_is_explicit():
    cfg = parse_args(BASE + ["--train.micro_batch_size", "8", "--train.grad_accum", "3", "--optim.lr", "2e-4",
                             "--optim.name", "sgd"])
    ds = resolve(load(str(ROOT / "ds_configs" / "zero3_offload.json")), cfg, 2, "zero3_offload", on_cpu=True)
    assert ds["train_batch_size"] == 48 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.0            # DeepSpeed would default to 1.0
    assert ds["optimizer"] == {"type": "SGD", "params": {"lr": 2e-4, "momentum": 0.9, "weight_decay": 0.05}}
    assert "scheduler" not in ds and ds["tensorboard"]["output_path"].endswith("tensorboard")
    assert "auto" not in json.dumps(ds)


def test_sgd_allows_deepspeeds_untested_optimizer_under_zero_only():
    """ZeRO 1-3 assert on torch SGD unless zero_allow_untested_optimizer is set: the engine sets it for SGD only."""
    sgd = parse_args(BASE + ["--optim.name", "sgd"])
    adam = parse_args(BASE)
    for name in ("zero1", "zero2", "zero3", "zero2_offload"):
        ds = resolve(load(str(ROOT / "ds_configs" / f"{name}.json")), sgd, 1, name, on_cpu=True)
        assert ds["zero_allow_untested_optimizer"] is True, name
        ds = resolve(load(str(ROOT / "ds_configs" / f"{name}.json")), adam, 1, name, on_cpu=True)
        assert "zero_allow_untested_optimizer" not in ds, name
    ds = resolve(load(str(ROOT / "ds_configs" / "zero0.json")), sgd, 1, "zero0", on_cpu=True)
    assert "zero_allow_untested_optimizer" not in ds          # ZeRO-0 takes any optimizer
    raw = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    raw["zero_allow_untested_optimizer"] = False
    with pytest.raises(ConfigError, match="zero_allow_untested_optimizer=False .* needs it true"):
        resolve(raw, sgd, 1, "my.json", on_cpu=True)
    raw["zero_allow_untested_optimizer"] = "auto"
    assert resolve(raw, adam, 1, "my.json", on_cpu=True)["zero_allow_untested_optimizer"] is False


def test_missing_and_broken_ds_config(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match=r"not valid JSON \(line 1"):
        load(str(bad))


def _tree_hash(path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _one_line_error(proc, expect: str):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_cli_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    before = _tree_hash(out)
    proc = run([*TINY, "--output_dir", str(out), "--ds_config", "ds_configs/zero2.json"], check=False)
    _one_line_error(proc, "already holds a run: pass --resume auto")
    assert _tree_hash(out) == before


def test_cli_alpha_without_dropout_and_fp16_on_cpu(tmp_path):
    proc = run([*TINY, "--output_dir", str(tmp_path / "a"), "--ds_config", "ds_configs/zero2.json",
                "--task.dropout", "0", "--rdrop.alpha", "1.0"], check=False)
    _one_line_error(proc, "the model has no active dropout")
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    proc = run([*TINY, "--output_dir", str(tmp_path / "b"), "--ds_config", "ds_configs/zero2_fp16.json"],
               check=False)
    _one_line_error(proc, "fp16, which this CPU does not support: use a bf16 config")


def test_cli_bad_flag_exits_2_with_one_line(tmp_path):
    proc = run(["--task", "image_classification", "--output_dir", str(tmp_path / "x"), "--ds_config",
                "ds_configs/zero2.json", "--train.max_stepz", "3"], check=False)
    _one_line_error(proc, "did you mean --train.max_steps")
    assert not (tmp_path / "x").exists()


def test_cli_bad_data_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run([*TINY, "--output_dir", str(tmp_path / "y"), "--ds_config", "ds_configs/zero2.json",
                "--task.data_dir", str(tmp_path / "empty")], check=False)
    _one_line_error(proc, "no train data in")


def test_help_lists_sections_and_task_flags():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "engine.train", "--help", "--task", "image_classification"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--rdrop.mode", "--train.max_steps", "--optim.schedule", "--task.model", "--resume"):
        assert flag in out.stdout


def test_json_lines_reader_names_file_and_line():
    from engine.records import json_lines
    good = ['{"a": 1}\n', "\n", '  \n', '{"a": 2}\n']
    assert list(json_lines(good, "f.jsonl")) == [(1, {"a": 1}), (4, {"a": 2})]
    with pytest.raises(ConfigError, match=r"^f\.jsonl line 2: not valid JSON \(.*\): fix or remove the line$"):
        list(json_lines(['{"a": 1}\n', '{"a": \n'], "f.jsonl", ConfigError))
    with pytest.raises(ValueError, match=r"^f\.jsonl line 1: not a JSON object: write one object per line$"):
        list(json_lines(["[1, 2]\n"], "f.jsonl"))


def test_build_tools_come_from_this_interpreter(monkeypatch, tmp_path):
    """A process started without the venv on PATH must still build DeepSpeed's ops with the venv's ninja (the
    system one records other command hashes in the shared op cache, so the two would rebuild it in turn)."""
    import os
    import sys
    from engine.distributed import pin_build_tools
    venv_bin = tmp_path / "bin"
    venv_bin.mkdir()
    (venv_bin / "ninja").write_text("#!/bin/sh\n")
    (venv_bin / "ninja").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin", str(venv_bin)]))
    assert pin_build_tools() == str(venv_bin / "ninja")
    assert os.environ["PATH"].split(os.pathsep) == [str(venv_bin), "/usr/bin", "/bin"]
    (venv_bin / "ninja").unlink()                         # no ninja beside the interpreter: PATH is left alone
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    pin_build_tools()
    assert os.environ["PATH"] == "/usr/bin:/bin"
