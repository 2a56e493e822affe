"""Learning-rate schedules as multipliers of the peak lr, handed to DeepSpeed as a client LambdaLR.

DeepSpeed has no inverse_sqrt, so the engine owns every schedule here and DeepSpeed steps it once per optimizer
step (never on a micro-step).  Step t counts optimizer updates already taken (0 at the first update).
"""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, schedule: str, peak: float, warmup: int, total: int, warmup_init: float = 0.0,
              end: float = 0.0, power: float = 1.0) -> float:
    """lr(step) / peak."""
    if warmup > 0 and step < warmup:
        return (warmup_init + (peak - warmup_init) * step / warmup) / peak
    if schedule == "constant":
        return 1.0
    if schedule == "inverse_sqrt":
        # fairseq: lr = peak * sqrt(warmup) / sqrt(step) after warmup, continuous at step == warmup
        return math.sqrt(warmup) / math.sqrt(max(step, 1))
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if schedule in ("linear", "polynomial"):
        p = 1.0 if schedule == "linear" else power
        return (end + (peak - end) * (1 - progress) ** p) / peak
    if schedule == "cosine":
        return (end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))) / peak
    raise ValueError(f"unknown schedule {schedule!r}")


def build(optim_cfg, total_steps: int):
    """A callable DeepSpeed calls with the (basic) optimizer to get the LambdaLR."""
    o = optim_cfg

    def factor(step: int) -> float:
        return lr_factor(step, o.schedule, o.lr, o.warmup_steps, total_steps, o.warmup_init_lr, o.end_lr, o.power)

    return lambda optimizer: LambdaLR(optimizer, factor)
