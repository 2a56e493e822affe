"""Running the real entry point the way users do: no launcher, the `deepspeed` launcher, torchrun; and short
engine runs inside the test process (the ``world`` fixture + ``train_in_process``)."""
from __future__ import annotations

import gc
import glob
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PY = sys.executable
BIN = Path(PY).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu",
             PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    e.setdefault("OMP_NUM_THREADS", "1")
    e.update({k: str(v) for k, v in extra.items()})
    return e


TINY = ["--task", "image_classification", "--task.model", "tiny", "--optim.impl", "torch",
        "--log.every_steps", "1", "--log.progress", "false", "--eval.every_steps", "0"]


def run(args: list[str], nproc: int = 1, launcher: str = "python", timeout: int = 300, check: bool = True,
        **extra_env) -> subprocess.CompletedProcess:
    """Run engine.train with ``args`` under ``launcher`` (python | deepspeed | torchrun)."""
    port = free_port()
    if launcher == "python":
        cmd = [PY, "-m", "engine.train", *args]
    elif launcher == "deepspeed":
        cmd = [PY, str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port),
               "--module", "engine.train", *args]
    elif launcher == "torchrun":
        cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
               "-m", "engine.train", *args]
    else:
        raise ValueError(launcher)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    leaked = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    for f in leaked:       # keep the machine clean even when the assertion below fails
        os.unlink(f)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
        assert not leaked, f"DeepSpeed shm buffers left behind: {leaked}"
    return proc


def metrics(out_dir, kind: str = "train") -> list[dict]:
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def load_weights(out_dir) -> dict:
    from safetensors.torch import load_file
    return load_file(str(Path(out_dir) / "hf_model" / "model.safetensors"))


# -- short engine runs, in process -------------------------------------------------------------------------
def forget_deepspeed_groups():
    """DeepSpeed caches process groups (deepspeed.utils.groups); a world destroyed through torch.distributed (as
    other in-process tests and engine.distributed.shutdown do) leaves them pointing at a dead group."""
    from deepspeed.utils import groups
    release = getattr(groups, "_release_process_group_references", None)
    if release is not None:
        release()


@pytest.fixture(scope="module")
def world():
    """A one-rank process group for in-process engine runs (import it into a test module to use it)."""
    from engine import distributed as du
    forget_deepspeed_groups()
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                            "DS_ACCELERATOR")}
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port()))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(k, None)
    w = du.init()
    yield w
    gc.collect()
    du.shutdown(w)
    forget_deepspeed_groups()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def train_in_process(world, args: list[str], check=None, export: bool = False):
    """engine.train's setup -> fit (-> export) inside this process on ``world``; ``check(trainer)`` runs between
    setup and fit.  Returns the final metrics.  The engine and HF's DeepSpeed config are released afterwards, so
    the next run (another ZeRO stage) starts clean."""
    from engine.config import parse_args
    from engine.trainer import Trainer
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    t = Trainer(parse_args(args), world)
    try:
        t.setup()
        if check is not None:
            check(t)
        final = t.fit()
        if export:
            t.export()
        return final
    finally:
        t.monitor.close() if getattr(t, "monitor", None) else None
        t.engine = t.optimizer = t.scheduler = None
        del t
        gc.collect()
        unset_hf_deepspeed_config()
