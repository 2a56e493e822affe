"""The fused, chunked R-Drop token loss (engine/fused_loss.py) against the unfused engine.losses on full logits:
values and gradients (padding, label smoothing, tied embeddings, bf16, awkward chunk sizes, both strategies), the
Task contract integration, memory (saved tensors and peak RSS), and a real ZeRO-3 DeepSpeed engine."""
from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import fused_loss, losses
from engine.task import Task, TaskOutput
from tests.helpers import ROOT

N, H, V = 10, 8, 37


def reference(hidden, weight, bias, target, mask, eps, kind):
    """The unfused loss exactly as the engine computes it on full logits (float32)."""
    z = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    n = target.shape[0]
    nll = losses.nll_loss(z[:n], target, mask, eps) + losses.nll_loss(z[n:], target, mask, eps)
    if kind == "kl":
        return nll, losses.symmetric_kl(z[:n], z[n:], mask)
    if kind == "fd":
        return nll, losses.squared_l2(z[:n], z[n:], mask)
    return nll, None


def inputs(seed=0, n=N, dtype=torch.float32, bias=True, pad=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * n, H, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    target = torch.randint(0, V, (n,), generator=g)
    mask = (torch.rand(n, generator=g) < 0.3) if pad else None
    if pad:
        mask[0] = True
        target = target.masked_fill(mask, -100)          # garbage ids at padding must not matter
    return hidden, weight, b, target, mask


def grads(nll, cons, params, g_n=0.7, g_c=1.9):
    total = g_n * nll + (g_c * cons if cons is not None else 0.0)
    return torch.autograd.grad(total, [p for p in params if p is not None], retain_graph=True)


def close(a, b, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("strategy", ["recompute", "forward"])
@pytest.mark.parametrize("kind", ["kl", "fd", None])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [3, 64])               # 3 does not divide N = 10; 64 > N (one partial chunk)
def test_values_and_gradients_equal_unfused(strategy, kind, eps, chunk):
    hidden, weight, bias, target, mask = inputs()
    ref = reference(hidden, weight, bias, target, mask, eps, kind)
    got = fused_loss.fused_token_loss(hidden, weight, target, mask, bias, eps, kind, chunk_size=chunk,
                                      strategy=strategy)
    close(got[0], ref[0])
    assert (got[1] is None) == (kind is None)
    if kind is not None:
        close(got[1], ref[1])
    for g_n, g_c in ((0.7, 1.9), (1.0, 0.0), (0.0, 1.0)):     # any pair of gradient outputs
        if kind is None and g_n == 0:
            continue
        want = grads(*ref, (hidden, weight, bias), g_n, g_c)
        have = grads(*got, (hidden, weight, bias), g_n, g_c)
        for w, h_ in zip(want, have):
            close(h_, w)


def test_unused_consistency_output_and_no_padding_no_bias():
    hidden, weight, _, target, _ = inputs(bias=False, pad=False)
    ref_nll, _ = reference(hidden, weight, None, target, None, 0.1, "kl")
    nll, cons = fused_loss.fused_token_loss(hidden, weight, target, None, None, 0.1, "kl", chunk_size=4)
    close(nll, ref_nll)
    want = torch.autograd.grad(ref_nll, (hidden, weight))
    have = torch.autograd.grad(nll, (hidden, weight))          # cons never used: its grad output is None
    for w, h_ in zip(want, have):
        close(h_, w)


def test_tied_embeddings_gradient_accumulates_from_both_uses():
    """The projection IS the input embedding: its gradient is the sum of the lookup's and the loss's."""
    def run(fused):
        torch.manual_seed(0)
        emb = nn.Embedding(V, H)
        mix = nn.Linear(H, H)
        ids = torch.randint(0, V, (2, 5))
        target = torch.randint(0, V, (2, 5))
        mask = torch.zeros(2, 5, dtype=torch.bool)
        mask[1, 3:] = True
        hidden = torch.tanh(mix(emb(torch.cat([ids, ids]))))           # [2B, T, H], copy a then copy b
        if fused:
            nll, cons = fused_loss.fused_token_loss(hidden, emb.weight, target, mask, None, 0.1, "kl", chunk_size=3)
        else:
            nll, cons = reference(hidden.reshape(-1, H), emb.weight, None, target.reshape(-1), mask.reshape(-1),
                                  0.1, "kl")
        (nll + 5.0 * cons).backward()
        return nll.detach(), cons.detach(), emb.weight.grad, mix.weight.grad
    for a, b in zip(run(True), run(False)):
        close(a, b)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_bf16_inputs_are_computed_in_float32(weight_dtype):
    hidden, weight, bias, target, mask = inputs(dtype=torch.bfloat16)
    weight = weight.detach().to(weight_dtype).requires_grad_()
    ref = reference(hidden, weight, bias, target, mask, 0.1, "kl")      # float32 maths on the bf16 values
    got = fused_loss.fused_token_loss(hidden, weight, target, mask, bias, 0.1, "kl", chunk_size=3)
    assert got[0].dtype == torch.float32
    close(got[0], ref[0])
    close(got[1], ref[1])
    want = grads(*ref, (hidden, weight, bias))
    have = grads(*got, (hidden, weight, bias))
    assert have[0].dtype == torch.bfloat16 and have[1].dtype == weight_dtype
    for w, h_ in zip(want, have):
        close(h_, w, rtol=1e-2, atol=1e-2)          # same float32 values, each rounded once to bf16


def test_single_copy_variant_and_per_token_nll():
    hidden, weight, bias, target, mask = inputs()
    h1 = hidden[:N]
    z = F.linear(h1, weight, bias)
    ref = losses.nll_loss(z, target, mask, 0.1)
    nll, cons = fused_loss.fused_token_loss(h1, weight, target, mask, bias, 0.1, None, copies=1, chunk_size=4)
    assert cons is None
    close(nll, ref)
    for w, h_ in zip(torch.autograd.grad(ref, (hidden, weight, bias)), torch.autograd.grad(nll, (hidden, weight, bias))):
        close(h_, w)
    rows = fused_loss.per_token_nll(h1, weight, target, mask, bias, 0.1, chunk_size=3)
    assert rows.shape == target.shape and rows[mask].eq(0).all()
    close(rows.sum(), ref)
    with pytest.raises(ValueError, match="copies=2"):
        fused_loss.fused_token_loss(h1, weight, target, mask, bias, 0.1, "kl", copies=1)


# -- the Task contract ---------------------------------------------------------------------------------------
class _Cfg:
    label_smoothing = 0.1


class _TokenTask(Task):
    def __init__(self):
        self.cfg = _Cfg()


class _TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, H)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(H, V)

    def get_output_embeddings(self):
        return self.out


@pytest.mark.parametrize("consistency", ["kl", "fd", None])
def test_task_loss_and_rdrop_terms_use_the_fused_path(consistency):
    """The same model and dropout masks: TaskOutput with hidden + head gives the default task losses."""
    from engine import rdrop
    task = _TokenTask()
    model = _TinyLM()
    head = fused_loss.attach(model, chunk_size=3)
    assert fused_loss.find(model) is head and "fused_token_loss" not in "".join(model.state_dict())
    ids = torch.randint(0, V, (3, 4))
    target = torch.randint(0, V, (3, 4))
    pad = torch.zeros(3, 4, dtype=torch.bool)
    pad[2, 2:] = True
    batch = rdrop.double_batch({"ids": ids, "target": target, "pad": pad})
    results = []
    for fused in (True, False):
        torch.manual_seed(3)
        hidden = model.drop(model.emb(batch["ids"]))
        out = (TaskOutput(None, batch["target"], batch["pad"], hidden=hidden, head=head) if fused else
               TaskOutput(model.out(hidden), batch["target"], batch["pad"]))
        nll, cons = task.rdrop_terms(out, consistency)
        single = task.loss(out.split()[0])
        model.zero_grad()
        (nll + (2.0 * cons if cons is not None else 0) + single).backward()
        results.append([nll.detach(), single.detach(), model.out.weight.grad.clone(), model.emb.weight.grad.clone()]
                       + ([cons.detach()] if cons is not None else []))
        a, b = out.split()
        assert a.target.shape == (3, 4) and (a.hidden is None) != fused and b.head is (head if fused else None)
        with torch.no_grad():
            close(out.scores(), model.out(hidden))                  # evaluation logits either way
    for f, u in zip(*results):
        close(f, u)


def test_extra_logits_bias_buffer_like_bart():
    """BART adds a final_logits_bias buffer [1, V] after its (bias-free, tied) lm_head."""
    model = _TinyLM()
    model.register_buffer("final_logits_bias", torch.randn(1, V))
    head = fused_loss.attach(model, extra_bias="final_logits_bias", chunk_size=4)
    hidden = torch.randn(2 * N, H, requires_grad=True)
    target = torch.randint(0, V, (N,))
    z = model.out(hidden) + model.final_logits_bias
    ref = losses.nll_loss(z[:N], target, None, 0.1) + losses.nll_loss(z[N:], target, None, 0.1) + \
        losses.symmetric_kl(z[:N], z[N:])
    nll, cons = head(hidden, target, None, 0.1, "kl")
    close(nll + cons, ref)
    params = (hidden, model.out.weight, model.out.bias)
    for w, h_ in zip(torch.autograd.grad(ref, params), torch.autograd.grad(nll + cons, params)):
        close(h_, w)


def test_fused_output_refuses_a_task_that_overrides_the_loss():
    class Custom(_TokenTask):
        def consistency(self, a, b):
            return losses.squared_l2(a.logits, b.logits, a.pad_mask)
    model = _TinyLM()
    head = fused_loss.attach(model)
    out = TaskOutput(None, torch.zeros(2, 3, dtype=torch.long), None, hidden=torch.randn(2, 3, H), head=head)
    with pytest.raises(TypeError, match="overrides consistency"):
        Custom().rdrop_terms(out)


def test_want_fused_flag():
    assert fused_loss.want_fused("auto", 32000) and not fused_loss.want_fused("auto", 1000)
    assert not fused_loss.want_fused("off", 32000) and fused_loss.want_fused(True, 10)
    assert fused_loss.default_chunk_size(32768) == 128


# -- memory ----------------------------------------------------------------------------------------------------
def _saved_bytes(fn) -> tuple[int, int]:
    """(total bytes, largest numel) of the tensors autograd saves for backward while ``fn`` runs."""
    sizes = []

    def pack(t):
        sizes.append((t.numel() * t.element_size(), t.numel()))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(s for s, _ in sizes), max((n for _, n in sizes), default=0)


def test_saved_tensors_hold_no_logits():
    n, v, h = 256, 4096, 16
    hidden = torch.randn(2 * n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    target = torch.randint(0, v, (n,))
    mask = torch.rand(n) < 0.1
    inputs_bytes = (hidden.numel() + weight.numel()) * 4
    fused_bytes, fused_max = _saved_bytes(
        lambda: fused_loss.fused_token_loss(hidden, weight, target, mask, None, 0.1, "kl"))
    unfused_bytes, unfused_max = _saved_bytes(lambda: reference(hidden, weight, None, target, mask, 0.1, "kl"))
    logits_numel = 2 * n * v
    assert fused_max < logits_numel / 8 and fused_bytes <= inputs_bytes + 16 * n
    # the check can fail: the unfused loss keeps several [2N, V] tensors
    assert unfused_max >= logits_numel / 2 and unfused_bytes > 4 * logits_numel * 2


def test_peak_rss_of_fused_is_a_fraction_of_unfused():
    """Peak resident memory of one forward+backward, a fresh process per side (benchmarks/fused_loss.py --worker),
    both at once: 1024 rows x V 16384, i.e. 64 MB per full-logits tensor; the fused chunk is 64 tokens per copy."""
    args = ["--tokens", "512", "--vocab", "16384", "--hidden", "64", "--iters", "0", "--threads", "1", "--chunk", "64"]
    procs = {side: subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "fused_loss.py"), "--worker", side, *args],
                                    cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for side in ("unfused", "fused_recompute")}
    peak = {}
    for side, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        peak[side] = json.loads(out.strip().splitlines()[-1])["peak_delta_mb"]
    assert peak["unfused"] > 300, peak             # the reference really holds several logits-sized tensors
    assert peak["fused_recompute"] < 0.25 * peak["unfused"], peak


# -- ZeRO-3 ----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def world_of_one(monkeypatch):
    import deepspeed
    port = _free_port()
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                     DS_ACCELERATOR="cpu").items():
        monkeypatch.setenv(k, v)
    started = not torch.distributed.is_initialized()
    if started:
        deepspeed.init_distributed(dist_backend="gloo")
    yield
    gc.collect()
    if started:
        torch.distributed.destroy_process_group()
    for f in os.listdir("/dev/shm"):
        if f.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in f:
            os.unlink(os.path.join("/dev/shm", f))


def test_zero3_partitioned_tied_projection_matches_unfused(world_of_one):
    """A tiny GPT-2 (lm_head tied to wte) built through models/hf.py under HfDeepSpeedConfig, ZeRO-3 with every
    parameter partitioned (persistence threshold 0): the projection weight has numel 0 when the fused loss is
    called, and loss values and the SGD-updated weights after two steps equal the unfused run's."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    from models import hf

    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
          "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": False}}
    cfg = GPT2Config(vocab_size=97, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.1,
                     embd_pdrop=0.1, attn_pdrop=0.0)
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(2))
    pad = torch.zeros(4, 12, dtype=torch.bool)
    pad[0, 8:] = pad[2, 5:] = True

    def train(fused):
        torch.manual_seed(0)
        model = hf.build(GPT2LMHeadModel, cfg, ds)
        if fused:
            fused_loss.attach(model, chunk_size=5)
        assert model.lm_head.weight is model.transformer.wte.weight
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                                          config=ds)

        def weights():
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                return {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        start, values = weights(), []
        for step in range(2):
            torch.manual_seed(10 + step)                  # the same dropout masks on both sides
            x = torch.cat([ids, ids])
            if fused:
                hidden = engine.module.transformer(input_ids=x).last_hidden_state
                head = fused_loss.find(engine)
                assert head.weight.ds_status == ZeroParamStatus.NOT_AVAILABLE and head.weight.numel() == 0
                nll, cons = head(hidden, target, pad, 0.1, "kl")
            else:
                z = engine(input_ids=x).logits
                nll = losses.nll_loss(z[:4], target, pad, 0.1) + losses.nll_loss(z[4:], target, pad, 0.1)
                cons = losses.symmetric_kl(z[:4], z[4:], pad)
            engine.backward(nll + 5.0 * cons)
            engine.step()
            values.append((nll.item(), cons.item()))
        end = weights()
        if fused:                                         # evaluation helpers gather the partitioned weight
            with torch.no_grad():
                engine.eval()
                hid = engine.module.transformer(input_ids=ids).last_hidden_state
                lg = fused_loss.find(engine).logits(hid)
                rows = fused_loss.find(engine).token_nll(hid, target, pad, 0.1)
                close(rows.sum(), losses.nll_loss(lg, target, pad, 0.1))
        del engine, model
        gc.collect()
        return values, start, end

    try:
        ref, fus = train(False), train(True)
    finally:
        unset_hf_deepspeed_config()
    assert ref[0][0][1] > 0                              # dropout made the copies differ
    for (un, uc), (fn, fc) in zip(ref[0], fus[0]):
        assert fn == pytest.approx(un, rel=1e-5) and fc == pytest.approx(uc, rel=1e-4, abs=1e-7)
    for name, w0 in ref[1].items():
        torch.testing.assert_close(fus[1][name], w0, rtol=0, atol=0, msg=name)        # the same start
        torch.testing.assert_close(fus[2][name], ref[2][name], rtol=1e-5, atol=1e-6, msg=name)
    assert (ref[2]["transformer.wte.weight"] - ref[1]["transformer.wte.weight"]).abs().max() > 1e-3
