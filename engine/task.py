"""The Task contract: what a task plugin provides to the engine.

A task is a module ``tasks/<name>.py`` (or any importable ``pkg.module``) that defines ``TASK = MyTask``.
The module is the registration: there is no global registry and importing it has no side effects.

How the engine uses a task, in order::

    task = TASK(run_cfg, world)                 # run_cfg.task_cfg is an instance of TASK.Config; TASK is resolved
                                                #   once per process by engine.config.parse_args
    task.prepare()                              # once-per-run work (BPE, vocabularies): rank 0 first, then the rest
    model = task.build_model(ds_config)         # nn.Module; under ZeRO-3 built through models/hf.py
    train = task.build_dataset("train")         # any map-style dataset (len + __getitem__)
    sizes = task.example_sizes(train)           # only with --train.max_tokens: per-example lengths [N] or [N, K]
                                                #   that engine/data.py packs into token batches (fairseq's
                                                #   batch_by_size); None = this task batches by examples
    task.check_data(splits, dataset)            # before training: every needed split builds and reads cleanly
    batch = task.collate(samples, generator)    # dict of tensors, first dim = examples. generator is a seeded
                                                #   torch.Generator for training-time augmentation, None in eval
    n = task.num_units(batch)                   # units this batch contributes to the loss (examples or target
                                                #   tokens), counted BEFORE R-Drop doubles the batch
    stats = task.batch_stats(batch)             # optional {name: (num, den)} logged as Train/<name>
    out = task.forward(model, batch)            # TaskOutput; called once on the doubled batch by engine/rdrop.py
    nll, cons = task.rdrop_terms(out, "kl")     # loss(a) + loss(b) and consistency(a, b) of the two halves
    nll_sum = task.loss(out)                    # SUM over units (never a mean: the engine normalises once)
    cons = task.consistency(a, b)               # SUM over units; symmetric KL by default, MSE for regression
    metrics = task.evaluate(ctx, split)         # dict of floats; the default runs eval_step/compute_metrics;
                                                #   ctx (engine.trainer.EvalContext) shards splits, gathers
                                                #   tensors and objects, and runs generate (ZeRO-3 safe)

The reduction is the engine's, stated once in engine/rdrop.py: sums over units of both copies divided by the
units of ONE copy over the whole optimizer step (all micro-batches, all ranks).  A task therefore returns sums.

Writing a new task: subclass :class:`Task`, declare ``Config`` (a dataclass; its fields become ``--task.FIELD``
flags), implement build_model / build_dataset / collate / forward, and either ``eval_step`` + ``compute_metrics``
or your own ``evaluate``.  Classification tasks need nothing else: loss and consistency default to token/example
cross-entropy and symmetric KL with ``pad_mask`` honoured.  A Config field ``regression`` (True: MSE, GLUE STS-B)
and ``label_smoothing`` are read from the task's Config, their one owner.

Fused token loss (engine/fused_loss.py; for large vocabularies): the task calls ``fused_loss.attach(model)`` in
build_model (before deepspeed.initialize) and, when fused, its forward returns ``TaskOutput(None, target, pad_mask,
hidden=<final hidden states [B, T, H]>, head=fused_loss.find(model))`` instead of logits; the hidden states come
from calling ``model`` itself (the DeepSpeed engine), never a submodule of it, or ZeRO's backward bookkeeping is
skipped (fused_loss.attach says how, per model family).  The default ``loss``
and ``rdrop_terms`` then compute NLL (+ symmetric KL / fd) chunk by chunk from hidden and the projection, never
holding [tokens, V] logits; they refuse a task that overrides ``loss`` or ``consistency`` (the fused maths would
silently differ).  Evaluation: ``out.scores()`` gives logits either way (computed from hidden without a graph when
fused), ``out.head.token_nll(...)`` gives per-token NLL in chunks.  ``head`` may be any object with FusedTokenLoss's
interface (``head(hidden, target, pad_mask, label_smoothing, consistency, copies) -> (nll_sum, cons_sum | None)``,
``token_nll``, ``logits``): tasks/language_modeling.py's AdaptiveTokenLoss scores with an adaptive softmax so.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from engine import losses
from engine.config import ConfigError


@dataclass
class TaskOutput:
    """What ``Task.forward`` returns.

    logits:   [N, ..., C] class scores, or [N] predictions for regression; None when the loss is fused
    target:   [N, ...] class ids (or float targets for regression), same leading shape as logits minus C
    pad_mask: [N, ...] bool, True where a position does not count (padding); None if every position counts
    hidden:   [N, ..., H] final hidden states, given instead of logits for the fused token loss (with head)
    head:     the model's engine.fused_loss.FusedTokenLoss (output projection + chunked loss), with hidden, or an
              object with its interface (see the module docstring)
    """
    logits: Tensor | None
    target: Tensor
    pad_mask: Tensor | None = None
    hidden: Tensor | None = None
    head: Any = None

    @property
    def fused(self) -> bool:
        return self.hidden is not None

    def split(self) -> tuple["TaskOutput", "TaskOutput"]:
        """The two halves of an output computed on a doubled batch ([x; x])."""
        n = (self.hidden if self.logits is None else self.logits).shape[0] // 2

        def halves(t):
            return (None, None) if t is None else (t[:n], t[n:])
        (la, lb), (ta, tb), (pa, pb) = halves(self.logits), halves(self.target), halves(self.pad_mask)
        ha, hb = halves(self.hidden)
        return TaskOutput(la, ta, pa, ha, self.head), TaskOutput(lb, tb, pb, hb, self.head)

    def scores(self) -> Tensor:
        """The logits; when fused, computed from hidden without a graph (evaluation; [N, ..., V] in memory)."""
        return self.logits if self.logits is not None else self.head.logits(self.hidden)


@dataclass
class TaskConfig:
    """Base for a task's Config.  Override ``validate`` to raise ConfigError with a one-line fix."""

    def validate(self) -> None:
        pass


class Task:
    Config: type = TaskConfig
    metric: str = "loss"                # key of evaluate()'s dict used to pick the best checkpoint
    metric_mode: str = "min"            # "max" when larger is better (accuracy, BLEU)
    default_eval_split: str = "valid"

    def __init__(self, run_cfg, world: Any = None):
        self.run_cfg = run_cfg
        self.cfg = run_cfg.task_cfg
        self.world = world

    # Loss settings have one owner, the task's Config: a Config field (or property) named ``label_smoothing`` /
    # ``regression`` / ``metric`` is what the engine uses; tasks never overwrite these on the instance.
    @property
    def label_smoothing(self) -> float:
        return float(getattr(self.cfg, "label_smoothing", 0.0) or 0.0)

    @property
    def regression(self) -> bool:
        return bool(getattr(self.cfg, "regression", False))

    @property
    def is_main(self) -> bool:
        return self.world is None or self.world.is_main

    # -- configuration hooks (class methods: used before the task is built) --------------------------------
    @classmethod
    def default_overrides(cls) -> dict[str, Any]:
        """Run-config defaults this task prefers (e.g. {'optim.lr': 5e-4}); recipes and flags override them."""
        return {}

    @classmethod
    def recipes(cls) -> dict[str, dict[str, Any]]:
        """Named sets of overrides, run with --recipe NAME (the paper's settings, for instance)."""
        return {}

    # -- the contract -----------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Work that must happen once per run before anything is built (training a BPE, writing a vocabulary).
        The trainer calls it on rank 0 first, then (after a barrier) on the other ranks, which then only load
        what rank 0 wrote.  Default: nothing."""

    def check_data(self, splits: list[str], dataset=None) -> None:
        """Check, before training starts, every split the run will read (the training split and the evaluation
        split), so that bad data fails in one line (a ConfigError naming the file, the line and the fix) instead
        of after hours of training.  ``dataset(split)`` builds or returns a split (the trainer passes its cached
        getter; default ``build_dataset``).  Default: build each split and require it to be non-empty, which
        reads and parses every file the split comes from.  Override to check what building does not touch
        (e.g. decode images that are read lazily); call ``super().check_data`` first."""
        dataset = dataset or self.build_dataset
        for split in dict.fromkeys(splits):
            if len(dataset(split)) == 0:
                raise ConfigError(f"the {split} split is empty: point the task at data with examples")

    def build_model(self, ds_config: dict) -> nn.Module:
        raise NotImplementedError

    def build_dataset(self, split: str):
        raise NotImplementedError

    def collate(self, samples: list, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> TaskOutput:
        raise NotImplementedError

    def batch_stats(self, batch: dict[str, Tensor]) -> dict[str, tuple[float, float]]:
        """Extra training metrics as {name: (numerator, denominator)}; the engine sums both over the log
        interval and all ranks and logs numerator / denominator as Train/<name> (e.g. the padding ratio)."""
        return {}

    def example_sizes(self, dataset):
        """Per-example sizes for token batching (``--train.max_tokens``), or None when the task batches by
        examples.  An int array [N] (tokens of each example) or [N, K] (e.g. source and target lengths, special
        tokens included).  engine/data.py sorts by the columns (the first one primary, like fairseq's
        ordered_indices) and packs batches whose rows x longest column <= max_tokens (fairseq's batch_by_size)."""
        return None

    def num_units(self, batch: dict[str, Tensor]) -> int:
        """Units of one copy of the batch: examples by default; token tasks count non-pad target tokens."""
        return int(next(iter(batch.values())).shape[0])

    def _check_fused(self) -> None:
        for name in ("loss", "consistency"):
            if getattr(type(self), name) is not getattr(Task, name) or self.regression:
                raise TypeError(f"{type(self).__name__} overrides {name}() (or is a regression task) but its "
                                "forward returned hidden states for the fused token loss, which computes the "
                                "default NLL / symmetric KL: return logits instead, or turn the fused loss off")

    def loss(self, out: TaskOutput) -> Tensor:
        if out.hidden is not None:           # fused, chunked: one copy (mode none, or a half)
            self._check_fused()
            return out.head(out.hidden, out.target, out.pad_mask, self.label_smoothing, None, copies=1)[0]
        if self.regression:
            return losses.mse_loss(out.logits, out.target, out.pad_mask)
        return losses.nll_loss(out.logits, out.target, out.pad_mask, self.label_smoothing)

    def consistency(self, a: TaskOutput, b: TaskOutput) -> Tensor:
        if self.regression:
            return losses.squared_l2(a.logits, b.logits, a.pad_mask)
        return losses.symmetric_kl(a.logits, b.logits, a.pad_mask)

    def rdrop_terms(self, out: TaskOutput, consistency: str | None = "kl") -> tuple[Tensor, Tensor | None]:
        """(loss(a) + loss(b), the consistency term or None) for an output computed on a doubled batch.
        ``consistency``: "kl" = this task's R-Drop term (``consistency``: symmetric KL, MSE for regression),
        "fd" = fraternal dropout's squared L2 between the pre-softmax outputs, None = no term.  Override to
        compute both at once.  An output with ``hidden`` (fused token loss) is computed here chunk by chunk,
        both copies and the consistency together, never holding the full logits (engine/fused_loss.py)."""
        if out.hidden is not None:
            self._check_fused()
            n = out.target.shape[0] // 2     # the doubled batch: copy b's targets are copy a's
            pad = None if out.pad_mask is None else out.pad_mask[:n]
            return out.head(out.hidden, out.target[:n], pad, self.label_smoothing, consistency)
        a, b = out.split()
        nll = self.loss(a) + self.loss(b)
        if consistency is None:
            return nll, None
        if consistency == "fd":
            return nll, losses.squared_l2(a.logits, b.logits, a.pad_mask)
        return nll, self.consistency(a, b)

    # -- evaluation -------------------------------------------------------------------------------------
    def eval_step(self, out: TaskOutput, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-example results of one eval batch (first dim = examples), gathered in dataset order."""
        pred = out.logits.float() if self.regression else out.scores().argmax(-1)
        return {"pred": pred, "target": out.target}

    def compute_metrics(self, results: dict[str, Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, ctx, split: str) -> dict[str, float]:
        """Default: one ordinary pass over ``split`` sharded over ranks (ctx: engine.trainer.EvalContext)."""
        return self.compute_metrics(ctx.gather_eval(split))

    def export_info(self) -> dict[str, Any]:
        """What makes an export folder usable outside the engine, for engine/export.py's model card and
        export.json (every key optional): ``pipeline_tag`` (transformers.pipeline task), ``pipeline_kwargs``
        (arguments the pipeline needs to reproduce the engine's evaluation, e.g. truncation), ``labels`` (names
        in class-id order), ``inputs`` (what ``python -m engine.predict`` reads), ``data`` (one line on the
        data), ``usage`` (a Python snippet; ``{path}`` stands for the folder).  Default: nothing."""
        return {}

    def export(self, model: nn.Module, state_dict: dict, out_dir: str) -> None:
        """Write consolidated weights (rank 0 only).  Default: HF save_pretrained when the model has it.
        Tasks add what a user needs to run the weights (tokenizer, image processor, generation config); the
        trainer then adds the model card (engine/export.py)."""
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(out_dir, state_dict=state_dict)
        else:
            import os
            from safetensors.torch import save_file
            os.makedirs(out_dir, exist_ok=True)
            save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(out_dir, "model.safetensors"))


def get_task_class(name: str) -> type[Task]:
    """``tasks.<name>`` or a dotted path to a module; the module defines ``TASK``."""
    if not name.replace(".", "").replace("_", "").isalnum():
        raise ConfigError(f"--task {name!r} is not a module name: use e.g. image_classification or mypkg.mytask")
    module_name = name if "." in name else f"tasks.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            import pkgutil
            import tasks
            known = sorted(m.name for m in pkgutil.iter_modules(tasks.__path__) if not m.name.startswith("_"))
            raise ConfigError(f"unknown --task {name!r}: choose one of {', '.join(known)} "
                              "or give a dotted module path that defines TASK") from None
        raise
    task = getattr(module, "TASK", None)
    if not (isinstance(task, type) and issubclass(task, Task)):
        raise ConfigError(f"module {module_name} has no TASK = <Task subclass>: define it to register the task")
    if not dataclasses.is_dataclass(task.Config):
        raise ConfigError(f"{module_name}.TASK.Config must be a dataclass")
    return task


def model_has_active_dropout(model: nn.Module) -> bool:
    """True when some dropout in the model is active in train mode (modules or HF config probabilities)."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            for k, v in cfg.to_dict().items():
                if "dropout" in k and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                    return True
    return False

