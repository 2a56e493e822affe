"""Checks that run before the first training step, each failing with one line that names the file, key or flag
and the fix (a ConfigError, exit 2):

- the output directory can be created and written (:func:`check_output_dir`), and every rank sees the same one
  (:func:`check_shared_output_dir`: nodes without a shared file system would each hold only their own ranks'
  checkpoint shards, and resume and export would fail after training);
- the DeepSpeed JSON: sections of the wrong type, keys DeepSpeed would silently ignore (a misspelled
  ``zero_optimisation``), and everything DeepSpeed's own config parser rejects (:func:`check_ds_config`);
- a resume against another task, another model, another ZeRO stage or another number of ranks
  (:func:`check_resume`), naming the config fields that differ;
- run-shape warnings that are not errors (:func:`warnings_for_run`).
The data checks are the task's (``Task.check_data``), called by the trainer for every split the run needs.
"""
from __future__ import annotations

import difflib
import json
import os
import socket
import uuid

from engine import distributed as dist_utils
from engine.config import ConfigError

WRITE_PROBE = ".write-probe-"          # names ignored when deciding whether an output dir already holds a run


# ------------------------------------------------------------------------------------------------ output dir
def check_output_dir(path: str) -> None:
    """Create ``path`` if needed and prove it is writable (every rank, before the process group exists)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --output_dir {path} ({e.strerror}): choose a directory you can write "
                          "to") from None
    probe = os.path.join(path, f"{WRITE_PROBE}{socket.gethostname()}-{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"cannot write to --output_dir {path} ({e.strerror}): choose a directory you can write "
                          "to") from None


def holds_a_run(path: str) -> bool:
    try:
        return any(not n.startswith(WRITE_PROBE) for n in os.listdir(path))
    except OSError:
        return False


def check_shared_output_dir(path: str, world) -> None:
    """Every rank must see the files rank 0 writes into ``path``: DeepSpeed writes each rank's ZeRO shard into
    the checkpoint directory, and resume and export read all of them.  Nodes with node-local disks (common on
    cloud VMs) fail here, before training, instead of after it."""
    if world.world_size == 1:
        return
    name = dist_utils.broadcast_object(f".shared-check-{uuid.uuid4().hex}", world)
    marker = os.path.join(path, name)
    if world.is_main:
        with open(marker, "w") as f:
            f.write(socket.gethostname())
    dist_utils.barrier()
    seen = os.path.isfile(marker)
    views = dist_utils.all_gather_object((seen, socket.gethostname(), os.environ.get("CROSS_RANK") or
                                          os.environ.get("GROUP_RANK") or os.environ.get("NODE_RANK", "?")), world)
    dist_utils.barrier()
    if world.is_main:
        try:
            os.unlink(marker)
        except OSError:
            pass
    blind = [(r, host, node) for r, (ok, host, node) in enumerate(views) if not ok]
    if blind:
        r, host, node = blind[0]
        raise ConfigError(f"--output_dir {path} is not shared between the nodes: rank {r} (host {host}, node {node}) "
                          f"does not see a file rank 0 (host {views[0][1]}) wrote there, so each node would hold "
                          "only its own ranks' checkpoint shards and resume/export would fail: put --output_dir on a "
                          "file system every node mounts at the same path (NFS, Lustre, a cluster file system)")


# ------------------------------------------------------------------------------------------------ DeepSpeed JSON
# Top-level sections DeepSpeed reads as objects (a number or a string there crashes it or is ignored).
DICT_SECTIONS = {
    "zero_optimization", "optimizer", "scheduler", "fp16", "bf16", "amp", "tensorboard", "wandb", "csv_monitor",
    "comet", "checkpoint", "activation_checkpointing", "flops_profiler", "comms_logger", "aio", "data_efficiency",
    "compression_training", "autotuning", "elasticity", "pipeline", "nebula", "timers", "compile",
    "tensor_parallel", "torch_autocast", "hybrid_engine", "data_types", "curriculum_learning", "sparse_attention",
    "progressive_layer_drop", "eigenvalue", "quantize_training", "weight_quantization", "expert_parallel",
}
NUMBER_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "steps_per_print"}


def _traced(config: dict):
    """A copy of ``config`` that records which top-level keys DeepSpeed's parser looks at."""
    seen: set = set()

    class Traced(dict):
        def __getitem__(self, k):
            seen.add(k)
            return super().__getitem__(k)

        def get(self, k, default=None):
            seen.add(k)
            return super().get(k, default)

        def __contains__(self, k):
            seen.add(k)
            return super().__contains__(k)

        def setdefault(self, k, default=None):
            seen.add(k)
            return super().setdefault(k, default)

        def pop(self, k, *default):
            seen.add(k)
            return super().pop(k, *default)

        def keys(self):
            outer = self

            class Keys:
                def __contains__(self_, k):
                    seen.add(k)
                    return dict.__contains__(outer, k)

                def __iter__(self_):
                    seen.update(dict.keys(outer))
                    return iter(dict.keys(outer))

                def __len__(self_):
                    return dict.__len__(outer)
            return Keys()

        def items(self):
            seen.update(dict.keys(self))
            return super().items()

        def __iter__(self):
            seen.update(dict.keys(self))
            return super().__iter__()

        def __copy__(self):
            return Traced(dict.items(self))

    return Traced(dict.items(config)), seen


def _pydantic_models() -> dict:
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel
    out, todo = {}, [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        out[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return out


def _pydantic_line(e, config: dict, path: str) -> str:
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    if loc and loc[0] not in config:              # a section model: find the section that holds the key
        for section, value in config.items():
            if isinstance(value, dict) and loc[0] in value:
                loc = [section] + loc
                break
    key = ".".join(loc) or "?"
    msg = err.get("msg", str(e))
    hint = "fix the value"
    if err.get("type") == "extra_forbidden":
        model = _pydantic_models().get(getattr(e, "title", ""))
        known = []
        if model is not None:
            for name, f in model.model_fields.items():
                known += [name] + ([f.alias] if f.alias else [])
        close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        hint = f"did you mean {'.'.join(loc[:-1] + [close[0]])}?" if close else "remove it"
    return f"{path}: {key}: {msg}: {hint}"


def check_ds_config(ds: dict, path: str) -> None:
    """Reject what DeepSpeed would crash on later or silently ignore.  ``ds`` is the resolved config (autos
    filled); call after the process group exists (DeepSpeed's parser checks the batch against the world size)."""
    problems = []
    for key, value in ds.items():
        if key in DICT_SECTIONS and not isinstance(value, dict):
            problems.append(f'"{key}" must be an object like {{"...": ...}}, got {json.dumps(value)}')
        elif key in NUMBER_KEYS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            problems.append(f'"{key}" must be a number, got {json.dumps(value)}')
    if problems:
        raise ConfigError(f"{path}: " + " | ".join(problems))
    traced, seen = _traced(ds)
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
        DeepSpeedConfig(traced)
    except Exception as e:     # noqa: BLE001 - whatever DeepSpeed's parser raises becomes one line
        if type(e).__name__ == "ValidationError" and hasattr(e, "errors"):
            raise ConfigError(_pydantic_line(e, ds, path)) from None
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: DeepSpeed rejects this config ({type(e).__name__}: {first}): fix the file") \
            from None
    unknown = [k for k in ds if k not in seen]
    if unknown:
        known = sorted(k for k in seen if isinstance(k, str))
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(k, known, n=1, cutoff=0.6)
            parts.append(f'"{k}"' + (f' (did you mean "{close[0]}"?)' if close else ""))
        raise ConfigError(f"{path}: unknown key(s) {', '.join(parts)}: DeepSpeed would silently ignore "
                          f"{'them' if len(unknown) > 1 else 'it'}; fix or remove")


# ------------------------------------------------------------------------------------------------ resume
# Fields of the saved run config that may change on resume without a word (where and how the run is looked at).
_FREE = ("output_dir", "resume", "checkpoint.", "log.", "eval.", "dist.", "train.stop_at_step", "train.max_steps",
         "train.max_epochs", "train.save_grace_s", "train.nonfinite", "train.loss_spike_factor",
         "train.num_workers", "total_steps", "ds_config_resolved.tensorboard", "ds_config_resolved.steps_per_print",
         "ds_config_resolved.checkpoint", "task_args.max_eval_examples", "world_size", "ds_config",
         "run_command", "resumed_with")     # the last two: bookkeeping, not settings


def _flatten(d, prefix="") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "optimizer":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(saved: dict, current: dict) -> list[str]:
    """``field: saved -> current`` for the fields that differ, those that may change freely left out."""
    a, b = _flatten(saved), _flatten(current)
    out = []
    for k in sorted(set(a) | set(b)):
        if any(k == f or k.startswith(f if f.endswith(".") else f + ".") for f in _FREE):     # a key or its fields
            continue
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            out.append(f"{k}: {a.get(k, '<unset>')} -> {b.get(k, '<unset>')}")
    return out


def check_resume(saved: dict | None, current: dict, world_size: int, universal: bool, ckpt: str) -> list[str]:
    """Refuse a resume that cannot work; return the config differences to report (one line) otherwise."""
    if saved is None:
        return []
    diff = config_diff(saved, current)
    if saved.get("task") != current.get("task"):
        raise ConfigError(f"--resume {ckpt}: the checkpoint is a {saved.get('task')!r} run, this is a "
                          f"{current.get('task')!r} run: resume with --task {saved.get('task')} or start a new "
                          "--output_dir")
    stage = lambda c: int(((c.get("ds_config_resolved") or {}).get("zero_optimization") or {}).get("stage", 0))  # noqa
    if not universal and stage(saved) != stage(current):
        raise ConfigError(f"--resume {ckpt}: saved with ZeRO stage {stage(saved)}, this run uses stage "
                          f"{stage(current)}: resume with the run's --ds_config, or convert the checkpoint with "
                          "python -m deepspeed.checkpoint.ds_to_universal and pass --checkpoint.universal true")
    saved_world = int(saved.get("world_size") or world_size)
    if not universal and saved_world != world_size and stage(saved) >= 1:
        parent = os.path.dirname(os.path.normpath(ckpt))
        raise ConfigError(f"--resume {ckpt}: saved by {saved_world} ranks, this run has {world_size}, and ZeRO stage "
                          f"{stage(saved)} shards the optimizer by rank: convert it once with python -m "
                          f"deepspeed.checkpoint.ds_to_universal --input_folder {ckpt} --output_folder "
                          f"{ckpt}_universal --inject_missing_state, then pass --resume {ckpt}_universal "
                          f"--checkpoint.universal true (README, 'Resuming on a different number of nodes'); "
                          f"checkpoints are in {parent}")
    return diff


# ------------------------------------------------------------------------------------------------ warnings
def warnings_for_run(cfg, total_steps: int) -> list[str]:
    out = []
    w = cfg.optim.warmup_steps
    if w and w >= total_steps:
        out.append(f"--optim.warmup_steps {w} is not shorter than the run ({total_steps} steps): the learning rate "
                   f"never reaches --optim.lr {cfg.optim.lr:g}; lower the warmup or train longer")
    if cfg.checkpoint.every_steps and cfg.checkpoint.every_steps > total_steps:
        out.append(f"--checkpoint.every_steps {cfg.checkpoint.every_steps} is longer than the run ({total_steps} "
                   "steps): only the final checkpoint will be saved")
    return out
