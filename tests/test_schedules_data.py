"""Schedules (fairseq semantics) and the deterministic batching the reduction and resume rely on."""
import math

import pytest

from engine import data
from engine.schedules import lr_factor


def test_inverse_sqrt_is_fairseq():
    peak, warmup = 5e-4, 4000
    # fairseq: warmup linearly from warmup_init_lr, then lr = peak * sqrt(warmup) / sqrt(step)
    assert lr_factor(0, "inverse_sqrt", peak, warmup, 10 ** 6, 1e-7) * peak == pytest.approx(1e-7)
    assert lr_factor(2000, "inverse_sqrt", peak, warmup, 10 ** 6, 0.0) * peak == pytest.approx(peak / 2)
    assert lr_factor(4000, "inverse_sqrt", peak, warmup, 10 ** 6) == pytest.approx(1.0)
    assert lr_factor(16000, "inverse_sqrt", peak, warmup, 10 ** 6) == pytest.approx(0.5)


def test_linear_polynomial_cosine_constant():
    assert lr_factor(10, "linear", 1.0, 10, 110) == pytest.approx(1.0)
    assert lr_factor(60, "linear", 1.0, 10, 110) == pytest.approx(0.5)
    assert lr_factor(110, "linear", 1.0, 10, 110) == pytest.approx(0.0)
    assert lr_factor(60, "polynomial", 1.0, 10, 110, power=2.0) == pytest.approx(0.25)
    assert lr_factor(60, "polynomial", 1.0, 10, 110, end=0.2, power=1.0) == pytest.approx(0.6)
    assert lr_factor(60, "cosine", 1.0, 10, 110) == pytest.approx(0.5)
    assert lr_factor(110, "cosine", 1.0, 10, 110, end=0.1) == pytest.approx(0.1)
    assert lr_factor(5, "constant", 1.0, 10, 110) == pytest.approx(0.5)
    assert lr_factor(500, "constant", 1.0, 10, 110) == 1.0


class _DS(list):
    pass


class _Task:
    def collate(self, samples, gen):
        return samples


def test_accumulation_and_ranks_see_the_same_global_batch():
    ds = _DS(range(100))
    one = data.TrainBatches(_Task(), ds, micro=4, accum=2, world_size=1, rank=0, seed=3)
    two = [data.TrainBatches(_Task(), ds, micro=4, accum=1, world_size=2, rank=r, seed=3) for r in (0, 1)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == 12
    for step in (0, 5, 11, 12, 30):    # across epochs too
        a = one.step_specs(step)
        b = [two[r].step_specs(step)[0] for r in (0, 1)]
        assert [s.indices for s in a] == [s.indices for s in b]
        assert [s.seed for s in a] == [s.seed for s in b]       # same augmentation per example
    epoch0 = [i for s in range(12) for spec in one.step_specs(s) for i in spec.indices]
    assert len(set(epoch0)) == 96                                  # no example twice within an epoch
    assert one.step_specs(0)[0].indices != one.step_specs(12)[0].indices    # reshuffled next epoch


def test_too_small_dataset_is_a_clear_error():
    from engine.config import ConfigError
    with pytest.raises(ConfigError, match="fewer than one global batch of 64"):
        data.TrainBatches(_Task(), _DS(range(10)), micro=32, accum=1, world_size=2, rank=0, seed=0)


def test_eval_shards_pad_evenly_and_reassemble():
    n, world = 11, 3
    shards = [data.eval_specs(n, 2, world, r) for r in range(world)]
    counts = [c for _, c in shards]
    assert counts == [4, 4, 4] and len({len(s) for s, _ in shards}) == 1   # same number of forwards per rank
    order = []
    per_rank = [[i for spec in specs for i in spec.indices] for specs, _ in shards]
    for k in range(math.ceil(n / world)):
        for r in range(world):
            order.append(per_rank[r][k])
    assert order[:n] == list(range(n))
