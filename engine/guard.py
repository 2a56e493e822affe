"""The per-step guard: divergence caught at the step it happens, and the ranks' agreement to stop.

Once per optimizer step (never per micro-step) every rank contributes to ONE small all-reduce:
``[loss sum, units, grad norm, stop requested, DeepSpeed skipped the update]``.  From it every rank gets the same
verdict:

- the step's loss or gradient norm is not finite: with ``--train.nonfinite stop`` (the default) the run ends at
  that step with one line (exit 2) and nothing is saved from the bad weights; with ``skip`` the update is not
  applied (DeepSpeed's own overflow skip, which ZeRO 1-3 and bf16 apply to an invalid gradient norm; on ZeRO-0
  fp32 a check in front of the optimizer does the same), the step's loss is left out of the logs, and more than
  ``--train.nonfinite_max_skips`` skips in a row end the run.  Under fp16 a step DeepSpeed's loss scaler skipped
  for overflow is loss scaling at work, not divergence: only a non-finite loss counts there.
- the loss is finite but exploding (more than ``--train.loss_spike_factor`` times the lowest step loss so far):
  reported on rank 0, at most once per log interval.
- a rank was asked to stop (engine/preempt.py): every rank learns it here, after the same step.

The gradient norm is the global one: DeepSpeed's for ZeRO 1-3 and bf16 (computed in its step anyway), and on
ZeRO-0 one norm over the reduced gradients taken on the device before the step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine import distributed as dist_utils
from engine.config import ConfigError


class DivergenceError(ConfigError):
    """Non-finite training.  One line, exit 2: the fix is a setting (lr, clipping, precision)."""


@dataclass
class Verdict:
    loss: float              # the step's loss over all ranks (nan when not finite)
    grad_norm: float
    skipped: bool            # a non-finite step whose update was not applied (skip policy)
    stop: bool               # a rank asked to stop (preemption)


class StepGuard:
    def __init__(self, cfg, engine, world, precision: str, preemption=None, log_every: int = 10):
        t = cfg.train
        self.policy, self.max_skips, self.spike_factor = t.nonfinite, t.nonfinite_max_skips, t.loss_spike_factor
        self.engine, self.world, self.precision, self.preemption = engine, world, precision, preemption
        self.log_every = max(1, log_every)
        self.consecutive = 0
        self.lowest = math.inf
        self._last_spike_report = -10 ** 9
        self._ds_skipped = int(getattr(engine, "skipped_steps", 0) or 0)
        self._pre_step_norm: torch.Tensor | None = None
        stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
        self.zero0_norm = stage == 0 and not hasattr(getattr(engine, "optimizer", None), "_global_grad_norm")
        if self.policy == "skip" and self.zero0_norm:
            self._guard_optimizer_step()

    # ------------------------------------------------------------------------------------------ ZeRO-0 norm
    def grad_norm_on_device(self, module: torch.nn.Module) -> torch.Tensor:
        """The 2-norm of the (already reduced) gradients, on the device, without a host sync.  ZeRO-0 only:
        ZeRO 1-3 and DeepSpeed's bf16 optimizer compute their own in engine.step()."""
        grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        norm = (torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])) if grads
                else torch.zeros((), device=device))
        self._pre_step_norm = norm
        return norm

    def _guard_optimizer_step(self) -> None:
        """skip on ZeRO-0 fp32: the plain optimizer has no overflow check; put one in front of its step.  The
        ``overflow`` attribute is what DeepSpeed's engine reads to count a skipped step (and hold the schedule)."""
        opt = self.engine.optimizer
        step = opt.step
        guard = self

        def guarded_step(*args, **kwargs):
            norm = guard._pre_step_norm
            opt.overflow = norm is not None and not bool(torch.isfinite(norm))
            if opt.overflow:
                return None
            return step(*args, **kwargs)
        opt.overflow = False
        opt.step = guarded_step

    # ------------------------------------------------------------------------------------------ the check
    def stop_agreed(self) -> bool:
        """Before the first step: did any rank get a stop request while setting up?  (one all-reduce)"""
        flag = 1.0 if (self.preemption is not None and self.preemption.requested) else 0.0
        total = sum(dist_utils.all_reduce_sum([flag], self.world))
        if total > 0 and self.preemption is not None:
            self.preemption.agreed()
        return total > 0

    def after_step(self, step: int, loss_sum: torch.Tensor, units: float, norm0: torch.Tensor | None) -> Verdict:
        """Call on every rank after each optimizer step; one all-reduce.  Raises DivergenceError."""
        engine, world = self.engine, self.world
        if norm0 is not None:
            norm = norm0.detach().double().reshape(())
        else:
            n = engine.get_global_grad_norm()
            norm = (n.detach().double().reshape(()) if isinstance(n, torch.Tensor)
                    else torch.tensor(0.0 if n is None else float(n), dtype=torch.float64))
        ds_skipped = int(getattr(engine, "skipped_steps", 0) or 0)
        skipped_by_ds = ds_skipped - self._ds_skipped
        self._ds_skipped = ds_skipped
        stop = 1.0 if (self.preemption is not None and self.preemption.requested) else 0.0
        device = loss_sum.device
        flags = torch.stack([loss_sum.detach().double().reshape(()), torch.tensor(float(units), dtype=torch.float64,
                             device=device), norm.to(device), torch.tensor(stop, dtype=torch.float64, device=device),
                             torch.tensor(float(skipped_by_ds > 0), dtype=torch.float64, device=device)])
        if world.world_size > 1:
            torch.distributed.all_reduce(flags)
        loss_sum_all, units_all, norm_sum, stop_all, ds_skips = flags.tolist()
        loss = loss_sum_all / max(units_all, 1.0)
        grad_norm = norm_sum / world.world_size
        stop_now = stop_all > 0
        if stop_now and self.preemption is not None:
            self.preemption.agreed()

        loss_bad = not math.isfinite(loss)
        # fp16: a step the loss scaler skipped is its business; elsewhere a non-finite norm is divergence
        norm_bad = not math.isfinite(grad_norm) and not (self.precision == "fp16" and ds_skips > 0)
        if self.precision == "fp16" and ds_skips > 0 and not loss_bad:
            return Verdict(loss, grad_norm, skipped=True, stop=stop_now)
        if loss_bad or norm_bad:
            what = (f"loss is {loss}" if loss_bad else f"loss is {loss:.4g} but the gradient norm is {grad_norm}")
            fix = "lower --optim.lr, set --optim.clip_grad (e.g. 1.0), or train in fp32/bf16"
            if self.policy == "stop":
                raise DivergenceError(f"step {step}: {what}; stopped before anything was saved from these weights "
                                      f"(--train.nonfinite stop): {fix}")
            self.consecutive += 1
            if self.consecutive > self.max_skips:
                raise DivergenceError(f"step {step}: {what}, {self.consecutive} non-finite steps in a row "
                                      f"(more than --train.nonfinite_max_skips {self.max_skips}): {fix}")
            if world.is_main:
                print(f"[engine] warning: step {step}: {what}; update skipped ({self.consecutive} in a row, "
                      f"limit {self.max_skips})", flush=True)
            return Verdict(float("nan"), grad_norm, skipped=True, stop=stop_now)
        self.consecutive = 0
        if self.spike_factor > 0 and self.lowest < math.inf and loss > self.spike_factor * max(self.lowest, 1e-12):
            if world.is_main and step - self._last_spike_report >= self.log_every:
                print(f"[engine] warning: step {step}: loss {loss:.4g} is {loss / max(self.lowest, 1e-12):.3g}x the "
                      f"lowest so far ({self.lowest:.4g}), gradient norm {grad_norm:.4g}: the run is diverging; "
                      "lower --optim.lr or set --optim.clip_grad", flush=True)
                self._last_spike_report = step
        self.lowest = min(self.lowest, loss)
        return Verdict(loss, grad_norm, skipped=False, stop=stop_now)
