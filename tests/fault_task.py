"""A test-only task (``--task tests.fault_task``): the tiny image task with faults injected at a chosen optimizer
step, so that the fault tests hit exactly the step they mean (tests/test_faults.py).

  --task.nan_at_step K        the logits (hence loss and gradients) are nan at steps K .. K + nan_steps - 1
  --task.inf_grad_at_step K   finite loss, infinite gradients at step K
  --task.scale_at_step K      logits x --task.scale at step K: an exploding but finite loss
  --task.sigterm_at_step K    rank --task.sigterm_rank sends itself SIGTERM during step K (a preemption)
Evaluation also reports ``step_metric`` (the step itself), the metric ``best`` follows, so every evaluation
saves a new best.  Steps are counted by training forwards, so use --train.grad_accum 1.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch

from tasks.image_classification import Config as ImageConfig
from tasks.image_classification import ImageClassification


@dataclass
class Config(ImageConfig):
    nan_at_step: int = 0
    nan_steps: int = 1
    inf_grad_at_step: int = 0
    scale_at_step: int = 0
    scale: float = 1e6
    sigterm_at_step: int = 0
    sigterm_rank: int = 0


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("inf"))


class FaultTask(ImageClassification):
    Config = Config
    metric = "step_metric"
    metric_mode = "max"

    def __init__(self, run_cfg, world=None):
        super().__init__(run_cfg, world)
        self._train_forwards = 0

    def forward(self, model, batch):
        out = super().forward(model, batch)
        if not getattr(model, "module", model).training:     # DeepSpeed's eval() only switches the module
            return out
        self._train_forwards += 1
        step, c = self._train_forwards, self.cfg
        rank = self.world.rank if self.world is not None else 0
        if c.sigterm_at_step == step and c.sigterm_rank == rank:
            os.kill(os.getpid(), signal.SIGTERM)
        if c.nan_at_step and c.nan_at_step <= step < c.nan_at_step + c.nan_steps:
            out.logits = out.logits * float("nan")
        if c.inf_grad_at_step == step:
            out.logits = _InfGrad.apply(out.logits)
        if c.scale_at_step == step:
            out.logits = out.logits * c.scale
        return out

    def evaluate(self, ctx, split):
        return {**super().evaluate(ctx, split), "step_metric": float(ctx.step)}


TASK = FaultTask
