"""Deterministic batching: which examples every rank sees at every micro-step, as a pure function of the step.

Optimizer step k of epoch e takes global batch ``perm_e[k*G:(k+1)*G]`` (G = micro x accum x world, perm_e a
permutation seeded by (seed, e)); micro-step j of rank r takes the slice ``(j * world + r) * micro``.  So one rank
with accumulation 2 and two ranks with accumulation 1 see the same examples per optimizer step, and a resumed run
sees exactly what the uninterrupted run would have seen.  Augmentation gets a torch.Generator seeded by
(seed, step, chunk), so it is reproducible whatever the number of DataLoader workers.

Token batching (``--train.max_tokens``, fairseq's ``--max-tokens``): the task reports per-example sizes through
``Task.example_sizes``; :func:`batch_by_size` packs them once per run the way fairseq does (random tie-break, stable
sort by the size columns, greedy fill while rows x longest example <= max_tokens, padding included), the list of
batches is reshuffled every epoch with a seed of (seed, epoch), and the same deal-out over ranks and micro-steps
applies: micro-batch c of a step goes to rank c % world.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import ConfigError


@dataclass(frozen=True)
class BatchSpec:
    indices: tuple
    seed: int | None        # None: no augmentation (evaluation)


def _perm(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def as_sizes(sizes) -> np.ndarray:
    """Example sizes as an int64 array [N, K] (K >= 1 columns)."""
    arr = np.asarray(sizes, dtype=np.int64)
    return arr.reshape(-1, 1) if arr.ndim == 1 else arr


def ordered_indices(sizes, seed: int) -> np.ndarray:
    """fairseq's LanguagePairDataset.ordered_indices: a seeded random permutation (the tie-break), then stable
    sorts by the last column, ..., the first column, so the first column is the primary key."""
    sizes = as_sizes(sizes)
    order = np.random.RandomState(seed % (2 ** 32)).permutation(len(sizes))
    for col in reversed(range(sizes.shape[1])):
        order = order[np.argsort(sizes[order, col], kind="mergesort")]
    return order


def batch_by_size(sizes, max_tokens: int, seed: int, bsz_mult: int = 1) -> list[list[int]]:
    """fairseq's batch_by_size over ``ordered_indices``: consecutive examples join a batch while
    (rows + 1) x (longest example so far) <= max_tokens, the longest counted over all size columns (fairseq's
    num_tokens = max(source, target)).  With ``bsz_mult`` > 1 a full batch is cut to a multiple of it (fairseq's
    --required-batch-size-multiple) and the rest starts the next one.  An example longer than max_tokens is
    left out (the caller reports it); every other example is in exactly one batch."""
    sizes = as_sizes(sizes)
    num_tokens = sizes.max(axis=1)
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in ordered_indices(sizes, seed).tolist():
        n = int(num_tokens[i])
        if n > max_tokens:
            continue
        if cur and (len(cur) + 1) * max(longest, n) > max_tokens:
            cut = len(cur) if len(cur) < bsz_mult else len(cur) - len(cur) % bsz_mult
            batches.append(cur[:cut])
            cur = cur[cut:]
            longest = int(num_tokens[cur].max()) if cur else 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


def padding_ratio(sizes, batches: list[list[int]]) -> float:
    """Share of padded positions when every column of a batch is padded to its longest example."""
    sizes = as_sizes(sizes)
    real = padded = 0
    for b in batches:
        s = sizes[b]
        real += int(s.sum())
        padded += len(b) * int(s.max(axis=0).sum())
    return 1.0 - real / max(padded, 1)


class TokenBatches:
    """The run's token batches (built once from the sizes and the seed), reshuffled per epoch."""

    def __init__(self, sizes, max_tokens: int, seed: int):
        sizes = as_sizes(sizes)
        self.batches = batch_by_size(sizes, max_tokens, seed)
        self.num_examples = len(sizes)
        self.dropped = int((sizes.max(axis=1) > max_tokens).sum())
        self.pad_ratio = padding_ratio(sizes, self.batches)
        self.seed = seed
        self._cache: tuple = (None, None)

    def epoch(self, epoch: int) -> list[list[int]]:
        if self._cache[0] != epoch:
            batches = list(self.batches)
            random.Random(self.seed * 100_003 + epoch).shuffle(batches)
            self._cache = (epoch, batches)
        return self._cache[1]


class TrainBatches:
    """Micro-batch specs for one rank.  ``steps_per_epoch`` optimizer steps per epoch (the remainder is dropped).
    ``max_tokens`` > 0 batches by tokens (the task's ``example_sizes``), else by ``micro`` examples."""

    def __init__(self, task, dataset, micro: int, accum: int, world_size: int, rank: int, seed: int,
                 max_tokens: int = 0):
        self.task, self.dataset, self.micro, self.accum = task, dataset, micro, accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.tokens: TokenBatches | None = None
        n = len(dataset)
        if n == 0:
            raise ConfigError("the training split is empty: point the task at data with examples")
        if max_tokens:
            sizes = task.example_sizes(dataset)
            if sizes is None:
                raise ConfigError("--train.max_tokens is set but this task batches by examples: use "
                                  "--train.micro_batch_size N instead")
            self.tokens = TokenBatches(sizes, max_tokens, seed)
            if not self.tokens.batches:
                raise ConfigError(f"every training example is longer than --train.max_tokens {max_tokens}: "
                                  "raise --train.max_tokens")
            self.steps_per_epoch = len(self.tokens.batches) // (accum * world_size)
            if self.steps_per_epoch == 0:
                raise ConfigError(f"the training split makes {len(self.tokens.batches)} token batches, fewer than "
                                  f"ranks x --train.grad_accum = {accum * world_size}: lower --train.max_tokens or "
                                  "use fewer ranks")
        else:
            global_batch = micro * accum * world_size
            if n < global_batch:
                raise ConfigError(f"the training split has {n} examples, fewer than one global batch of {global_batch}"
                                  " (micro x accum x world): lower --train.micro_batch_size or --train.grad_accum")
            self.steps_per_epoch = n // global_batch

    _last: tuple = (None, None)

    def step_specs(self, step: int) -> list[BatchSpec]:
        """The ``accum`` micro-batch specs this rank runs at optimizer step ``step`` (0-based).  The loader asks
        once per micro-batch, so the last step's specs are kept."""
        if self._last[0] != step:
            self._last = (step, self._step_specs(step))
        return self._last[1]

    def _step_specs(self, step: int) -> list[BatchSpec]:
        epoch, k = divmod(step, self.steps_per_epoch)
        per_step = self.accum * self.world_size
        if self.tokens is not None:
            chunks = self.tokens.epoch(epoch)[k * per_step:(k + 1) * per_step]
        else:
            perm = self._epoch_perm(epoch)
            start = k * self.micro * per_step
            chunks = [perm[start + c * self.micro:start + (c + 1) * self.micro] for c in range(per_step)]
        # chunk c = j * world + rank; its augmentation seed depends on c, not on (j, rank), so every layout of
        # the same global batch (1 rank x accum 2, 2 ranks x accum 1) augments each example identically
        return [BatchSpec(tuple(chunks[c]), hash((self.seed, step, c)) % (2 ** 62))
                for c in (j * self.world_size + self.rank for j in range(self.accum))]

    _cache: tuple = (None, None)

    def _epoch_perm(self, epoch: int) -> list[int]:
        if self._cache[0] != epoch:
            self._cache = (epoch, _perm(len(self.dataset), self.seed, epoch))
        return self._cache[1]

    def collate(self, spec: BatchSpec) -> dict:
        gen = torch.Generator().manual_seed(spec.seed) if spec.seed is not None else None
        return self.task.collate([self.dataset[i] for i in spec.indices], gen)


def eval_specs(n: int, batch_size: int, world_size: int, rank: int) -> tuple[list[BatchSpec], int]:
    """Rank ``rank`` evaluates examples rank, rank + W, ... of a list padded to a multiple of W (every rank runs the
    same number of forwards, which ZeRO-3 needs); returns the specs and how many examples this rank holds."""
    if n == 0:
        raise ConfigError("the evaluation split is empty: point the task at data with examples")
    padded = -(-n // world_size) * world_size
    mine = [i % n for i in range(rank, padded, world_size)]
    specs = [BatchSpec(tuple(mine[i:i + batch_size]), None) for i in range(0, len(mine), batch_size)]
    return specs, len(mine)


def loader(specs, collate, num_workers: int):
    """Batches for ``specs`` through a DataLoader (workers optional; order is the specs' order)."""
    # An own generator: creating the iterator would otherwise draw from the global torch RNG and shift the
    # dropout stream, so a resumed run (or one that evaluated at another step) would diverge.
    return torch.utils.data.DataLoader(specs, batch_size=None, shuffle=False, collate_fn=collate,
                                       num_workers=num_workers, persistent_workers=False,
                                       generator=torch.Generator().manual_seed(0))
