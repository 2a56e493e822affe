"""Loss primitives: pure functions that return SUMS over units (the engine normalises once, see engine/rdrop.py).

Every function masks with ``pad_mask`` (True where a position does not count) and computes in float32.
The R-Drop hook (engine/rdrop.py) only composes these; tasks call them through the Task contract.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def keep_weights(mask: Tensor | None, like: Tensor) -> Tensor:
    """1.0 where a position counts, 0.0 where pad_mask says it does not."""
    if mask is None:
        return torch.ones_like(like)
    return (~mask).to(like.dtype)


def nll_loss(logits: Tensor, target: Tensor, pad_mask: Tensor | None = None, label_smoothing: float = 0.0) -> Tensor:
    """Summed (label-smoothed) negative log-likelihood, fairseq's label_smoothed_nll_loss formula
    (eps / (V - 1) on every wrong class).  logits [..., C], target [...] class ids; masked positions give 0."""
    lprobs = F.log_softmax(logits.float(), dim=-1)
    safe_target = target.masked_fill(pad_mask, 0) if pad_mask is not None else target
    nll = -lprobs.gather(-1, safe_target.long().unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0:
        eps_i = label_smoothing / (lprobs.size(-1) - 1)
        smooth = -lprobs.sum(-1)
        nll = (1.0 - label_smoothing - eps_i) * nll + eps_i * smooth
    return (nll * keep_weights(pad_mask, nll)).sum()


def symmetric_kl(logits_a: Tensor, logits_b: Tensor, pad_mask: Tensor | None = None) -> Tensor:
    """(KL(a||b) + KL(b||a)) / 2, KL summed over the class dim per unit, then summed over unmasked units.

    Gradients flow through both sides (no detach), as in the authors' code.  Computed in float32.
    """
    la = F.log_softmax(logits_a.float(), dim=-1)
    lb = F.log_softmax(logits_b.float(), dim=-1)
    kl_ab = (la.exp() * (la - lb)).sum(-1)
    kl_ba = (lb.exp() * (lb - la)).sum(-1)
    per_unit = (kl_ab + kl_ba) / 2
    return (per_unit * keep_weights(pad_mask, per_unit)).sum()


def mse_loss(pred: Tensor, target: Tensor, pad_mask: Tensor | None = None) -> Tensor:
    """Summed squared error to the target (regression's NLL under a unit Gaussian, up to constants)."""
    err = (pred.float().reshape(target.shape) - target.float()) ** 2
    return (err * keep_weights(pad_mask, err)).sum()


def squared_l2(a: Tensor, b: Tensor, pad_mask: Tensor | None = None) -> Tensor:
    """Summed squared difference between the two outputs, summed over any trailing output dims per unit.

    Regression's R-Drop consistency (appendix eq. 1) and fraternal dropout's penalty on pre-softmax outputs."""
    err = (a.float() - b.float()) ** 2
    if pad_mask is not None:            # one value per masked unit: sum any trailing output dims first
        err = err.reshape(*pad_mask.shape, -1).sum(-1)
    return (err * keep_weights(pad_mask, err)).sum()


mse_consistency = squared_l2
