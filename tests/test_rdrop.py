"""The R-Drop hook against hand-computed values: KL, MSE, masking, reduction, gradients, modes."""
import math

import pytest
import torch
from torch import nn

from engine import losses, rdrop
from engine.task import Task, TaskOutput


def test_symmetric_kl_matches_hand_computation():
    la = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    lb = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    p, q = [0.7, 0.2, 0.1], [0.5, 0.3, 0.2]
    kl_pq = sum(a * math.log(a / b) for a, b in zip(p, q))
    kl_qp = sum(b * math.log(b / a) for a, b in zip(p, q))
    assert losses.symmetric_kl(la, lb).item() == pytest.approx((kl_pq + kl_qp) / 2, rel=1e-6)


def test_kl_is_masked_and_summed_over_units():
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[False, False, True], [False, True, True]])
    full = losses.symmetric_kl(a.reshape(-1, 5), b.reshape(-1, 5)).item()
    per_unit = [losses.symmetric_kl(a[i, j:j + 1], b[i, j:j + 1]).item() for i in range(2) for j in range(3)]
    assert full == pytest.approx(sum(per_unit), rel=1e-5)
    kept = [per_unit[0], per_unit[1], per_unit[3]]
    assert losses.symmetric_kl(a, b, mask).item() == pytest.approx(sum(kept), rel=1e-5)
    # a masked position may hold any garbage, it must not count
    b2 = b.clone()
    b2[0, 2] = 1e4
    assert losses.symmetric_kl(a, b2, mask).item() == pytest.approx(sum(kept), rel=1e-5)


def test_nll_label_smoothing_and_mask_hand_computed():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))   # [1, 2, 3]
    target = torch.tensor([[0, 1]])
    assert losses.nll_loss(logits, target).item() == pytest.approx(-math.log(0.5) - math.log(0.8), rel=1e-6)
    mask = torch.tensor([[False, True]])
    assert losses.nll_loss(logits, target, mask).item() == pytest.approx(-math.log(0.5), rel=1e-6)
    eps = 0.1
    eps_i = eps / 2
    smooth = -(math.log(0.5) + 2 * math.log(0.25))
    expected = (1 - eps - eps_i) * -math.log(0.5) + eps_i * smooth     # fairseq's label_smoothed_nll_loss
    assert losses.nll_loss(logits, target, mask, eps).item() == pytest.approx(expected, rel=1e-6)


def test_mse_loss_and_consistency():
    pred_a, pred_b, y = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.0]), torch.tensor([0.0, 2.0])
    assert losses.mse_loss(pred_a, y).item() == pytest.approx(1.0)
    assert losses.squared_l2(pred_a, pred_b).item() == pytest.approx(0.25 + 1.0)
    assert losses.mse_loss(pred_a.reshape(2, 1), y).item() == pytest.approx(1.0)   # [N, 1] regression head


class Toy(Task):
    """4 features -> 3 classes with dropout; units are examples."""
    def forward(self, model, batch):
        return TaskOutput(model(batch["x"]), batch["y"])


class RegToy(Toy):
    regression = True

    def forward(self, model, batch):
        return TaskOutput(model(batch["x"]).squeeze(-1), batch["y"])


class _Cfg:
    task_cfg = None


def _model(p=0.5, out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Dropout(p), nn.Linear(16, out))


def test_hook_loss_equals_parts_and_never_mutates_batch():
    task, model = Toy(_Cfg()), _model()
    batch = {"x": torch.randn(5, 4), "y": torch.tensor([0, 1, 2, 0, 1])}
    before = {k: v.clone() for k, v in batch.items()}
    torch.manual_seed(1)
    out = rdrop.rdrop_loss(task, model, batch, "rdrop", alpha=2.0)
    # recompute the same two sub-models by hand: same RNG, one forward on [x; x]
    torch.manual_seed(1)
    logits = model(torch.cat([batch["x"], batch["x"]]))
    a, b = logits[:5], logits[5:]
    nll = nn.functional.cross_entropy(a, batch["y"], reduction="sum") + \
        nn.functional.cross_entropy(b, batch["y"], reduction="sum")
    pa, pb = a.log_softmax(-1), b.log_softmax(-1)
    kl = ((pa.exp() * (pa - pb)).sum() + (pb.exp() * (pb - pa)).sum()) / 2
    assert out.nll.item() == pytest.approx(nll.item(), rel=1e-5)
    assert out.consistency.item() == pytest.approx(kl.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(nll.item() + 2.0 * kl.item(), rel=1e-5)
    assert out.copies == 2 and out.consistency.item() > 0
    for k in batch:
        assert torch.equal(batch[k], before[k]) and batch[k].shape[0] == 5


def test_gradients_reach_both_halves():
    """The KL's gradient flows into both copies' logits (no detach on either side)."""
    task = Toy(_Cfg())
    captured = {}

    class Capture(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _model()

        def forward(self, x):
            y = self.inner(x)
            y.retain_grad()
            captured["logits"] = y
            return y

    batch = {"x": torch.randn(4, 4), "y": torch.tensor([0, 1, 2, 0])}
    out = rdrop.rdrop_loss(task, Capture(), batch, "rdrop", alpha=1.0)
    # the consistency term alone must send gradient to each half
    cons_only = task.consistency(*TaskOutput(captured["logits"], torch.cat([batch["y"]] * 2)).split())
    cons_only.backward(retain_graph=True)
    g = captured["logits"].grad
    assert g[:4].abs().sum() > 0 and g[4:].abs().sum() > 0
    out.loss.backward()


def test_consistency_zero_without_dropout_and_modes():
    task, model = Toy(_Cfg()), _model(p=0.0)
    batch = {"x": torch.randn(6, 4), "y": torch.tensor([0, 1, 2, 0, 1, 2])}
    out = rdrop.rdrop_loss(task, model, batch, "rdrop", alpha=5.0)
    assert out.consistency.item() == pytest.approx(0.0, abs=1e-6)
    none = rdrop.rdrop_loss(task, model, batch, "none")
    dup = rdrop.rdrop_loss(task, model, batch, "duplicate", alpha=5.0)
    assert none.copies == 1 and dup.copies == 2
    assert dup.nll.item() == pytest.approx(2 * none.nll.item(), rel=1e-5)   # both copies summed
    assert dup.consistency.item() == 0 and dup.loss.item() == pytest.approx(dup.nll.item())
    with pytest.raises(ValueError):
        rdrop.rdrop_loss(task, model, batch, "bogus")


def test_regression_uses_mse_consistency():
    task, model = RegToy(_Cfg()), _model(out=1)
    batch = {"x": torch.randn(3, 4), "y": torch.tensor([0.5, 1.0, 2.0])}
    torch.manual_seed(3)
    out = rdrop.rdrop_loss(task, model, batch, "rdrop", alpha=1.0)
    torch.manual_seed(3)
    pred = model(torch.cat([batch["x"]] * 2)).squeeze(-1)
    a, b = pred[:3], pred[3:]
    assert out.nll.item() == pytest.approx((((a - batch["y"]) ** 2).sum() + ((b - batch["y"]) ** 2).sum()).item(),
                                           rel=1e-5)
    assert out.consistency.item() == pytest.approx(((a - b) ** 2).sum().item(), rel=1e-5)


def test_double_batch_leaves_scalars_and_non_tensors():
    batch = {"x": torch.ones(2, 3), "n": torch.tensor(7), "meta": "keep"}
    d = rdrop.double_batch(batch)
    assert d["x"].shape == (4, 3) and d["n"].item() == 7 and d["meta"] == "keep" and batch["x"].shape == (2, 3)


def test_fd_mode_is_squared_l2_between_pre_softmax_outputs():
    task, model = Toy(_Cfg()), _model()
    batch = {"x": torch.randn(5, 4), "y": torch.tensor([0, 1, 2, 0, 1])}
    torch.manual_seed(4)
    out = rdrop.rdrop_loss(task, model, batch, "fd", alpha=0.5)
    torch.manual_seed(4)
    logits = model(torch.cat([batch["x"], batch["x"]]))
    a, b = logits[:5], logits[5:]
    fd = ((a - b) ** 2).sum()
    assert out.copies == 2 and out.consistency.item() == pytest.approx(fd.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.nll.item() + 0.5 * fd.item(), rel=1e-5)


def _authors_terms(model, x, y, seed):
    """The two sub-models' logits of one forward on [x; x], as the engine draws them, plus the pieces of the
    authors' losses: per-pass mean cross-entropies and the KL / reverse KL summed over classes AND the batch."""
    torch.manual_seed(seed)
    logits = model(torch.cat([x, x]))
    n = x.shape[0]
    a, b = logits[:n], logits[n:]
    ce_mean = nn.functional.cross_entropy(a, y) + nn.functional.cross_entropy(b, y)
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    kl_sum = nn.functional.kl_div(lb, la, log_target=True, reduction="sum")    # KL(a || b), summed
    rkl_sum = nn.functional.kl_div(la, lb, log_target=True, reduction="sum")   # KL(b || a), summed
    return ce_mean, kl_sum, rkl_sum


@pytest.mark.parametrize("B", [8, 32])
def test_alpha_mapping_of_the_authors_vit_and_bert_code(B):
    """The README's mappings, checked as equal losses (hence equal gradients) on one micro-batch of B examples:
    engine loss / B with alpha = 2 * a * B equals the authors' ViT loss CE_mean + CE_mean + a * (KL.sum + rKL.sum);
    with alpha = 0.5 * B it equals their HF BERT loss CE_mean + CE_mean + 0.5 * (KL.sum + rKL.sum) / 2; with the
    alpha unchanged it equals their fairseq RoBERTa criterion (sums, KL halved) / B, where Table 1's alphas belong."""
    from tasks.image_classification import VIT_ALPHA
    task, model = Toy(_Cfg()), _model()
    x, y = torch.randn(B, 4), torch.randint(0, 3, (B,))
    ce_mean, kl, rkl = _authors_terms(model, x, y, seed=5)
    a = 0.3
    torch.manual_seed(5)
    vit = rdrop.rdrop_loss(task, model, {"x": x, "y": y}, "rdrop", alpha=2 * a * B).loss / B
    assert vit.item() == pytest.approx((ce_mean + a * (kl + rkl)).item(), rel=1e-5)
    torch.manual_seed(5)
    bert = rdrop.rdrop_loss(task, model, {"x": x, "y": y}, "rdrop", alpha=0.5 * B).loss / B
    assert bert.item() == pytest.approx((ce_mean + 0.5 * (kl + rkl) / 2).item(), rel=1e-5)
    torch.manual_seed(5)
    fairseq = rdrop.rdrop_loss(task, model, {"x": x, "y": y}, "rdrop", alpha=1.0).loss / B
    assert fairseq.item() == pytest.approx((ce_mean * B + 1.0 * (kl + rkl) / 2).item() / B, rel=1e-5)
    assert VIT_ALPHA == pytest.approx(2 * 0.3 * 32)          # their CIFAR-100 default: batch 512 / accumulation 16
