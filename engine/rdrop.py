"""The R-Drop hook.  Task-agnostic and pure: nothing here calls backward or mutates input.  The loss primitives it
composes (through the Task contract) live in engine/losses.py.

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
Consequences for the paper's alphas (README "Alpha: mapping the paper's settings" derives each one):
    write a criterion as  W_nll * sum(NLL_a + NLL_b) + W_kl * sum(KL + rKL)  over the units of one step; its
    alpha in engine units is  2 * W_kl / W_nll  (here W_nll = 1/N, W_kl = alpha/(2N), N = units of one copy).
    - translation / summarization / LM (fairseq criterion: sums, KL halved, divided by the target tokens of one
      copy): identical reduction, so alpha 5 (IWSLT, WMT), 0.7 (CNN/DM), 1.0 (LM) carry over unchanged;
    - GLUE, Table 1 of the appendix: those alphas belong to the authors' fairseq RoBERTa criterion
      (reg_cross_entropy: per-example sums divided by the number of examples), identical reduction, unchanged;
      their Hugging Face BERT code is different: CE_mean(a) + CE_mean(b) + 0.5 * (KL.sum + rKL.sum) / 2 with the
      KL summed over the batch (0.5 hard-coded), i.e. W_nll = 1/B, W_kl = 0.25: engine alpha = 0.5 * B
      (B = their per-GPU batch: 8 for RTE, 16 for MRPC/CoLA/STS-B, 32 for the rest);
    - ViT (vit_src/models/modeling.py): CE_mean(a) + CE_mean(b) + a * (KL.sum + rKL.sum), the KL summed over the
      micro-batch and not halved, i.e. W_nll = 1/B, W_kl = a: engine alpha = 2 * a * B (B = their per-GPU
      micro-batch; their CIFAR-100 default a = 0.3 with batch 512 / accumulation 16 -> B = 32 -> alpha 19.2).
Modes: "none" (baseline: one copy, plain loss), "rdrop", "duplicate" (doubled batch, no consistency term:
the ablation of appendix C.2; same compute as R-Drop without the KL), "fd" (fraternal dropout, Zolna et al. 2018,
the appendix's comparison: the squared L2 distance between the two copies' pre-softmax outputs, summed over
output dims per unit, same reduction and alpha as R-Drop).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MODES = ("none", "rdrop", "duplicate", "fd")
# the consistency term each mode adds on the doubled batch (None: no term)
CONSISTENCY = {"rdrop": "kl", "duplicate": None, "fd": "fd"}


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
    nll, cons = task.rdrop_terms(out, consistency=CONSISTENCY[mode])
    if cons is None:
        return RDropLoss(nll, nll.detach(), torch.zeros((), device=nll.device), 2)
    return RDropLoss(nll + alpha * cons, nll.detach(), cons.detach(), 2)
