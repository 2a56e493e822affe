"""Fused, memory-bounded R-Drop token loss: label-smoothed NLL of both copies plus the consistency term, computed
from the final hidden states and the output projection in chunks of tokens, so the [2 x tokens, V] logits and
log-probabilities never exist at once (forward and backward).

Why our own code: Liger-Kernel 0.8.5 (fused linear cross-entropy / JSD) and Apple's cut-cross-entropy 25.1.1 both
depend on Triton and run their fused kernels on a GPU only (cut-cross-entropy's non-Triton path is torch.compile of
the full logits).  Neither computes this loss: Liger's fused linear JSD is a beta-mixture Jensen-Shannon divergence
from a student head to a frozen teacher head (no gradient into the teacher), not the symmetric KL between two
row-aligned halves with gradients into both, and both libraries smooth labels with eps/V, not fairseq's eps/(V-1).

The maths is exactly engine.losses (nll_loss on each copy, symmetric_kl / squared_l2 between the copies) on
``logits = hidden @ weight.T + bias``, in float32 whatever the input dtype.  For rows with log-probs l, probs p:
    d nll / d z        = p - q,   q = (1 - eps - eps/(V-1)) onehot(y) + eps/(V-1)     (q = onehot(y) when eps = 0)
    d symKL / d z_a    = (p_a * (l_a - l_b - KL(a||b) + 1) - p_b) / 2                 (symmetrically for z_b)
    d fd / d z_a       = 2 (z_a - z_b) = - d fd / d z_b
Chunk i of copy a (rows i..i+c of the first half) is processed together with chunk i of copy b (the same rows of
the second half), because the consistency needs both.

Design choice, measured (benchmarks/fused_loss.py, 2026-11-25, this 2-core CPU box shared with other jobs, torch 1
thread, V 32000, H 512, 2 x 2048 tokens, label smoothing 0.1, KL, 3 interleaved rounds, fresh process per side):
                     peak RSS delta      CPU time per fwd+bwd (min of 3 rounds; wall time was 2-3x: load 8-15)
    unfused              3255 MB             8.07 s
    recompute             232 MB (0.071x)    6.63 s (0.82x)      <- default
    grad-in-forward       372 MB (0.114x)    7.10 s (0.88x)
``strategy="recompute"`` keeps only the inputs and recomputes each chunk's logits in backward (4 matmuls of the
logits' size: 1 forward, 1 recompute, 2 for the gradients).  ``strategy="forward"`` (Liger's style, nothing
recomputed) must keep one gradient per output, because the hook weights them by (1, alpha) only in backward:
2 x [V, H] + 2 x hidden extra memory and 5 matmuls for R-Drop (3 when there is one output).  Both beat the unfused
loss in CPU time despite more matmul work, presumably because its elementwise passes run over freshly allocated
0.5 GB tensors, while a chunk's buffers are 32 MB and reused (not profiled further).

ZeRO-3: the projection weight is partitioned outside the forward of the module that owns it.  attach() adds a
parameter-less child module (FusedTokenLoss) to the model before deepspeed.initialize and registers the weight (and
bias) as its external parameters (deepspeed.zero.register_external_parameter), so DeepSpeed's hooks gather them for
its forward and again before its backward; the autograd Function saves the Parameter objects themselves, whose data
is full again when backward runs.  Evaluation-only helpers (logits, per_token_nll) gather with GatheredParameters
under no_grad.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

KINDS = (None, "kl", "fd")
# Above this vocabulary size token tasks use the fused loss by default (a task flag turns it off): below it the
# [tokens, V] logits are small and the unfused path is as fast.
FUSED_MIN_VOCAB = 8192
# Bytes of ONE [2 x chunk, V] float32 tensor (logits of a chunk of both copies).  A chunk holds about 3 such
# buffers at its peak (logits -> log-probs -> gradient, probabilities, and a half-size difference).
CHUNK_BYTES = 32 * 2 ** 20


def default_chunk_size(vocab_size: int, copies: int = 2, budget_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per copy per chunk such that the chunk's [copies x chunk, V] float32 logits take ~budget_bytes."""
    return max(8, int(budget_bytes // (4 * copies * max(1, vocab_size))))


def want_fused(setting, vocab_size: int) -> bool:
    """A task flag's meaning: True/"on" -> fused, False/"off" -> unfused, None/"auto" -> fused above FUSED_MIN_VOCAB."""
    if isinstance(setting, str):
        setting = {"on": True, "true": True, "off": False, "false": False, "auto": None}[setting.lower()]
    return vocab_size >= FUSED_MIN_VOCAB if setting is None else bool(setting)


# -- one chunk -----------------------------------------------------------------------------------------------
def _chunk(h: Tensor, w: Tensor, b: Tensor | None, y: Tensor, keep: Tensor, eps: float, kind: str | None,
           grads: tuple | None):
    """Losses of one chunk and, if ``grads`` is given, the gradient w.r.t. its logits.

    h [R, H] float32 with R = copies x c rows (copy a then copy b when kind is not None); y, keep [c].
    grads: None (losses only); (g_nll, g_cons) -> one gradient g_nll * dnll/dz + g_cons * dcons/dz;
    "split" -> (dnll/dz, dcons/dz) separately (for gradient-in-forward).  Returns (nll, cons, gz)."""
    c = y.shape[0]
    copies = h.shape[0] // c
    z = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()            # [R, V]
    V = z.shape[1]
    eps_i = eps / (V - 1) if eps > 0 else 0.0
    diff = z[:c] - z[c:] if kind == "fd" else None
    logp = z.sub_(torch.logsumexp(z, 1, keepdim=True))                       # in place: z is dead
    yy = y.repeat(copies) if copies > 1 else y
    kk = keep.repeat(copies) if copies > 1 else keep
    split = grads == "split"
    g_n, g_c = (1.0, 1.0) if (split or grads is None) else grads
    values = grads is None or split          # backward (recompute) needs the gradient only, not the loss values
    nll = cons = kl_ab = kl_ba = d = None
    if values:
        nll_rows = -logp.gather(1, yy[:, None]).squeeze(1)
        if eps > 0:
            nll_rows = (1.0 - eps - eps_i) * nll_rows - eps_i * logp.sum(1)
        nll = (nll_rows * kk).sum()
    p = logp.exp()
    if kind == "kl" and g_c:
        d = logp[:c] - logp[c:]                                              # l_a - l_b   [c, V]
        kl_ab = torch.einsum("rv,rv->r", p[:c], d)
        kl_ba = -torch.einsum("rv,rv->r", p[c:], d)
        if values:
            cons = (0.5 * (kl_ab + kl_ba) * keep).sum()
    elif kind == "fd" and values:
        cons = (diff.pow(2).sum(1) * keep).sum()
    if grads is None:
        return nll, cons, None
    gc = None
    if kind is not None and g_c:
        gc = logp                                                            # reuse: log-probs are dead now
        if kind == "kl":
            wc = (0.5 * g_c) * keep
            t = d.mul_(wc[:, None])                                          # wc * (l_a - l_b)
            pa, pb = p[:c], p[c:]
            torch.add(t, (wc * (1.0 - kl_ab))[:, None], out=gc[:c]).mul_(pa)
            torch.sub((wc * (1.0 - kl_ba))[:, None], t, out=gc[c:]).mul_(pb)
            gc[:c].addcmul_(pb, wc[:, None], value=-1.0)
            gc[c:].addcmul_(pa, wc[:, None], value=-1.0)
        else:
            w2 = ((2.0 * g_c) * keep)[:, None]
            torch.mul(diff, w2, out=gc[:c])
            torch.mul(diff, -w2, out=gc[c:])
    gn = None
    if g_n:
        wn = g_n * kk
        if gc is not None and not split:
            gn = gc.addcmul_(p, wn[:, None])                                 # one combined gradient
        else:
            gn = p.mul_(wn[:, None])
        gn.scatter_add_(1, yy[:, None], (-(1.0 - eps - eps_i) * wn)[:, None])
        if eps > 0:
            gn.sub_((eps_i * wn)[:, None])
    if split:
        return nll, cons, (gn, gc)
    return nll, cons, gn if gn is not None else gc


def _rows(n: int, copies: int, start: int, stop: int) -> list[slice]:
    return [slice(k * n + start, k * n + stop) for k in range(copies)]


def _gather_rows(hidden: Tensor, n: int, copies: int, start: int, stop: int) -> Tensor:
    parts = [hidden[s] for s in _rows(n, copies, start, stop)]
    return (torch.cat(parts) if copies > 1 else parts[0]).float()


class _Acc:
    """Gradient accumulators for hidden, weight, bias (float32), filled chunk by chunk."""

    def __init__(self, hidden, w32, bias, needs):
        self.h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if needs[0] else None
        self.w = torch.zeros_like(w32) if needs[1] else None
        self.b = torch.zeros(w32.shape[0], dtype=torch.float32, device=w32.device) if needs[2] else None

    def add(self, gz, h, w32, rows):
        if self.h is not None:
            gh = gz @ w32
            r = 0
            for s in rows:
                k = s.stop - s.start
                self.h[s] += gh[r:r + k]
                r += k
        if self.w is not None:
            self.w.addmm_(gz.t(), h)
        if self.b is not None:
            self.b += gz.sum(0)


class FusedTokenLossFunction(torch.autograd.Function):
    """(nll_sum, cons_sum) of hidden [copies x N, H] against target [N]; see fused_token_loss for the arguments."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, keep, eps, kind, copies, chunk, strategy):
        n = target.shape[0]
        w32 = weight.float()
        b32 = bias.float() if bias is not None else None
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        split = strategy == "forward" and any(needs)
        acc_n = _Acc(hidden, w32, bias, needs) if split else None
        acc_c = _Acc(hidden, w32, bias, needs) if split and kind is not None else None
        nll = torch.zeros((), dtype=torch.float32, device=hidden.device)
        cons = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                h = _gather_rows(hidden, n, copies, start, stop)
                ln, lc, gz = _chunk(h, w32, b32, target[start:stop], keep[start:stop], eps, kind,
                                    "split" if split else None)
                nll += ln
                if lc is not None:
                    cons += lc
                if split:
                    rows = _rows(n, copies, start, stop)
                    acc_n.add(gz[0], h, w32, rows)
                    if acc_c is not None:
                        acc_c.add(gz[1], h, w32, rows)
        ctx.meta = (eps, kind, copies, chunk, strategy, needs, hidden.dtype, weight.dtype,
                    None if bias is None else bias.dtype)
        if split:
            ctx.accs = (acc_n, acc_c)
            ctx.save_for_backward(target, keep)
        else:
            ctx.save_for_backward(hidden, weight, bias, target, keep)
        ctx.set_materialize_grads(False)
        if kind is None:
            ctx.mark_non_differentiable(cons)
        return nll, cons

    @staticmethod
    def backward(ctx, g_nll, g_cons):
        eps, kind, copies, chunk, strategy, needs, hdt, wdt, bdt = ctx.meta
        g_n = 0.0 if g_nll is None else g_nll
        g_c = 0.0 if (g_cons is None or kind is None) else g_cons
        if strategy == "forward" and any(needs):
            acc_n, acc_c = ctx.accs
            out = []
            for name in ("h", "w", "b"):
                t = getattr(acc_n, name)
                if t is None:
                    out.append(None)
                    continue
                g = t * g_n
                if acc_c is not None:
                    g = g + getattr(acc_c, name) * g_c
                out.append(g)
        else:
            hidden, weight, bias, target, keep = ctx.saved_tensors
            n = target.shape[0]
            w32 = weight.float()
            b32 = bias.float() if bias is not None else None
            acc = _Acc(hidden, w32, bias, needs)
            # 0-dim grad outputs as Python floats: the chunk code scales [c] vectors by them
            gn = float(g_n) if not torch.is_tensor(g_n) else float(g_n.item())
            gcv = float(g_c) if not torch.is_tensor(g_c) else float(g_c.item())
            if gn or gcv:
                with torch.no_grad():
                    for start in range(0, n, chunk):
                        stop = min(n, start + chunk)
                        h = _gather_rows(hidden, n, copies, start, stop)
                        _, _, gz = _chunk(h, w32, b32, target[start:stop], keep[start:stop], eps, kind, (gn, gcv))
                        acc.add(gz, h, w32, _rows(n, copies, start, stop))
            out = [acc.h, acc.w, acc.b]
        gh, gw, gb = out
        return (None if gh is None else gh.to(hdt), None if gw is None else gw.to(wdt),
                None if gb is None else gb.to(bdt), None, None, None, None, None, None, None)


def fused_token_loss(hidden: Tensor, weight: Tensor, target: Tensor, pad_mask: Tensor | None = None,
                     bias: Tensor | None = None, label_smoothing: float = 0.0, consistency: str | None = "kl",
                     copies: int = 2, chunk_size: int | None = None,
                     strategy: str = "recompute") -> tuple[Tensor, Tensor | None]:
    """(NLL summed over all copies, consistency sum or None), as engine.losses would give on the full logits.

    hidden [copies x N, H] (any float dtype; rows 0..N-1 are copy a, N..2N-1 copy b of the same tokens), or
    [copies x B, T, H] with target/pad_mask [B, T]; weight [V, H]; bias [V] or None; target [N] class ids;
    pad_mask [N] bool, True = does not count.  consistency: "kl" (symmetric KL, engine.losses.symmetric_kl),
    "fd" (squared L2 of the logits, engine.losses.squared_l2) or None; it needs copies == 2.  copies 1 is the
    single-copy variant (mode none, evaluation NLL).  chunk_size: tokens per copy per chunk (default from V).
    Both outputs are differentiable w.r.t. hidden, weight and bias, for any pair of gradient outputs."""
    if consistency not in KINDS:
        raise ValueError(f"consistency must be one of {KINDS}, got {consistency!r}")
    if strategy not in ("recompute", "forward"):
        raise ValueError(f"strategy must be 'recompute' or 'forward', got {strategy!r}")
    if consistency is not None and copies != 2:
        raise ValueError("a consistency term needs copies=2 (hidden = [copy a; copy b])")
    target = target.reshape(-1)
    n = target.shape[0]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if hidden.shape[0] != copies * n:
        raise ValueError(f"hidden has {hidden.shape[0]} rows, expected copies x target = {copies} x {n}")
    if consistency is None and copies > 1:           # no pairing needed: one copy of all rows
        target = target.repeat(copies)
        pad_mask = None if pad_mask is None else pad_mask.reshape(-1).repeat(copies)
        n, copies = target.shape[0], 1
    if pad_mask is None:
        keep = torch.ones(n, dtype=torch.float32, device=hidden.device)
        safe = target
    else:
        pad_mask = pad_mask.reshape(-1)
        keep = (~pad_mask).float()
        safe = target.masked_fill(pad_mask, 0)
    chunk = int(chunk_size) if chunk_size else default_chunk_size(weight.shape[0], copies)
    if not torch.is_grad_enabled():          # evaluation: no gradient to compute ahead of time
        strategy = "recompute"
    nll, cons = FusedTokenLossFunction.apply(hidden, weight, bias, safe.long(), keep, float(label_smoothing),
                                             consistency, copies, max(1, chunk), strategy)
    return nll, (cons if consistency is not None else None)


@torch.no_grad()
def per_token_nll(hidden: Tensor, weight: Tensor, target: Tensor, pad_mask: Tensor | None = None,
                  bias: Tensor | None = None, label_smoothing=0.0, chunk_size: int | None = None,
                  hits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token (label-smoothed) NLL, float32, shape of target, 0 where masked; chunked, no graph (evaluation).
    ``label_smoothing`` may be a sequence of values: then the result is [len, *target.shape], one row per value,
    from ONE pass over the logits (evaluation reports the smoothed loss and the plain NLL together).
    ``hits``: also return a bool tensor with the shape of target, True where the logits' argmax is the target
    (False where masked), from the same pass: the token accuracy fairseq's ``--report-accuracy`` logs."""
    several = isinstance(label_smoothing, (list, tuple))
    epss = [float(e) for e in label_smoothing] if several else [float(label_smoothing)]
    shape = target.shape
    target = target.reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    keep = torch.ones(target.shape[0], device=hidden.device) if pad_mask is None else (~pad_mask.reshape(-1)).float()
    safe = target if pad_mask is None else target.masked_fill(pad_mask.reshape(-1), 0)
    w32 = weight.float()
    b32 = None if bias is None else bias.float()
    V = w32.shape[0]
    chunk = chunk_size or default_chunk_size(V, 1)
    out = torch.empty(len(epss), target.shape[0], dtype=torch.float32, device=hidden.device)
    hit = torch.zeros(target.shape[0], dtype=torch.bool, device=hidden.device) if hits else None
    for s in range(0, target.shape[0], chunk):
        z = torch.addmm(b32, hidden[s:s + chunk].float(), w32.t()) if b32 is not None else \
            hidden[s:s + chunk].float() @ w32.t()
        if hit is not None:
            hit[s:s + chunk] = z.argmax(1).eq(safe[s:s + chunk]) & keep[s:s + chunk].bool()
        logp = z.sub_(torch.logsumexp(z, 1, keepdim=True))
        nll = -logp.gather(1, safe[s:s + chunk, None].long()).squeeze(1)
        total = logp.sum(1) if any(e > 0 for e in epss) else None
        for k, eps in enumerate(epss):
            rows = nll
            if eps > 0:
                eps_i = eps / (V - 1)
                rows = (1.0 - eps - eps_i) * nll - eps_i * total
            out[k, s:s + chunk] = rows * keep[s:s + chunk]
    out = out.reshape(len(epss), *shape) if several else out[0].reshape(shape)
    return (out, hit.reshape(shape)) if hits else out


# -- the module that tasks attach to their model ---------------------------------------------------------------
ATTR = "fused_token_loss"


def _zero3_param(p) -> bool:
    return p is not None and hasattr(p, "ds_id")


class FusedTokenLoss(nn.Module):
    """A parameter-less child of the model that computes the fused loss with the model's output projection.

    It must be a submodule of the model given to deepspeed.initialize (attach() puts it there) so that, under
    ZeRO-3, DeepSpeed's hooks gather the projection's (external) parameters around its forward and backward.
    The projection is referenced, not registered, so the model's state_dict and save_pretrained are unchanged."""

    def __init__(self, head: nn.Module, extra_bias: str | None = None, owner: nn.Module | None = None):
        super().__init__()
        self.__dict__["_head"] = head               # not a submodule: no duplicate parameters / state_dict keys
        self.__dict__["_owner"] = owner
        self.extra_bias = extra_bias                # name of a [1, V] / [V] buffer on ``owner`` added to the logits
        self.chunk_size: int | None = None
        self.strategy = "recompute"

    @property
    def head(self) -> nn.Module:
        return self.__dict__["_head"]

    @property
    def weight(self) -> Tensor:
        return self.head.weight

    @property
    def bias(self) -> Tensor | None:
        b = getattr(self.head, "bias", None)
        if self.extra_bias:
            e = getattr(self.__dict__["_owner"], self.extra_bias).reshape(-1)
            b = e if b is None else b + e
        return b

    @property
    def vocab_size(self) -> int:
        w = self.weight
        return int(w.ds_shape[0]) if hasattr(w, "ds_shape") else int(w.shape[0])

    def forward(self, hidden: Tensor, target: Tensor, pad_mask: Tensor | None = None, label_smoothing: float = 0.0,
                consistency: str | None = "kl", copies: int = 2) -> tuple[Tensor, Tensor | None]:
        # hidden is positional on purpose: DeepSpeed's post-backward hook (which re-partitions the gathered
        # weight) is attached to the positional inputs only.
        return fused_token_loss(hidden, self.weight, target, pad_mask, self.bias, label_smoothing, consistency,
                                copies, self.chunk_size, self.strategy)

    def _gathered(self):
        params = [p for p in (self.weight, getattr(self.head, "bias", None)) if _zero3_param(p)]
        if not params:
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    @torch.no_grad()
    def logits(self, hidden: Tensor) -> Tensor:
        """Full logits (evaluation only: no graph; under ZeRO-3 the weight is gathered for the call)."""
        with self._gathered():
            b = self.bias
            return nn.functional.linear(hidden, self.weight, None if b is None else b.to(hidden.dtype))

    @torch.no_grad()
    def token_nll(self, hidden: Tensor, target: Tensor, pad_mask: Tensor | None = None,
                  label_smoothing=0.0, hits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Per-token NLL with the shape of target (evaluation), chunked, under ZeRO-3 gathered for the call;
        a sequence of label_smoothing values gives one row per value from one pass; ``hits`` adds the argmax
        matches (see per_token_nll)."""
        with self._gathered():
            return per_token_nll(hidden, self.weight, target, pad_mask, self.bias, label_smoothing, self.chunk_size,
                                 hits=hits)


def attach(model: nn.Module, head: nn.Module | None = None, extra_bias: str | None = None,
           chunk_size: int | None = None, strategy: str = "recompute") -> FusedTokenLoss:
    """Give ``model`` a FusedTokenLoss child (as ``model.fused_token_loss``) over its output projection.

    Call it in Task.build_model, i.e. BEFORE deepspeed.initialize.  head: a module with ``weight`` [V, H] and
    optional ``bias`` (default: model.get_output_embeddings(), so tied embeddings stay tied: the loss uses the
    same Parameter).  extra_bias: the name of a logits-bias buffer on the model (BART's "final_logits_bias").

    The task's forward then gets the hidden states that the projection consumes without computing logits, and
    it must get them THROUGH the DeepSpeed engine's forward (``model(...)`` with the engine as ``model``), never
    by calling a submodule such as ``model.module.transformer(...)``: the engine's forward hooks its outputs so
    that backward runs ZeRO's backward prologue (accumulation boundary, ZeRO-3 bookkeeping).  Measured: ZeRO-3,
    gradient accumulation 2, a tiny GPT-2, SGD -- through the engine the weights equal plain PyTorch's to 1e-8,
    calling ``engine.module.transformer`` directly they are off by 0.07 (ZeRO-2 happened to be unaffected).
    Ways through the engine: models/transformer_mt.py's and models/bart.py's ``forward(..., features_only=True)``
    (the decoder's hidden states as ``last_hidden_state``); GPT-2 and other HF causal LMs:
    ``model(input_ids=..., output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long))
    .hidden_states[-1]`` (after the final layer norm; the empty index makes the head compute nothing).
    T5 scales hidden by d_model**-0.5 before a tied lm_head; FSMT's own get_output_embeddings() is the decoder's
    input embedding, so pass its output projection as head."""
    head = head if head is not None else model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError("attach(): the model has no output projection with a weight; pass head=")
    mod = FusedTokenLoss(head, extra_bias, owner=model)
    mod.chunk_size, mod.strategy = chunk_size, strategy
    model.add_module(ATTR, mod)
    try:
        import deepspeed
    except ImportError:                             # plain PyTorch: nothing to coordinate
        return mod
    for p in (head.weight, getattr(head, "bias", None)):
        if isinstance(p, nn.Parameter):
            deepspeed.zero.register_external_parameter(mod, p)
    return mod


def find(model: nn.Module) -> FusedTokenLoss | None:
    """The FusedTokenLoss attached to ``model`` (a DeepSpeed engine or the bare module), or None."""
    module = getattr(model, "module", model)
    return getattr(module, ATTR, None)
