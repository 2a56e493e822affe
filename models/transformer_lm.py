"""Language models of appendix A.3: GPT-style decoders on HF GPT2LMHeadModel, and fairseq's adaptive-input
transformer (Baevski & Auli, 2019) as an own module -- HF has no adaptive input or adaptive softmax.

``transformer_lm_gpt`` (fairseq arch + ``--share-decoder-input-output-embed --decoder-learned-pos``): 12 layers,
d 768, FFN 3072, 12 heads, dropout 0.1, attention dropout 0.1, exact (erf) GELU, pre-norm with a final layer norm,
learned positions, tied input/output embeddings.  GPT2LMHeadModel has exactly these parameters (its fused c_attn
holds fairseq's q/k/v projections), so the counts agree; fairseq's learned-position table has
``max_positions + padding_idx + 1`` rows (fairseq PositionalEmbedding), which is what ``n_positions`` gets here.
What stays GPT-2's: no sqrt(d) embedding scale, positions counted from 0, HF's N(0, 0.02) initialisation.  (The
authors' script did not pass --decoder-learned-pos, so their model had sinusoidal positions and 394,752 fewer
parameters on WikiText-103; the issue asks for learned positions, which GPT-2 has.)

``transformer_lm_wiki103`` and the adaptive input / adaptive softmax: models/adaptive_lm.py (standalone, so that
exports carry it for ``trust_remote_code``); its presets, fairseq's parameter count and the ZeRO-3 build are here.
"""
from __future__ import annotations

from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from models import hf
from models.adaptive_lm import (FAIRSEQ_PAD, AdaptiveInput, AdaptiveLM, AdaptiveLMConfig,  # noqa: F401 (re-exported)
                                AdaptiveSoftmax, band_dims, band_edges, sinusoidal)

# GPT-style presets (GPT2LMHeadModel).  small / mini are the CPU presets, tiny is for tests.
GPT_PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_embd=32, n_inner=64, n_head=2, dropout=0.1, attention_dropout=0.1),
    "mini": dict(n_layer=2, n_embd=128, n_inner=512, n_head=4, dropout=0.1, attention_dropout=0.1),
    "small": dict(n_layer=4, n_embd=256, n_inner=1024, n_head=4, dropout=0.1, attention_dropout=0.1),
    "transformer_lm_gpt": dict(n_layer=12, n_embd=768, n_inner=3072, n_head=12, dropout=0.1, attention_dropout=0.1),
}
# Adaptive-input presets (AdaptiveLM).  adaptive_small is the CPU preset, adaptive_tiny is for tests.
ADAPTIVE_PRESETS: dict[str, dict] = {
    "adaptive_tiny": dict(layers=2, d_model=32, ffn_dim=64, heads=2, dropout=0.1, attention_dropout=0.1,
                          activation_dropout=0.1, cutoffs=[100, 1000], factor=4.0, adaptive_softmax_dropout=0.1),
    "adaptive_small": dict(layers=4, d_model=256, ffn_dim=1024, heads=4, dropout=0.3, attention_dropout=0.1,
                           activation_dropout=0.1, cutoffs=[2000, 10000], factor=4.0, adaptive_softmax_dropout=0.2),
    "transformer_lm_wiki103": dict(layers=16, d_model=1024, ffn_dim=4096, heads=16, dropout=0.3,
                                   attention_dropout=0.1, activation_dropout=0.1, cutoffs=[20000, 60000],
                                   factor=4.0, adaptive_softmax_dropout=0.2),
}
PRESETS = {**GPT_PRESETS, **ADAPTIVE_PRESETS}


def is_adaptive(preset: str) -> bool:
    return preset in ADAPTIVE_PRESETS


# ============================================================================================== GPT (HF GPT-2)

def gpt_config(preset: str, vocab_size: int, max_positions: int, *, dropout: float | None = None,
               attention_dropout: float | None = None, bos_token_id: int = 0, eos_token_id: int = 2,
               pad_token_id: int = FAIRSEQ_PAD) -> GPT2Config:
    a = dict(GPT_PRESETS[preset])
    drop, attn = a.pop("dropout"), a.pop("attention_dropout")
    drop = drop if dropout is None else dropout
    attn = attn if attention_dropout is None else attention_dropout
    config = GPT2Config(vocab_size=vocab_size, n_positions=max_positions + FAIRSEQ_PAD + 1,
                        activation_function="gelu", resid_pdrop=drop, embd_pdrop=drop, attn_pdrop=attn,
                        tie_word_embeddings=True, use_cache=False, bos_token_id=bos_token_id,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id, **a)
    config.preset = preset
    return config


def build_gpt(config: GPT2Config, ds_config: dict, pretrained: str = "") -> GPT2LMHeadModel:
    return hf.build(GPT2LMHeadModel, config, ds_config, pretrained)


def fairseq_num_params_gpt(preset: str, vocab_size: int, max_positions: int) -> int:
    """fairseq TransformerLanguageModel (transformer_lm_gpt family, ``--share-decoder-input-output-embed
    --decoder-learned-pos``): Embedding(V, d) shared with the output projection; LearnedPositionalEmbedding with
    max_positions + padding_idx + 1 rows; per layer MultiheadAttention (4 Linear(d, d) with bias) +
    self_attn_layer_norm + fc1 Linear(d, f) + fc2 Linear(f, d) + final_layer_norm (no encoder attention); the
    decoder's final layer norm (normalize_before and not no_decoder_final_norm)."""
    a = GPT_PRESETS[preset]
    d, f, n = a["n_embd"], a["n_inner"], a["n_layer"]
    layer = 4 * (d * d + d) + 2 * d + (d * f + f) + (f * d + d) + 2 * d
    return vocab_size * d + (max_positions + FAIRSEQ_PAD + 1) * d + n * layer + 2 * d



def adaptive_config(preset: str, vocab_size: int, max_positions: int, *, cutoffs: list[int] | None = None,
                    dropout: float | None = None, attention_dropout: float | None = None,
                    activation_dropout: float | None = None, adaptive_softmax_dropout: float | None = None,
                    bos_token_id: int = 0, eos_token_id: int = 2, pad_token_id: int = FAIRSEQ_PAD
                    ) -> AdaptiveLMConfig:
    a = dict(ADAPTIVE_PRESETS[preset])
    for k, v in (("cutoffs", cutoffs), ("dropout", dropout), ("attention_dropout", attention_dropout),
                 ("activation_dropout", activation_dropout), ("adaptive_softmax_dropout", adaptive_softmax_dropout)):
        if v is not None:
            a[k] = v
    band_edges(vocab_size, a["cutoffs"])            # raises ValueError on bad cutoffs
    return AdaptiveLMConfig(vocab_size=vocab_size, max_positions=max_positions, preset=preset,
                            bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **a)


def fairseq_num_params_adaptive(config: AdaptiveLMConfig) -> int:
    """fairseq's count for transformer_lm_wiki103-style models (adaptive input, tied adaptive softmax).

    AdaptiveInput: band i = Embedding(size_i, d // factor**i) + Linear(d // factor**i, d, bias=False);
    AdaptiveSoftmax with tie_adaptive_weights + tie_adaptive_proj: head word rows = band-0 embedding (TiedLinear),
    class_proj Linear(d, n_tails, bias=False), tails entirely tied (projection = band i's Linear transposed, output
    = band i's embedding); layers as in the GPT count; sinusoidal positions 0; no final layer norm unless asked."""
    c = config
    d, f = c.d_model, c.ffn_dim
    edges = band_edges(c.vocab_size, c.cutoffs)
    dims = band_dims(d, c.factor, len(edges))
    sizes = [hi - lo for lo, hi in zip([0] + edges[:-1], edges)]
    adaptive_input = sum(s * k + k * d for s, k in zip(sizes, dims))
    class_proj = d * (len(edges) - 1)
    layer = 4 * (d * d + d) + 2 * d + (d * f + f) + (f * d + d) + 2 * d
    return adaptive_input + class_proj + c.layers * layer + (2 * d if c.final_layer_norm else 0)


def build_adaptive(config: AdaptiveLMConfig, ds_config: dict, pretrained: str = "") -> AdaptiveLM:
    from engine.ds_config import zero_stage
    model = hf.build(AdaptiveLM, config, ds_config, pretrained)
    if zero_stage(ds_config) == 3:
        # the adaptive softmax scores with the adaptive input's weights: have DeepSpeed gather them for its forward
        # and backward too
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter
        for w in model.adaptive_softmax.tied_weights():
            register_external_parameter(model.adaptive_softmax, w)
    return model


def trainable_params(model: nn.Module) -> int:
    """Distinct trainable parameters (tied weights counted once), like fairseq's 'num. model params'."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
