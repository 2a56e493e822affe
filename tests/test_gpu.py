"""GPU paths (NCCL backend, fp16 loss scaling, bf16, FusedAdam's CUDA kernel).  Skipped without a CUDA device;
run them on a GPU machine with `pytest -m gpu`."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import TINY, metrics, run

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("config", ["zero2_fp16", "zero3_bf16", "zero2"])
def test_gpu_run(tmp_path, config):
    out = tmp_path / config
    args = [a for a in TINY if a not in ("--optim.impl", "torch")]      # the fused CUDA optimizer
    proc = run([*args, "--output_dir", str(out), "--ds_config", f"ds_configs/{config}.json",
                "--train.max_steps", "6", "--train.micro_batch_size", "16", "--task.max_eval_examples", "100"],
               nproc=min(2, torch.cuda.device_count()), launcher="deepspeed", DS_ACCELERATOR="cuda")
    assert "backend nccl" in proc.stdout
    train = metrics(out)
    assert len(train) == 6 and all(math.isfinite(r["loss"]) for r in train)
    assert metrics(out, "eval")[-1]["accuracy"] >= 0
