"""The R-Drop hook and its losses.  Task-agnostic, pure functions: nothing here calls backward or mutates input.

R-Drop (Liang et al., 2021): every example goes through the model twice with dropout on; the two sub-models
give P1 and P2 and the loss is

    L = L(P1, y) + L(P2, y) + alpha * (KL(P1 || P2) + KL(P2 || P1)) / 2

Regression (GLUE STS-B, appendix eq. 1-2): L is the squared error to the label and the consistency term is the
squared error between the two predictions.  Implementation: the batch is doubled in the batch dimension
([x; x]), ONE forward pass, the output is split in halves.  Each row gets its own dropout mask.

Reduction (the one place it is defined; every task returns SUMS):
    every loss term is SUMMED over units (examples, or non-pad target tokens) of BOTH copies, and the total is
    divided by the number of units of ONE copy, counted over all micro-batches of the optimizer step and all
    data-parallel ranks (engine/trainer.py does the division, so gradient accumulation and world size change
    nothing).  KL is summed over classes per unit, symmetric and halved as above.
Consequences for the paper's alphas:
    - translation / summarization / LM (fairseq criterion): identical reduction, so alpha 5 (IWSLT, WMT),
      0.7 (CNN/DM), 1.0 (LM) carry over unchanged;
    - GLUE (HF fork: mean CE per pass + alpha * (KL.sum + rKL.sum) / 2 over the batch): same per-example scale,
      alphas of Table 1 carry over;
    - ViT (CE + CE + alpha * (KL + rKL), no halving): their alpha a corresponds to 2a here (0.3 -> 0.6).
Modes: "none" (baseline: one copy, plain loss), "rdrop", "duplicate" (doubled batch, no consistency term:
the ablation of appendix C.2; same compute as R-Drop without the KL).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("none", "rdrop", "duplicate")


def _keep(mask: Tensor | None, like: Tensor) -> Tensor:
    """1.0 where a position counts, 0.0 where pad_mask says it does not."""
    if mask is None:
        return torch.ones_like(like)
    return (~mask).to(like.dtype)


def nll_loss(logits: Tensor, target: Tensor, pad_mask: Tensor | None = None, label_smoothing: float = 0.0) -> Tensor:
    """Summed (label-smoothed) negative log-likelihood, fairseq's label_smoothed_nll_loss formula.

    logits [..., C], target [...] class ids; positions with pad_mask True contribute 0.
    """
    lprobs = F.log_softmax(logits.float(), dim=-1)
    safe_target = target.masked_fill(pad_mask, 0) if pad_mask is not None else target
    nll = -lprobs.gather(-1, safe_target.long().unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0:
        eps_i = label_smoothing / (lprobs.size(-1) - 1)
        smooth = -lprobs.sum(-1)
        nll = (1.0 - label_smoothing - eps_i) * nll + eps_i * smooth
    return (nll * _keep(pad_mask, nll)).sum()


def symmetric_kl(logits_a: Tensor, logits_b: Tensor, pad_mask: Tensor | None = None) -> Tensor:
    """(KL(a||b) + KL(b||a)) / 2, KL summed over the class dim per unit, then summed over unmasked units.

    Gradients flow through both sides (no detach), as in the authors' code.  Computed in float32.
    """
    la = F.log_softmax(logits_a.float(), dim=-1)
    lb = F.log_softmax(logits_b.float(), dim=-1)
    kl_ab = (la.exp() * (la - lb)).sum(-1)
    kl_ba = (lb.exp() * (lb - la)).sum(-1)
    per_unit = (kl_ab + kl_ba) / 2
    return (per_unit * _keep(pad_mask, per_unit)).sum()


def mse_loss(pred: Tensor, target: Tensor, pad_mask: Tensor | None = None) -> Tensor:
    """Summed squared error to the target (regression's NLL under a unit Gaussian, up to constants)."""
    err = (pred.float().reshape(target.shape) - target.float()) ** 2
    return (err * _keep(pad_mask, err)).sum()


def mse_consistency(pred_a: Tensor, pred_b: Tensor, pad_mask: Tensor | None = None) -> Tensor:
    """Summed squared difference between the two predictions (appendix eq. 1)."""
    err = (pred_a.float() - pred_b.float()) ** 2
    if pad_mask is not None:            # one value per masked unit: sum any trailing output dims first
        err = err.reshape(*pad_mask.shape, -1).sum(-1)
    return (err * _keep(pad_mask, err)).sum()


def double_batch(batch: dict) -> dict:
    """A NEW dict in which every tensor with a batch dimension is [x; x].  The caller's batch is untouched."""
    return {k: torch.cat([v, v], dim=0) if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in batch.items()}


@dataclass
class RDropLoss:
    """Sums for one micro-batch (see the module docstring for how they are normalised)."""
    loss: Tensor            # nll + alpha * consistency, with graph
    nll: Tensor             # summed task loss of all copies, detached
    consistency: Tensor     # summed consistency (before alpha), detached; 0 in modes none/duplicate
    copies: int             # 1 (none) or 2


def rdrop_loss(task, model, batch: dict, mode: str = "rdrop", alpha: float = 1.0) -> RDropLoss:
    """One forward of ``task`` on ``batch`` under R-Drop ``mode``; returns SUMMED losses, never calls backward."""
    if mode not in MODES:
        raise ValueError(f"rdrop mode must be one of {MODES}, got {mode!r}")
    if mode == "none":
        out = task.forward(model, batch)
        nll = task.loss(out)
        return RDropLoss(nll, nll.detach(), torch.zeros((), device=nll.device), 1)
    out = task.forward(model, double_batch(batch))
    a, b = out.split()
    nll = task.loss(a) + task.loss(b)
    if mode == "duplicate":
        return RDropLoss(nll, nll.detach(), torch.zeros((), device=nll.device), 2)
    cons = task.consistency(a, b)
    return RDropLoss(nll + alpha * cons, nll.detach(), cons.detach(), 2)
