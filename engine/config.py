"""The run configuration: one tree of dataclasses, set from the command line as ``--section.field VALUE``.

Every setting has one owner.  The run config owns batch size, accumulation, learning rate, clipping and the
schedule; ``ds_configs/*.json`` own the ZeRO stage, offload, precision and communication and say ``"auto"`` for
the rest (see engine/ds_config.py, which fills them from here).

Errors are :class:`ConfigError` with a one-line message that names the fix; engine/train.py prints it and exits 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from engine.rdrop import MODES as RDROP_MODES


class ConfigError(ValueError):
    """Bad user input.  The message is one line and says how to fix it."""


@dataclass
class TrainConfig:
    max_steps: int = 0            # optimizer steps; 0 = run max_epochs epochs
    max_epochs: int = 1           # used only when max_steps == 0
    micro_batch_size: int = 32    # examples per rank per micro-step, BEFORE R-Drop doubles them
    max_tokens: int = 0           # token batching instead (fairseq's --max-tokens): examples per micro-batch such
                                  # that rows x longest example <= N, padding included, per rank, before R-Drop
                                  # doubles them; needs a token task; 0 = micro_batch_size examples
    grad_accum: int = 1           # micro-steps per optimizer step (DeepSpeed owns the accumulation)
    num_workers: int = 0          # DataLoader workers per rank; batches are deterministic whatever this is
    stop_at_step: int = 0         # leave after this step (checkpoint saved) as a preempted job would; the schedule
                                  # still runs to max_steps, and --resume auto continues; 0 = run to the end
    activation_checkpointing: bool = False  # recompute each layer's activations in backward (HF models:
                                  # torch.utils.checkpoint, non-reentrant, RNG state replayed, so the R-Drop copies
                                  # keep their own dropout masks and the recomputation reuses them)
    save_grace_s: float = 25.0    # after SIGTERM/SIGINT: finish the step, save, exit 75 within this many seconds,
                                  # else abort the save (the previous checkpoint stays); 0 = no deadline.  Below
                                  # the usual 30 s before SIGKILL (Kubernetes, torchrun, DeepSpeed's launcher)
    nonfinite: str = "stop"       # a step with a non-finite loss or gradient norm: stop (exit 2, nothing saved from
                                  # those weights) | skip (the update is not applied; see nonfinite_max_skips)
    nonfinite_max_skips: int = 5  # with --train.nonfinite skip: stop after more than this many in a row
    loss_spike_factor: float = 10.0  # report a step whose loss exceeds this many times the lowest so far; 0 = off


@dataclass
class OptimConfig:
    name: str = "adamw"           # adam | adamw | sgd
    impl: str = "fused"           # fused: DeepSpeed FusedAdam / DeepSpeedCPUAdam under offload; torch: torch.optim
    lr: float = 1e-3              # peak learning rate
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.9         # sgd only
    nesterov: bool = False        # sgd only: Nesterov momentum (fairseq's NAG optimizer); needs momentum > 0
    no_decay_bias_norm: bool = False  # exclude biases and norm weights from weight decay (HF/BERT style)
    clip_grad: float = 0.0        # max global grad norm; 0 = off.  Explicit because DeepSpeed defaults to 1.0
    schedule: str = "linear"      # constant | inverse_sqrt | linear | polynomial | cosine
    warmup_steps: int = 0         # linear warmup from warmup_init_lr to lr
    warmup_init_lr: float = 0.0   # lr at step 0 of warmup (fairseq's --warmup-init-lr)
    end_lr: float = 0.0           # lr reached at max_steps (linear / polynomial / cosine)
    power: float = 1.0            # polynomial decay power (1.0 = linear)


@dataclass
class RDropConfig:
    mode: str = "rdrop"           # none (baseline) | rdrop | duplicate (doubled batch, no consistency: ablation C.2)
                                  # | fd (fraternal dropout: squared L2 between the copies' pre-softmax outputs)
    alpha: float = 1.0            # weight of the consistency term, in the paper's units (see engine/rdrop.py)
    alpha_schedule: str = "constant"  # constant | linear_with_lr (alpha * lr_t / peak lr, appendix C.4)


@dataclass
class EvalConfig:
    every_steps: int = 0          # evaluate every N optimizer steps; 0 = only at the end
    batch_size: int = 64          # examples per rank
    split: str = ""               # split to evaluate on; "" = the task's default (valid / test)


@dataclass
class CheckpointConfig:
    every_steps: int = 0          # save every N optimizer steps; 0 = only at the end
    keep_last: int = 0            # keep only the newest N step checkpoints; 0 = keep all
    save_best: bool = True        # also keep DIR/checkpoints/best by the task's metric (needs evaluation)
    export_hf: bool = True        # write consolidated weights in HF save_pretrained format to DIR/hf_model
    export_best: bool = True      # with save_best (and export_hf): DIR/checkpoints/best as DIR/best_model too
    universal: bool = False       # load a DeepSpeed universal checkpoint (resume on another number of ranks)


@dataclass
class LogConfig:
    every_steps: int = 10         # write train metrics every N optimizer steps
    tensorboard: bool = True      # DeepSpeed's TensorBoard monitor, logs in DIR/tensorboard
    progress: bool = True         # tqdm bar on rank 0


@dataclass
class DistConfig:
    timeout_s: int = 600          # process-group timeout: a dead peer ends the job instead of hanging
    omp_threads: int = 0          # torch threads per rank; 0 = cores / local ranks


SECTIONS: dict[str, type] = {
    "train": TrainConfig, "optim": OptimConfig, "rdrop": RDropConfig, "eval": EvalConfig,
    "checkpoint": CheckpointConfig, "log": LogConfig, "dist": DistConfig,
}
TOP_LEVEL = {"task": str, "output_dir": str, "ds_config": str, "seed": int, "resume": str, "recipe": str}
# Flags that launchers append on their own; accepted and ignored (LOCAL_RANK comes from the environment).
LAUNCHER_FLAGS = {"local_rank", "local-rank"}

CHOICES = {
    ("optim", "name"): ("adam", "adamw", "sgd"),
    ("optim", "impl"): ("fused", "torch"),
    ("optim", "schedule"): ("constant", "inverse_sqrt", "linear", "polynomial", "cosine"),
    ("rdrop", "mode"): RDROP_MODES,
    ("rdrop", "alpha_schedule"): ("constant", "linear_with_lr"),
    ("train", "nonfinite"): ("stop", "skip"),
}


@dataclass
class RunConfig:
    task: str = ""
    output_dir: str = ""
    ds_config: str = ""
    seed: int = 1
    resume: str = ""              # "" = new run; "auto" = continue from DIR/checkpoints if any; or a checkpoint dir
    recipe: str = ""              # a named set of overrides defined by the task (e.g. glue rte)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rdrop: RDropConfig = field(default_factory=RDropConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    task_cfg: Any = None          # the task's own Config dataclass, set as --task.FIELD
    task_class: Any = field(default=None, repr=False, compare=False)  # resolved once by parse_args
    explicit: set = field(default_factory=set)  # "section.field" keys the user set (not defaults, not recipes)
    argv: list = field(default_factory=list, repr=False, compare=False)  # the command line, for the model card

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in TOP_LEVEL}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        if self.task_cfg is not None:
            out["task_args"] = dataclasses.asdict(self.task_cfg)
        return out


# ---------------------------------------------------------------------------------------------- parsing

def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(value: Any, typ: Any, flag: str) -> Any:
    """Convert a command-line string (or a recipe value) to the field's type, or raise a one-line ConfigError."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = args[0]
    if not isinstance(value, str):
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
            return value
        value = str(value)
    try:
        if typ is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return value
    except ValueError:
        pass
    name = getattr(typ, "__name__", str(typ))
    hint = " (true or false)" if typ is bool else ""
    raise ConfigError(f"{flag} expects {name}{hint}, got {value!r}: pass a valid {name}")


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean --{close[0]}?" if close else f"; known flags: {', '.join('--' + k for k in sorted(known))}"


def split_argv(argv: list[str]) -> list[tuple[str, str]]:
    """``--a.b V`` / ``--a.b=V`` pairs, in order.  A flag without a value is an error that says so."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: options are --section.field VALUE (see --help)")
        key = arg[2:]
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        else:
            if key.replace("-", "_") in LAUNCHER_FLAGS:       # `--local_rank 0` form
                i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("--") else 1
                continue
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and len(argv[i + 1]) > 2):
                raise ConfigError(f"--{key} needs a value: pass --{key} VALUE")
            val = argv[i + 1]
            i += 2
        pairs.append((key, val))
    return pairs


def known_flags(task_config_cls=None) -> list[str]:
    flags = list(TOP_LEVEL)
    for name, cls in SECTIONS.items():
        flags += [f"{name}.{f}" for f in _field_types(cls)]
    if task_config_cls is not None:
        flags += [f"task.{f}" for f in _field_types(task_config_cls)]
    return flags


def apply(cfg: RunConfig, key: str, value: Any, explicit: bool = True) -> None:
    """Set one ``section.field`` (or top-level) key with type checking; unknown keys name the nearest flag."""
    key = key.replace("-", "_")
    flag = f"--{key}"
    known = known_flags(type(cfg.task_cfg) if cfg.task_cfg is not None else None)
    if key in LAUNCHER_FLAGS:
        return
    if "." not in key:
        if key not in TOP_LEVEL:
            raise ConfigError(f"unknown option {flag}{_suggest(key, known)}")
        setattr(cfg, key, coerce(value, TOP_LEVEL[key], flag))
    else:
        section, name = key.split(".", 1)
        if section == "task":
            target = cfg.task_cfg
            if target is None:
                raise ConfigError(f"{flag} given but no task is set: pass --task NAME first")
        elif section in SECTIONS:
            target = getattr(cfg, section)
        else:
            raise ConfigError(f"unknown option {flag}{_suggest(key, known)}")
        types_ = _field_types(type(target))
        if name not in types_:
            raise ConfigError(f"unknown option {flag}{_suggest(key, known)}")
        setattr(target, name, coerce(value, types_[name], flag))
    if explicit:
        cfg.explicit.add(key)


def parse_args(argv: list[str]) -> RunConfig:
    """Parse the command line into a validated RunConfig (the task's own section included).

    Order of precedence: dataclass defaults < the task's defaults (Task.default_overrides) < the recipe < flags.
    """
    from engine.task import get_task_class  # local import: task modules import engine.config

    pairs = split_argv(argv)
    cfg = RunConfig(argv=list(argv))
    for key, val in pairs:            # top-level keys first: the task decides which --task.* flags exist
        if "." not in key:
            apply(cfg, key, val)
    missing = [f"--{k}" for k in ("task", "output_dir", "ds_config") if not getattr(cfg, k)]
    if missing:
        raise ConfigError(f"missing required option(s) {' '.join(missing)}: "
                          "python -m engine.train --task NAME --output_dir DIR --ds_config PATH")
    task_cls = cfg.task_class = get_task_class(cfg.task)
    cfg.task_cfg = task_cls.Config()
    for key, val in task_cls.default_overrides().items():
        apply(cfg, key, val, explicit=False)
    if cfg.recipe:
        recipes = task_cls.recipes()
        if cfg.recipe not in recipes:
            names = ", ".join(sorted(recipes)) or "none"
            raise ConfigError(f"unknown --recipe {cfg.recipe!r} for task {cfg.task}: choose one of {names}")
        for key, val in recipes[cfg.recipe].items():
            apply(cfg, key, val, explicit=False)
    for key, val in pairs:
        if "." in key:
            apply(cfg, key, val)
    _one_batch_owner(cfg)
    validate(cfg)
    return cfg


def _one_batch_owner(cfg: RunConfig) -> None:
    """The batch is set one way: by examples (--train.micro_batch_size) or by tokens (--train.max_tokens)."""
    mb, mt = "train.micro_batch_size" in cfg.explicit, "train.max_tokens" in cfg.explicit
    if mb and mt:
        raise ConfigError("--train.micro_batch_size and --train.max_tokens both set the batch: pass one of them "
                          "(max_tokens for token batching, micro_batch_size for a fixed number of examples)")
    if mb and cfg.train.max_tokens:      # the task's default batches by tokens; the user asked for examples
        cfg.train.max_tokens = 0


# ---------------------------------------------------------------------------------------------- validation

def _non_finite_floats(cfg: RunConfig) -> list[str]:
    """--section.field flags (task ones included) whose float value is nan or inf."""
    import math
    out = []
    for name in SECTIONS:
        obj = getattr(cfg, name)
        out += [f"{name}.{f.name}" for f in dataclasses.fields(obj)
                if isinstance(getattr(obj, f.name), float) and not math.isfinite(getattr(obj, f.name))]
    if cfg.task_cfg is not None and dataclasses.is_dataclass(cfg.task_cfg):
        out += [f"task.{f.name}" for f in dataclasses.fields(cfg.task_cfg)
                if isinstance(getattr(cfg.task_cfg, f.name), float) and not math.isfinite(getattr(cfg.task_cfg,
                                                                                                   f.name))]
    return out


def validate(cfg: RunConfig) -> None:
    """Value checks that need no model or machine; each failure is one line naming the fix."""
    bad = _non_finite_floats(cfg)
    if bad:
        flag = bad[0]
        section, name = flag.split(".", 1)
        value = getattr(cfg.task_cfg if section == "task" else getattr(cfg, section), name)
        raise ConfigError(f"--{flag} is {value}: pass a finite number")
    for (section, name), allowed in CHOICES.items():
        val = getattr(getattr(cfg, section), name)
        if val not in allowed:
            raise ConfigError(f"--{section}.{name} must be one of {'|'.join(allowed)}, got {val!r}")
    positive = [("train.micro_batch_size", cfg.train.micro_batch_size), ("train.grad_accum", cfg.train.grad_accum),
                ("eval.batch_size", cfg.eval.batch_size), ("optim.lr", cfg.optim.lr)]
    for flag, val in positive:
        if val <= 0:
            raise ConfigError(f"--{flag} must be > 0, got {val}")
    non_negative = [("train.max_steps", cfg.train.max_steps), ("rdrop.alpha", cfg.rdrop.alpha),
                    ("optim.clip_grad", cfg.optim.clip_grad), ("optim.warmup_steps", cfg.optim.warmup_steps),
                    ("optim.weight_decay", cfg.optim.weight_decay), ("eval.every_steps", cfg.eval.every_steps),
                    ("checkpoint.every_steps", cfg.checkpoint.every_steps),
                    ("checkpoint.keep_last", cfg.checkpoint.keep_last), ("log.every_steps", cfg.log.every_steps),
                    ("train.num_workers", cfg.train.num_workers), ("dist.omp_threads", cfg.dist.omp_threads),
                    ("train.stop_at_step", cfg.train.stop_at_step), ("train.max_tokens", cfg.train.max_tokens),
                    ("train.save_grace_s", cfg.train.save_grace_s),
                    ("train.nonfinite_max_skips", cfg.train.nonfinite_max_skips),
                    ("train.loss_spike_factor", cfg.train.loss_spike_factor)]
    for flag, val in non_negative:
        if val < 0:
            raise ConfigError(f"--{flag} must be >= 0, got {val}")
    if cfg.train.max_steps == 0 and cfg.train.max_epochs <= 0:
        raise ConfigError("nothing to train: set --train.max_steps N or --train.max_epochs N (> 0)")
    if cfg.dist.timeout_s <= 0:
        raise ConfigError(f"--dist.timeout_s must be > 0, got {cfg.dist.timeout_s}")
    if cfg.optim.nesterov and (cfg.optim.name != "sgd" or cfg.optim.momentum <= 0):
        raise ConfigError(f"--optim.nesterov true needs --optim.name sgd and --optim.momentum > 0 (got "
                          f"{cfg.optim.name}, momentum {cfg.optim.momentum}): drop the flag or use SGD with momentum")
    if cfg.optim.schedule == "inverse_sqrt" and cfg.optim.warmup_steps == 0:
        raise ConfigError("--optim.schedule inverse_sqrt needs --optim.warmup_steps > 0 (fairseq: 4000)")
    if cfg.rdrop.mode in ("none", "duplicate") and cfg.rdrop.alpha_schedule != "constant":
        raise ConfigError(f"--rdrop.alpha_schedule {cfg.rdrop.alpha_schedule} has no effect with --rdrop.mode "
                          f"{cfg.rdrop.mode}: use --rdrop.mode rdrop or drop the flag")
    if cfg.task_cfg is not None and hasattr(cfg.task_cfg, "validate"):
        cfg.task_cfg.validate()


def dumps(cfg_dict: dict) -> str:
    return json.dumps(cfg_dict, indent=2, sort_keys=True, default=str)


HELP = """usage: python -m engine.train --task NAME --output_dir DIR --ds_config PATH [--section.field VALUE ...]

Trains a task with R-Drop under DeepSpeed.  Works with no launcher (one process), under
`deepspeed [launcher flags] --module engine.train ...`, under torchrun and under mpirun.

required:
  --task NAME            a module in tasks/ (image_classification, ...) or a dotted path pkg.module
  --output_dir DIR       new directory for this run (an existing run is only continued with --resume auto)
  --ds_config PATH       DeepSpeed JSON from ds_configs/ (ZeRO stage, offload, precision)
common:
  --seed N               base seed (dropout gets a different, reproducible stream per rank)
  --resume auto|DIR      continue from DIR/checkpoints (auto: the newest complete checkpoint) or from one
                         checkpoint directory (it must be complete)
  --train.save_grace_s S on SIGTERM/SIGINT finish the step, save, exit 75 (requeue); abort after S s (default 25)
  --train.nonfinite stop|skip   a non-finite loss or gradient norm: stop (exit 2) or skip the update
                         (--train.nonfinite_max_skips N in a row at most); --train.loss_spike_factor F reports
                         a loss above F x the lowest so far
  --recipe NAME          a named recipe of the task (its settings; flags still override)
  --train.max_steps N    optimizer steps (0 = --train.max_epochs epochs)
  --rdrop.mode none|rdrop|duplicate   --rdrop.alpha A   --rdrop.alpha_schedule constant|linear_with_lr
  --task.FIELD VALUE     the task's own settings (printed by --help with --task NAME)
all sections: """


EXIT_STATUS = """exit status: 0 done; 2 one error line: bad input, divergence, a checkpoint that cannot be loaded or saved;
  75 stopped on SIGTERM/SIGINT with a checkpoint of the last step saved (requeue, then --resume auto);
  128+N aborted by signal N (second signal or --train.save_grace_s deadline); 1 anything else (traceback)"""


def help_text(task_config_cls=None) -> str:
    lines = [HELP + ", ".join(SECTIONS)]
    for name, cls in SECTIONS.items():
        defaults = cls()
        lines.append(f"  [{name}] " + "  ".join(f"--{name}.{f}={getattr(defaults, f)!r}" for f in _field_types(cls)))
    if task_config_cls is not None:
        defaults = task_config_cls()
        lines.append("  [task] " + "  ".join(f"--task.{f}={getattr(defaults, f)!r}"
                                             for f in _field_types(task_config_cls)))
    lines.append(EXIT_STATUS)
    return "\n".join(lines)
