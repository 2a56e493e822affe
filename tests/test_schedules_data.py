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


# ------------------------------------------------------------------------------------------------ token batching

def _fairseq_reference(sizes, max_tokens, seed):
    """fairseq's LanguagePairDataset.ordered_indices + data_utils.batch_by_size (batch_by_size_vec, bsz_mult 1),
    written out the way fairseq does it."""
    import numpy as np
    src, tgt = np.array([s for s, _ in sizes]), np.array([t for _, t in sizes])
    indices = np.random.RandomState(seed).permutation(len(sizes))
    indices = indices[np.argsort(tgt[indices], kind="mergesort")]
    indices = indices[np.argsort(src[indices], kind="mergesort")]
    num_tokens = np.maximum(src, tgt)
    batches, cur, longest = [], [], 0
    for i in indices:
        longest_if_added = max(longest, num_tokens[i])
        if cur and (len(cur) + 1) * longest_if_added > max_tokens:
            batches.append(cur)
            cur, longest_if_added = [], num_tokens[i]
        cur.append(int(i))
        longest = longest_if_added
    return batches + ([cur] if cur else [])


def test_batch_by_size_is_fairseqs():
    import random
    rng = random.Random(0)
    sizes = [(rng.randint(2, 60), rng.randint(2, 60)) for _ in range(500)]
    for max_tokens in (64, 300, 1000):
        got = data.batch_by_size(sizes, max_tokens, seed=7)
        assert got == _fairseq_reference(sizes, max_tokens, 7)
        for b in got:
            assert len(b) * max(max(sizes[i]) for i in b) <= max_tokens      # padding included
        assert sorted(i for b in got for i in b) == list(range(500))
    # the first column is the primary sort key: within a batch source lengths are (nearly) equal
    got = data.batch_by_size(sizes, 300, seed=7)
    assert sum(max(sizes[i][0] for i in b) - min(sizes[i][0] for i in b) for b in got) <= len(got)


def test_batch_by_size_leaves_out_overlong_examples_and_rounds_to_a_multiple():
    sizes = [(5, 5)] * 20 + [(50, 3)]
    tb = data.TokenBatches(sizes, 40, seed=1)
    assert tb.dropped == 1 and 20 not in {i for b in tb.batches for i in b}
    assert [len(b) for b in data.batch_by_size([(4,)] * 22, 40, seed=1, bsz_mult=8)] == [8, 8, 6]
    assert tb.pad_ratio == 0.0


def test_token_batches_deal_out_like_example_batches():
    """Two ranks x accumulation 1 and one rank x accumulation 2 see the same token batches per step."""
    class Tok(_Task):
        def example_sizes(self, ds):
            return [(1 + i % 7, 2 + i % 5) for i in range(len(ds))]
    ds = _DS(range(200))
    one = data.TrainBatches(Tok(), ds, 1, 2, 1, 0, seed=5, max_tokens=24)
    two = [data.TrainBatches(Tok(), ds, 1, 1, 2, r, seed=5, max_tokens=24) for r in (0, 1)]
    assert one.steps_per_epoch == two[0].steps_per_epoch > 0
    for step in (0, 3, one.steps_per_epoch + 1):
        assert [s.indices for s in one.step_specs(step)] == [two[r].step_specs(step)[0].indices for r in (0, 1)]
    class ByExamples(_Task):
        def example_sizes(self, ds):
            return None                                   # the Task default: batches by examples
    with pytest.raises(Exception, match="batches by examples"):
        data.TrainBatches(ByExamples(), ds, 1, 1, 1, 0, seed=5, max_tokens=24)
    with pytest.raises(Exception, match="longer than --train.max_tokens"):
        data.TrainBatches(Tok(), ds, 1, 1, 1, 0, seed=5, max_tokens=1)


def test_micro_batch_size_and_max_tokens_have_one_owner():
    from engine.config import ConfigError, parse_args
    base = ["--task", "translation", "--output_dir", "/tmp/x", "--ds_config", "ds_configs/zero2.json",
            "--task.data_dir", "."]
    with pytest.raises(ConfigError, match="both set the batch") as e:
        parse_args(base + ["--train.micro_batch_size", "8", "--train.max_tokens", "2048"])
    assert "\n" not in str(e.value)
    assert parse_args(base).train.max_tokens == 4096                       # the task's default: by tokens
    assert parse_args(base + ["--train.micro_batch_size", "8"]).train.max_tokens == 0   # the user asked examples
    assert parse_args(base + ["--train.max_tokens", "1000"]).train.max_tokens == 1000
