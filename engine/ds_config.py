"""Load a ds_configs/*.json, fill every "auto" from the run config, and report every mismatch at once.

The run config owns: micro batch, accumulation, global batch, learning rate and optimizer hyper-parameters,
gradient clipping and the schedule.  The DeepSpeed JSON owns ZeRO, offload, precision, communication and the
monitor switch.  A concrete value in the JSON that disagrees with the run config is an error (HF-style), so a
setting is never silently taken from the wrong place.
"""
from __future__ import annotations

import copy
import json
import os

from engine.config import ConfigError, RunConfig

_AUTO = "auto"


def load(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--ds_config {path} does not exist: pass a file from ds_configs/ (e.g. ds_configs/zero2.json)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): "
                          "fix the file") from None


def optimizer_block(cfg: RunConfig) -> dict:
    """The DeepSpeed optimizer section for the run config's optimizer."""
    o = cfg.optim
    if o.name == "sgd":
        params = {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay}
        if o.nesterov:              # only when asked: heavy-ball SGD blocks stay as they were
            params["nesterov"] = True
        return {"type": "SGD", "params": params}
    params = {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
              "torch_adam": o.impl == "torch"}
    if o.name == "adam":
        # DeepSpeed's "Adam" means AdamW unless adam_w_mode is false: state it, so "adam" is L2-style Adam.
        params["adam_w_mode"] = False
        return {"type": "Adam", "params": params}
    return {"type": "AdamW", "params": params}


def resolve(raw: dict, cfg: RunConfig, world_size: int, path: str, on_cpu: bool) -> dict:
    """Return a filled copy of ``raw``.  Raises one ConfigError listing every problem found."""
    ds = copy.deepcopy(raw)
    problems: list[str] = []
    t = cfg.train

    def own(key: str, value, flag: str):
        cur = ds.get(key, _AUTO)
        if cur == _AUTO:
            ds[key] = value
        elif cur != value:
            problems.append(f'{key}={cur!r} in {path} but {flag} gives {value!r}: set it to "auto" in the JSON '
                            f"or pass {flag} {cur}")

    # Under token batching the number of examples per micro-batch varies; DeepSpeed only uses these two for its
    # own sample counter, so it counts micro-batches (1 per micro-step).
    micro = 1 if t.max_tokens else t.micro_batch_size
    micro_flag = "--train.max_tokens (1 batch per micro-step)" if t.max_tokens else "--train.micro_batch_size"
    own("train_micro_batch_size_per_gpu", micro, micro_flag)
    own("gradient_accumulation_steps", t.grad_accum, "--train.grad_accum")
    own("train_batch_size", micro * t.grad_accum * world_size,
        f"{micro_flag} x --train.grad_accum x world size")
    own("gradient_clipping", float(cfg.optim.clip_grad), "--optim.clip_grad")

    want = optimizer_block(cfg)
    opt = ds.get("optimizer")
    if opt is None or opt == _AUTO:
        ds["optimizer"] = want
    else:
        typ = opt.get("type", _AUTO)
        if typ == _AUTO:
            opt["type"] = want["type"]
        elif typ.lower() != want["type"].lower():
            problems.append(f"optimizer type {typ!r} in {path} but --optim.name gives {want['type']!r}: "
                            f'set "type": "auto" in the JSON or pass --optim.name {typ.lower()}')
        params = opt.get("params", _AUTO)
        if params == _AUTO:
            params = opt["params"] = {}
        for k in [k for k, v in params.items() if v == _AUTO and k not in want["params"]]:
            del params[k]           # e.g. "betas": "auto" under SGD: the run config's optimizer has none
        for k, v in want["params"].items():
            cur = params.get(k, _AUTO)
            if cur == _AUTO:
                params[k] = v
            elif k == "betas" and [float(x) for x in cur] == v:
                continue
            elif cur != v:
                problems.append(f'optimizer.params.{k}={cur!r} in {path} but the run config gives {v!r}: set it to '
                                '"auto" in the JSON or pass the matching --optim flag')
    if "scheduler" in ds:
        if ds["scheduler"] in (_AUTO, {"type": _AUTO}):
            del ds["scheduler"]
        else:
            problems.append(f'{path} has a "scheduler" block but the schedule is owned by --optim.schedule: '
                            "remove the block (or make it \"auto\")")

    fp16 = ds.get("fp16", {})
    if on_cpu and isinstance(fp16, dict) and fp16.get("enabled") in (True, _AUTO):
        problems.append(f"{path} enables fp16, which this CPU does not support: use a bf16 config "
                        "(e.g. ds_configs/zero2_bf16.json) or fp32")
    if isinstance(fp16, dict) and fp16.get("enabled") == _AUTO:
        fp16["enabled"] = not on_cpu
    bf16 = ds.get("bf16", {})
    if isinstance(bf16, dict) and bf16.get("enabled") == _AUTO:
        bf16["enabled"] = False
    if isinstance(fp16, dict) and isinstance(bf16, dict) and fp16.get("enabled") is True and bf16.get("enabled") is True:
        problems.append(f"{path} enables both fp16 and bf16: keep one")

    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage={stage!r} in {path}: use 0, 1, 2 or 3")
    if stage in (1, 2, 3) and want["type"] == "SGD":
        # ZeRO 1-3 assert on optimizers outside DeepSpeed's tested list (torch.optim.SGD is one) unless this is
        # set.  Set only for SGD, the one untested optimizer the run config can build; ZeRO-0 vs ZeRO-2 give
        # equal weights with it (tests/test_engine_runs.py::test_sgd_under_zero2_equals_zero0).
        allow = ds.get("zero_allow_untested_optimizer", _AUTO)
        if allow == _AUTO:
            ds["zero_allow_untested_optimizer"] = True
        elif allow is not True:
            problems.append(f"zero_allow_untested_optimizer={allow!r} in {path} but --optim.name sgd under ZeRO "
                            f"stage {stage} needs it true: remove the key (the engine sets it for SGD) or use "
                            "--optim.name adamw")
    elif ds.get("zero_allow_untested_optimizer") == _AUTO:
        ds["zero_allow_untested_optimizer"] = False
    for key in ("offload_optimizer", "offload_param"):
        off = zero.get(key) if isinstance(zero, dict) else None
        if off and off.get("device") not in (None, "none", "cpu", "nvme"):
            problems.append(f"zero_optimization.{key}.device={off.get('device')!r} in {path}: use cpu, nvme or none")
        if key == "offload_param" and off and off.get("device") not in (None, "none") and stage != 3:
            problems.append(f"{path} offloads parameters with ZeRO stage {stage}: offload_param needs stage 3")

    tb = ds.get("tensorboard")
    if isinstance(tb, dict):
        if tb.get("enabled") == _AUTO:
            tb["enabled"] = cfg.log.tensorboard
        if tb.get("output_path", _AUTO) == _AUTO:
            tb["output_path"] = os.path.join(cfg.output_dir, "tensorboard")
        if tb.get("job_name", _AUTO) == _AUTO:
            tb["job_name"] = "run"
    elif cfg.log.tensorboard:
        ds["tensorboard"] = {"enabled": True, "output_path": os.path.join(cfg.output_dir, "tensorboard"),
                             "job_name": "run"}
    if not cfg.log.tensorboard and isinstance(ds.get("tensorboard"), dict):
        ds["tensorboard"]["enabled"] = False

    if cfg.checkpoint.universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    ds.setdefault("steps_per_print", 10 ** 9)      # the engine prints its own progress
    for k, v in list(ds.items()):
        if v == _AUTO:
            problems.append(f'{k}="auto" in {path} has no owner in the run config: give it a value')

    if problems:
        raise ConfigError(f"{len(problems)} problem(s) with --ds_config: " + " | ".join(problems))
    return ds


def zero_stage(ds: dict) -> int:
    zero = ds.get("zero_optimization") or {}
    return int(zero.get("stage", 0))


def precision(ds: dict) -> str:
    if (ds.get("bf16") or {}).get("enabled"):
        return "bf16"
    if (ds.get("fp16") or {}).get("enabled"):
        return "fp16"
    return "fp32"
