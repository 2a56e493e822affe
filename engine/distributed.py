"""Process-group set-up and teardown, whichever launcher started us.

- `deepspeed` launcher / torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are in the environment.
- mpirun: DeepSpeed's MPI discovery (mpi4py) fills them from the MPI communicator.
- no launcher: a world of one on a free loopback port, with no MPI needed.
The backend is the accelerator's (gloo on CPU, nccl on NVIDIA GPUs, ccl where oneCCL is installed).
"""
from __future__ import annotations

import datetime
import gc
import os
import random
import socket
import sys
from dataclasses import dataclass

import numpy as np
import torch

MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_mpi() -> bool:
    return "RANK" not in os.environ and any(v in os.environ for v in MPI_RANK_VARS)


def env_rank() -> int:
    """This process's rank before the process group exists (0 when unknown)."""
    for var in ("RANK",) + MPI_RANK_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_threads(requested: int = 0) -> int:
    """Torch intra-op threads for this rank: the request, else OMP_NUM_THREADS, else cores / local ranks."""
    if requested:
        n = requested
    elif os.environ.get("OMP_NUM_THREADS"):
        n = int(os.environ["OMP_NUM_THREADS"])
    else:
        local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE")
                    or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") or 1)
        n = max(1, len(os.sched_getaffinity(0)) // local)
    torch.set_num_threads(n)
    return n


def init(timeout_s: int = 600) -> World:
    """Initialise torch.distributed through DeepSpeed and return this process's World."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and not launched_by_mpi():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    acc = get_accelerator()
    backend = acc.communication_backend_name()
    # distributed_port: DeepSpeed's MPI discovery would otherwise overwrite MASTER_PORT with 29500, and two
    # mpirun jobs on one host would collide.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=launched_by_mpi(),
                               distributed_port=int(os.environ.get("MASTER_PORT") or 29500),
                               timeout=datetime.timedelta(seconds=timeout_s))
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_size = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    if acc.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        acc.set_device(local_rank)
        device = torch.device(acc.device_name(local_rank))
    return World(rank, world, local_rank, local_size, device, backend)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """A different, reproducible seed per rank (identical masks on every rank would waste data parallelism)."""
    return (seed * 1_000_003 + 7919 * (rank + 1)) % (2 ** 63 - 1)


def rng_state() -> dict:
    """Per-rank RNG state in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()),
                                                    int(np_state[2]), int(np_state[3]), float(np_state[4])),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    if world.world_size > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def all_gather_object(obj, world: World) -> list:
    """Every rank's ``obj`` (small, picklable), in rank order, on every rank."""
    if world.world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    parts = [None] * world.world_size
    torch.distributed.all_gather_object(parts, obj)
    return parts


def broadcast_object(obj, world: World, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if world.world_size == 1 or not torch.distributed.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def gather_problems(problems: list[str], world: World) -> list[str]:
    """Every rank's problem messages, merged (rank order) on every rank: so that all ranks fail together with the
    same one-line message and rank 0, which prints, knows what another rank found."""
    return [p for part in all_gather_object(list(problems), world) for p in part]


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def shm_buffer_path(rank: int) -> str:
    """The shared-memory file DeepSpeed's CPU allreduce op creates for this rank (deepspeed shm.cpp) and never unlinks."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def shutdown(world: World | None, clean: bool = True) -> None:
    """Collect the released engine before interpreter exit (ZeRO-3 otherwise can abort at exit), remove our shm
    buffer, destroy the process group.  The caller drops its references to the engine first."""
    gc.collect()
    if world is not None:
        if clean:
            try:
                barrier()
            except Exception:
                pass
        try:
            os.unlink(shm_buffer_path(world.rank))
        except FileNotFoundError:
            pass
        try:
            torch.distributed.destroy_process_group()
        except Exception:
            pass
        _forget_deepspeed_groups()
    gc.collect()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches groups of the process group it first saw (deepspeed.utils.groups); after destroying it,
    drop them so that a second run in the same process (a notebook, an in-process test) builds fresh ones."""
    try:
        from deepspeed.utils import groups
    except ImportError:
        return
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()


def pin_build_tools() -> str | None:
    """Put this interpreter's ``bin`` first on PATH when it holds ``ninja`` (the pip ``ninja`` package), so every
    process builds DeepSpeed's JIT ops with the same ninja.  Processes started without the venv on PATH (ssh / pdsh
    ranks, a plain ``.venv/bin/python -m engine.train``) otherwise find the system ninja, whose build log records a
    different command hash, so the shared op cache (~/.cache/torch_extensions) is recompiled from scratch (1-4
    minutes per op here) every time the two kinds of process alternate.  Returns the ninja now first on PATH."""
    import shutil
    here = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(here, "ninja")):
        parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and os.path.abspath(p) != here]
        os.environ["PATH"] = os.pathsep.join([here, *parts])
    return shutil.which("ninja")
