"""fairseq's adaptive-input transformer language model (Baevski & Auli, 2019) as a Hugging Face model: HF has no
adaptive input or adaptive softmax.  This file imports only torch and transformers, so that an export carries it
(``save_pretrained`` copies it beside the weights and writes ``auto_map`` into config.json) and loads WITHOUT this
repository::

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)    # logits = log-probabilities [B, T, V]

``transformer_lm_wiki103`` (fairseq's arch): 16 pre-norm layers, d 1024, FFN 4096, 16 heads (the appendix; fairseq's
arch function leaves 8, which changes no parameter count), ReLU, dropout 0.3, attention dropout 0.1, activation
dropout 0.1, sinusoidal positions (a buffer in fairseq, computed on the fly here: 0 parameters), embeddings scaled
by sqrt(d), NO final layer norm (``no_decoder_final_norm``), adaptive input and adaptive softmax with cutoffs
20000,60000, factor 4, tied adaptive weights and projections, adaptive softmax dropout 0.2.  The presets and
fairseq's parameter count are in models/transformer_lm.py.

Why fairseq's adaptive softmax and not torch's ``nn.AdaptiveLogSoftmaxWithLoss``: torch's owns its head and tail
weights and cannot share them with an adaptive input, so ``tie_adaptive_weights`` / ``tie_adaptive_proj`` -- which
make the paper's 247M-parameter model (the head's word rows ARE band 0's embedding, tail i projects with band i's
projection transposed and scores with band i's embedding) -- are impossible with it, the parameter count would not
match, and its head has a bias fairseq's lacks.  The formulation below is fairseq's (modules/adaptive_input.py,
modules/adaptive_softmax.py): head = [band-0 words; one logit per tail cluster], tail i = dropout -> project ->
score, log p(w in tail i) = log p_head(cluster i) + log p_tail_i(w).

Two ways to score with the adaptive softmax (``AdaptiveSoftmax.forward``):
  - ``target=`` : fairseq's adaptive_loss, the NLL of the target only (each tail evaluated only for the positions
    whose target lies in it);
  - ``reduce=`` : the FULL distribution over the vocabulary, in chunks of positions.  Each chunk's [.., c, V]
    log-probabilities are reduced to sums at once and recomputed in backward (activation checkpointing), so at most
    one chunk's distribution is alive at any time: memory is O(chunk x V) instead of O(tokens x V).  This is what
    R-Drop's KL over the full output distribution needs (tasks/language_modeling.py).
Training code asks for the hidden states (``model(input_ids, features_only=True).last_hidden_state``) and scores
them with ``model.adaptive_softmax``; the plain forward returns the full log-probabilities as ``logits`` (what HF's
causal-LM tooling and ``generate`` expect).  Under ZeRO-3 the tied weights live in the adaptive input;
models/transformer_lm.py registers them as external parameters of the adaptive softmax (``tied_weights``) so
DeepSpeed gathers them for its forward and backward too.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

FAIRSEQ_PAD = 1          # fairseq Dictionary: <s> 0, <pad> 1, </s> 2, <unk> 3


class AdaptiveLMConfig(PreTrainedConfig):
    """fairseq's TransformerLanguageModel with adaptive input + adaptive softmax (tied weights and projections)."""
    model_type = "fairseq_adaptive_lm"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "layers", "num_attention_heads": "heads"}

    vocab_size: int = 267744
    d_model: int = 1024
    ffn_dim: int = 4096
    layers: int = 16
    heads: int = 16
    dropout: float = 0.3
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    activation_function: str = "relu"
    cutoffs: list[int] | None = None
    factor: float = 4.0
    adaptive_softmax_dropout: float = 0.2
    max_positions: int = 3072           # informational: sinusoidal positions have no table
    final_layer_norm: bool = False      # fairseq transformer_lm_wiki103: no_decoder_final_norm
    scale_embedding: bool = True
    preset: str = ""
    bos_token_id: int | None = 0
    pad_token_id: int | None = FAIRSEQ_PAD
    eos_token_id: int | None = 2
    tie_word_embeddings: bool = False   # the tying is the adaptive one, owned by AdaptiveSoftmax


def band_edges(vocab_size: int, cutoffs) -> list[int]:
    """fairseq: the cutoffs plus the vocabulary size as the last edge (cutoffs increasing, below the vocab size)."""
    cut = [int(c) for c in cutoffs]
    if not cut or any(b <= a for a, b in zip([0] + cut, cut)) or cut[-1] > vocab_size:
        raise ValueError(f"adaptive cutoffs {cut} must be increasing, > 0 and at most the vocabulary size "
                         f"{vocab_size}")
    return cut if cut[-1] == vocab_size else cut + [vocab_size]


def band_dims(d_model: int, factor: float, n_bands: int) -> list[int]:
    return [int(d_model // (factor ** i)) for i in range(n_bands)]



def _tag(module: nn.Module, how: str) -> nn.Module:
    """Mark a leaf module with its fairseq initialisation (applied by AdaptiveLM._init_weights per leaf, which
    is what HF's ZeRO-3 initialisation gathers)."""
    module._fairseq_init = how
    return module


class AdaptiveInput(nn.Module):
    """fairseq AdaptiveInput: band i (ids edges[i-1]..edges[i]) = Embedding(size, d // factor**i) projected to d."""

    def __init__(self, vocab_size: int, d_model: int, factor: float, cutoffs, padding_idx: int):
        super().__init__()
        self.cutoff = band_edges(vocab_size, cutoffs)
        self.embedding_dim = d_model
        self.padding_idx = padding_idx
        self.embeddings = nn.ModuleList()
        for i, (lo, hi) in enumerate(zip([0] + self.cutoff[:-1], self.cutoff)):
            dim = band_dims(d_model, factor, i + 1)[i]
            emb = _tag(nn.Embedding(hi - lo, dim, padding_idx if i == 0 else None), "embedding")
            self.embeddings.append(nn.Sequential(emb, _tag(nn.Linear(dim, d_model, bias=False), "xavier")))

    def band_weights(self, band: int) -> tuple[Tensor, Tensor]:
        """(embedding [size, dim], projection [d_model, dim]) of one band: the weights the adaptive softmax ties."""
        return self.embeddings[band][0].weight, self.embeddings[band][1].weight

    def forward(self, ids: Tensor) -> Tensor:
        out = None
        for i, band in enumerate(self.embeddings):
            lo = self.cutoff[i - 1] if i else 0
            mask = (ids >= lo) & (ids < self.cutoff[i])
            vals = band(ids[mask] - lo)            # every band on every call (ZeRO-3: ranks gather the same params)
            if out is None:
                out = vals.new_zeros(*ids.shape, self.embedding_dim)
            out = out.index_put((mask,), vals)
        return out


class AdaptiveSoftmax(nn.Module):
    """fairseq AdaptiveSoftmax with ``tie_adaptive_weights`` and ``tie_adaptive_proj``: it owns only the head's
    cluster logits (``class_proj``); every other weight is the adaptive input's (one owner per weight, so the
    state dict has no duplicates and save_pretrained / ZeRO checkpoints need no tying rules)."""

    def __init__(self, adaptive_input: AdaptiveInput, dropout: float):
        super().__init__()
        self.cutoff = adaptive_input.cutoff
        self.vocab_size = self.cutoff[-1]
        self.p = dropout
        # the head's cluster logits (fairseq head.class_proj, a Linear(d, n_tails) without bias); a direct
        # parameter, not a child Linear, so ZeRO-3 gathers it with this module's own forward
        self.class_proj = nn.Parameter(torch.empty(len(self.cutoff) - 1, adaptive_input.embedding_dim))
        _tag(self, "xavier")
        self.dropout = nn.Dropout(dropout)          # fairseq: on the input, and in each tail after its projection
        object.__setattr__(self, "_input", adaptive_input)    # a reference, not a child module

    def tied_weights(self) -> list[Tensor]:
        """The adaptive input's weights this module scores with: [band-0 embedding, then (projection, embedding)
        of each tail band]."""
        w = [self._input.band_weights(0)[0]]
        for band in range(1, len(self.cutoff)):
            emb, proj = self._input.band_weights(band)
            w += [proj, emb]
        return w

    def weights(self) -> list[Tensor]:
        """Every weight of the computation, passed explicitly to the maths below (so chunks recomputed in backward
        use them as arguments).  Read on EVERY call: under ZeRO-3 every rank then gathers the same parameters
        whatever its targets."""
        return [self.class_proj, *self.tied_weights()]

    # -- the maths, on explicit weights (usable inside activation checkpointing) ---------------------------------
    def _head(self, h: Tensor, w: list[Tensor]) -> Tensor:
        return F.log_softmax(torch.cat([F.linear(h, w[1]), F.linear(h, w[0])], -1).float(), -1)

    def _tail(self, h: Tensor, w: list[Tensor], i: int) -> Tensor:
        proj, emb = w[2 + 2 * i], w[3 + 2 * i]
        z = F.dropout(F.linear(h, proj.t()), self.p, self.training)
        return F.log_softmax(F.linear(z, emb).float(), -1)

    def _log_probs(self, h: Tensor, *w: Tensor) -> Tensor:
        """Full log-probabilities [..., V] (fairseq get_log_prob, plus the training-time input dropout)."""
        w = list(w)
        h = F.dropout(h, self.p, self.training)
        head = self._head(h, w)
        c0 = self.cutoff[0]
        parts = [head[..., :c0]]
        for i in range(len(self.cutoff) - 1):
            parts.append(self._tail(h, w, i) + head[..., c0 + i:c0 + i + 1])
        return torch.cat(parts, -1)

    def _nll(self, h: Tensor, target: Tensor, w: list[Tensor]) -> Tensor:
        """fairseq adaptive_loss per position: head for everyone, tail i only where the target lies in it."""
        shape = target.shape
        h = F.dropout(h.reshape(-1, h.shape[-1]), self.p, self.training)
        t = target.reshape(-1)
        valid = t >= 0
        t = t.clamp(min=0)
        head = self._head(h, w)
        c0 = self.cutoff[0]
        head_target = t.clone()
        for i in range(len(self.cutoff) - 1):
            head_target[(t >= self.cutoff[i]) & (t < self.cutoff[i + 1])] = c0 + i
        nll = -head.gather(-1, head_target.unsqueeze(-1)).squeeze(-1)
        for i in range(len(self.cutoff) - 1):
            rows = ((t >= self.cutoff[i]) & (t < self.cutoff[i + 1]) & valid).nonzero().squeeze(-1)
            lp = self._tail(h.index_select(0, rows), w, i)
            picked = lp.gather(-1, (t.index_select(0, rows) - self.cutoff[i]).unsqueeze(-1)).squeeze(-1)
            nll = nll.index_add(0, rows, -picked)
        return (nll * valid).reshape(shape)

    def forward(self, hidden: Tensor, target: Tensor | None = None,
                reduce: Callable[..., Tensor] | None = None, extras: tuple = (), chunk_tokens: int = 0,
                use_checkpoint: bool = True) -> Tensor:
        """hidden [..., d].  ``target`` [...] (ids, < 0 = not scored): the NLL per position.  ``reduce``: hidden
        [..., n, d] and extras [..., n] are cut into chunks of ``chunk_tokens`` positions; returns the sum over
        chunks of ``reduce(log_probs [..., c, V], *extra_chunks)`` with each chunk recomputed in backward.
        Neither: the full log-probabilities [..., V]."""
        w = self.weights()
        if target is not None:
            return self._nll(hidden, target, w)
        if reduce is None:
            return self._log_probs(hidden, *w)
        n = hidden.shape[-2]
        step = chunk_tokens if chunk_tokens > 0 else n
        total = None
        for s in range(0, n, step):
            args = (hidden[..., s:s + step, :], *(x[..., s:s + step] for x in extras))

            def chunk(h, *rest, _k=len(extras)):
                return reduce(self._log_probs(h, *rest[_k:]), *rest[:_k])
            if use_checkpoint and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint
                part = checkpoint(chunk, *args, *w, use_reentrant=False)
            else:
                part = chunk(*args, *w)
            total = part if total is None else total + part
        return total


class SelfAttention(nn.Module):
    """fairseq MultiheadAttention (self-attention, biases on q/k/v/out), causal, via scaled_dot_product_attention."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model {d} is not divisible by {heads} heads")
        self.heads, self.p = heads, dropout
        self.q_proj, self.k_proj, self.v_proj = (_tag(nn.Linear(d, d), "xavier_qkv") for _ in range(3))
        self.out_proj = _tag(nn.Linear(d, d), "xavier_out")

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class DecoderLayer(GradientCheckpointingLayer):
    """fairseq TransformerDecoderLayer, normalize_before=True, no encoder attention.  A GradientCheckpointingLayer:
    ``--train.activation_checkpointing`` recomputes it in backward (HF's checkpointing, RNG state replayed)."""

    def __init__(self, c: AdaptiveLMConfig):
        super().__init__()
        self.self_attn = SelfAttention(c.d_model, c.heads, c.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(c.d_model)
        self.fc1 = _tag(nn.Linear(c.d_model, c.ffn_dim), "torch")
        self.fc2 = _tag(nn.Linear(c.ffn_dim, c.d_model), "torch")
        self.final_layer_norm = nn.LayerNorm(c.d_model)
        self.dropout = nn.Dropout(c.dropout)
        self.activation_dropout = nn.Dropout(c.activation_dropout)
        self.act = ACTIVATIONS[c.activation_function]

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x)))
        h = self.activation_dropout(self.act(self.fc1(self.final_layer_norm(x))))
        return x + self.dropout(self.fc2(h))


def sinusoidal(positions: Tensor, dim: int, padding_idx: int) -> Tensor:
    """fairseq SinusoidalPositionalEmbedding rows for ``positions`` (sin half then cos half; pad rows zero)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float, device=positions.device) * -(math.log(10000) / (half - 1)))
    ang = positions.float().unsqueeze(-1) * freq
    emb = torch.cat([ang.sin(), ang.cos()], -1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.masked_fill(positions.eq(padding_idx).unsqueeze(-1), 0.0)


class AdaptiveDecoder(nn.Module):
    def __init__(self, c: AdaptiveLMConfig):
        super().__init__()
        self.padding_idx = c.pad_token_id if c.pad_token_id is not None else FAIRSEQ_PAD
        self.embed_scale = math.sqrt(c.d_model) if c.scale_embedding else 1.0
        self.embed_tokens = AdaptiveInput(c.vocab_size, c.d_model, c.factor, c.cutoffs, self.padding_idx)
        self.dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.layers))
        self.layer_norm = nn.LayerNorm(c.d_model) if c.final_layer_norm else None
        self.adaptive_softmax = AdaptiveSoftmax(self.embed_tokens, c.adaptive_softmax_dropout)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed_scale * self.embed_tokens(ids)
        # fairseq's make_positions counts real tokens from padding_idx + 1; batches here are right-padded, so that
        # is padding_idx + 1 + t for every real token (pads after them are never scored and, attention being
        # causal, never seen), whatever the pad id is -- even a tokenizer's </s> standing in for <pad>
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) + self.padding_idx + 1
        x = x + sinusoidal(positions, x.shape[-1], self.padding_idx).to(x.dtype)
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x) if self.layer_norm is not None else x


class AdaptiveLM(PreTrainedModel, GenerationMixin):
    """Decoder-only LM with adaptive input and adaptive softmax.

    ``forward(input_ids, features_only=True)`` gives the final hidden states (``last_hidden_state`` [B, T, d]) for
    training code that scores them with ``self.adaptive_softmax`` in chunks; ``forward(input_ids)`` gives the full
    log-probabilities [B, T, V] (float32) as ``logits`` and, with ``labels`` (HF's causal-LM convention: the inputs,
    shifted inside, -100 ignored), their mean NLL as ``loss``.  Log-probabilities are valid logits: softmax and
    cross-entropy give the same numbers.  No key/value cache: ``generate`` recomputes the prefix every step.
    Right padding needs no attention mask (attention is causal and pads only follow real tokens); left padding is
    not supported (the sinusoidal positions count from the first column)."""
    config_class = AdaptiveLMConfig
    base_model_prefix = "decoder"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]
    supports_gradient_checkpointing = True

    def __init__(self, config: AdaptiveLMConfig):
        super().__init__(config)
        self.decoder = AdaptiveDecoder(config)
        self.post_init()

    @property
    def adaptive_softmax(self) -> AdaptiveSoftmax:
        return self.decoder.adaptive_softmax

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                features_only: bool = False, logits_to_keep: int = 0, output_hidden_states: bool = False,
                **_ignored):
        hidden = self.decoder(input_ids)
        if features_only:
            return BaseModelOutput(last_hidden_state=hidden)
        logits = self.adaptive_softmax(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.nll_loss(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                              ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits, hidden_states=(hidden,) if output_hidden_states else None)

    def prepare_inputs_for_generation(self, input_ids: Tensor, **kwargs) -> dict:
        """No cache: every generation step reads the whole sequence (only the last position is scored)."""
        return {"input_ids": input_ids, "logits_to_keep": 1}

    def _init_weights(self, module):
        from transformers import initialization as init
        how = getattr(module, "_fairseq_init", None)
        if how == "embedding":                           # fairseq AdaptiveInput: N(0, dim^-1/2), pad row zero
            init.normal_(module.weight, mean=0.0, std=module.weight.shape[1] ** -0.5)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif how == "xavier":                            # band projections; the adaptive softmax's class_proj
            init.xavier_uniform_(module.class_proj if isinstance(module, AdaptiveSoftmax) else module.weight)
        elif how in ("xavier_qkv", "xavier_out"):        # fairseq MultiheadAttention.reset_parameters
            init.xavier_uniform_(module.weight, gain=1 / math.sqrt(2) if how == "xavier_qkv" else 1.0)
            if how == "xavier_out":
                init.zeros_(module.bias)
            else:
                bound = 1 / math.sqrt(module.weight.shape[1])
                init.uniform_(module.bias, -bound, bound)
        elif how == "torch":                             # fc1 / fc2: nn.Linear's own initialisation
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.weight.shape[1])
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


# save_pretrained copies this file into the export and writes config.json's auto_map, so that
# AutoConfig / AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) load the model without this repository
AdaptiveLMConfig.register_for_auto_class()
AdaptiveLM.register_for_auto_class("AutoModelForCausalLM")
