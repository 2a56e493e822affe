"""Deterministic batching: which examples every rank sees at every micro-step, as a pure function of the step.

Optimizer step k of epoch e takes global batch ``perm_e[k*G:(k+1)*G]`` (G = micro x accum x world, perm_e a
permutation seeded by (seed, e)); micro-step j of rank r takes the slice ``(j * world + r) * micro``.  So one rank
with accumulation 2 and two ranks with accumulation 1 see the same examples per optimizer step, and a resumed run
sees exactly what the uninterrupted run would have seen.  Augmentation gets a torch.Generator seeded by
(seed, step, chunk), so it is reproducible whatever the number of DataLoader workers.

Tasks that batch by tokens (translation) provide ``batch_indices(epoch, seed)``: a list of index lists (one per
micro-batch, before sharding); the same deal-out over ranks and micro-steps applies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ConfigError


@dataclass(frozen=True)
class BatchSpec:
    indices: tuple
    seed: int | None        # None: no augmentation (evaluation)


def _perm(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class TrainBatches:
    """Micro-batch specs for one rank.  ``steps_per_epoch`` optimizer steps per epoch (the remainder is dropped)."""

    def __init__(self, task, dataset, micro: int, accum: int, world_size: int, rank: int, seed: int):
        self.task, self.dataset, self.micro, self.accum = task, dataset, micro, accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.custom = hasattr(dataset, "batch_indices")
        n = len(dataset)
        if n == 0:
            raise ConfigError("the training split is empty: point the task at data with examples")
        if self.custom:
            self.steps_per_epoch = len(dataset.batch_indices(0, seed)) // (accum * world_size)
            if self.steps_per_epoch == 0:
                raise ConfigError("the training split has fewer token batches than ranks x --train.grad_accum: "
                                  "lower the batch size or use fewer ranks")
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
        if self.custom:
            chunks = self.dataset.batch_indices(epoch, self.seed)[k * per_step:(k + 1) * per_step]
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
