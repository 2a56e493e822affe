"""GPU paths: NCCL, fp16 loss scaling and bf16 configs, DeepSpeed's FusedAdam CUDA kernel, torch SDPA attention in
the HF models, the fused token loss on the device, activation checkpointing with R-Drop under CUDA's RNG, and the
token tasks' runs.  Skipped without a CUDA device; run them on a GPU machine with `pytest -m gpu`.

RDROP_GPU_TESTS_ON_CPU=1 runs the device-generic tests on the CPU instead (a check of the test code itself on a
machine without a GPU; the fp16, NCCL and FusedAdam ones stay skipped)."""
from __future__ import annotations

import math
import os

import pytest
import torch

from tests.helpers import DATA, TINY, metrics, run

ON_CPU = os.environ.get("RDROP_GPU_TESTS_ON_CPU") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (HAS_CUDA or ON_CPU), reason="needs a CUDA GPU")]
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a real CUDA device (fp16, NCCL, FusedAdam)")
MULTI30K = DATA / "multi30k"


@needs_cuda
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


@pytest.mark.skipif(not (MULTI30K / "train.de.gz").is_file(), reason="../shared/data/multi30k not present")
@pytest.mark.parametrize("config", ["zero2_bf16", "zero2_fp16", "zero3_bf16"])
def test_translation_fused_runs_in_half_precision_and_equals_unfused(tmp_path, config):
    """A 32k-symbol target vocabulary is not needed to fuse: --task.fused_loss true on the tiny model, checked
    against false; the fused loss computes in float32 from bf16/fp16 hidden states, so the two agree to half
    precision rounding of the model, not of the loss."""
    if "fp16" in config and not HAS_CUDA:
        pytest.skip("fp16 needs a CUDA device")
    accel, backend = ("cuda", "nccl") if HAS_CUDA else ("cpu", "gloo")
    common = [*([] if HAS_CUDA else ["--optim.impl", "torch"]),"--task", "translation", "--task.data_dir", str(MULTI30K), "--task.source_lang", "de",
              "--task.target_lang", "en", "--task.model", "tiny", "--task.vocab_size", "600",
              "--task.max_train_examples", "800", "--train.max_tokens", "600", "--task.eval_generate", "false",
              "--ds_config", f"ds_configs/{config}.json", "--train.max_steps", "4", "--train.grad_accum", "2",
              "--optim.lr", "2e-3", "--optim.warmup_steps", "2", "--log.every_steps", "1",
              "--log.progress", "false", "--rdrop.alpha", "5", "--task.cache_dir", str(tmp_path / "bpe")]
    runs = {}
    for fused in ("true", "false"):
        out = tmp_path / f"{config}-{fused}"
        proc = run([*common, "--output_dir", str(out), "--task.fused_loss", fused], nproc=1, launcher="deepspeed",
                   DS_ACCELERATOR=accel)
        assert f"backend {backend}" in proc.stdout and ("fused loss: on" in proc.stdout) == (fused == "true")
        runs[fused] = metrics(out)
    for a, b in zip(runs["true"], runs["false"]):
        assert math.isfinite(a["loss"]) and a["consistency"] > 0
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2), (a, b)


@needs_cuda
def test_deepspeed_fused_adam_is_used_and_matches_torch_adamw():
    from deepspeed.ops.adam import FusedAdam
    torch.manual_seed(0)
    w = torch.randn(1000, 64, device="cuda")
    grads = [torch.randn_like(w) for _ in range(3)]
    results = []
    for cls in (FusedAdam, torch.optim.AdamW):
        p = torch.nn.Parameter(w.clone())
        opt = cls([p], lr=1e-2, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results.append(p.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
    # and the engine picks it: --optim.impl fused (the default) on a GPU
    from engine.config import parse_args
    from engine.ds_config import load, optimizer_block, resolve
    cfg = parse_args(["--task", "image_classification", "--output_dir", "/tmp/x", "--ds_config",
                      "ds_configs/zero2.json"])
    ds = resolve(load("ds_configs/zero2.json"), cfg, 1, "zero2", on_cpu=False)
    assert ds["optimizer"] == optimizer_block(cfg) and ds["optimizer"]["params"]["torch_adam"] is False


# -- device-generic (RDROP_GPU_TESTS_ON_CPU=1 runs them on the CPU) ----------------------------------------------
def test_hf_models_use_sdpa_and_match_eager_attention():
    from models import bart
    torch.manual_seed(0)
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    def cfg():
        return bart.bart_config("bart_tiny", 100, dropout=0.0, attention_dropout=0.0)
    sdpa = bart.build_bart(cfg(), {}).to(DEVICE, dtype).eval()
    eager = bart.bart_class()._from_config(cfg(), attn_implementation="eager").to(DEVICE, dtype).eval()
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(4, 100, (3, 9), device=DEVICE)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        a = sdpa(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5]).logits.float()
        b = eager(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5]).logits.float()
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_on_the_device_equals_unfused_and_saves_memory(dtype):
    from engine import fused_loss, losses
    torch.manual_seed(0)
    n, h, v = 512, 64, 32000
    hidden = torch.randn(2 * n, h, device=DEVICE).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=DEVICE) * h ** -0.5).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), device=DEVICE)
    mask = torch.rand(n, device=DEVICE) < 0.1

    def unfused():
        z = torch.nn.functional.linear(hidden.float(), weight.float())
        nll = losses.nll_loss(z[:n], target, mask, 0.1) + losses.nll_loss(z[n:], target, mask, 0.1)
        return nll, losses.symmetric_kl(z[:n], z[n:], mask)

    def fused():
        return fused_loss.fused_token_loss(hidden, weight, target, mask, None, 0.1, "kl")

    out = {}
    for name, fn in (("fused", fused), ("unfused", unfused)):
        if HAS_CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        nll, cons = fn()
        g = torch.autograd.grad(nll + 5.0 * cons, (hidden, weight))
        peak = torch.cuda.max_memory_allocated() - base if HAS_CUDA else 0
        out[name] = (nll.detach(), cons.detach(), g, peak)
    (fn_, fc, fg, fp), (un, uc, ug, up) = out["fused"], out["unfused"]
    torch.testing.assert_close(fn_, un, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(fc, uc, rtol=1e-3, atol=1e-3)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for a, b in zip(fg, ug):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item())
    if HAS_CUDA:
        assert fp < 0.25 * up, (fp, up)          # max allocated during forward + backward


@pytest.mark.parametrize("task_name", ["translation", "summarization"])
def test_activation_checkpointing_with_rdrop_on_the_device(task_name):
    """CUDA's RNG: the recomputation replays each layer's dropout masks (torch.utils.checkpoint saves and restores
    the device RNG state), and the two halves of the doubled batch keep distinct masks."""
    from engine import rdrop
    from engine.trainer import enable_activation_checkpointing
    from tests import test_seq2seq_fused as t
    task, model = (t._translation if task_name == "translation" else t._summarization)()
    task.setup_fused_loss(model, t.V)
    model.to(DEVICE)
    batch = {k: v.to(DEVICE) for k, v in rdrop.double_batch(t._batch(task.layout, seed=5)).items()}
    results = []
    for ckpt in (False, True):
        if ckpt:
            enable_activation_checkpointing(model)
        model.train()
        torch.manual_seed(11)
        nll, cons = task.rdrop_terms(task.forward(model, batch), "kl")
        model.zero_grad()
        (nll + 5.0 * cons).backward()
        results.append((nll.item(), cons.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None}))
    (n0, c0, g0), (n1, c1, g1) = results
    assert c0 > 1e-4 and c1 == pytest.approx(c0, rel=1e-5) and n1 == pytest.approx(n0, rel=1e-5)
    scale = max(g.abs().max().item() for g in g0.values())
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
