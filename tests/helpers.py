"""Running the real entry point the way users do: no launcher, the `deepspeed` launcher, torchrun."""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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
