"""fairseq-equivalent Transformer for translation, on Hugging Face's FSMT classes.

Why FSMT: it is Hugging Face's port of fairseq's ``TransformerModel`` and keeps everything that makes the two equal
in architecture -- post-norm layers (``normalize_before`` False), no layer norm after the embeddings and no final
encoder/decoder layer norm (fairseq adds those only when ``normalize_before`` is set), sinusoidal positions with
fairseq's formula (sin half then cos half, ``log(10000) / (d/2 - 1)``), positions counted from ``padding_idx + 1``
and pad tokens getting the zero position vector (fairseq ``make_positions``), embeddings scaled by sqrt(d), fairseq's
three dropouts (``dropout`` on embeddings and sub-layer outputs, ``attention_dropout`` on attention probabilities,
``activation_dropout`` = fairseq's ``relu_dropout`` after the FFN activation), biases on every projection, and a bias-
free output projection.  Marian is also post-norm / sinusoidal / scaled, but its positions are Vaswani's
(interleaved frequencies 1/10000^(2i/d), counted from 0, pads not zeroed) and it carries a ``final_logits_bias``,
so it is not fairseq-equivalent.

What this module adds to FSMT:
  - ``features_only=True`` in forward: the decoder's final hidden states (before the output projection) as
    ``last_hidden_state``, for the fused token loss (engine/fused_loss.py), which applies the projection itself in
    chunks; FSMT otherwise applies the projection inside its decoder, so full [tokens, V] logits would exist;
  - activation checkpointing (``activation_checkpointing_enable``, HF's GradientCheckpointingLayer on every encoder
    and decoder layer; FSMT has none of its own);
  - fairseq's embedding sharing options: ``share_all_embeddings`` (one joint vocabulary: encoder input = decoder
    input = output projection) and ``share_decoder_input_output_embed`` (separate vocabularies);
  - fairseq's initialisation (xavier_uniform for projections, gain 1/sqrt(2) for q/k/v, zero biases, embeddings
    N(0, d^-1/2) with the pad row zeroed), instead of FSMT's N(0, 0.02);
  - presets, and ``fairseq_num_params`` -- fairseq's parameter count written out (tests compare it to the model).
The sinusoidal table is a frozen (requires_grad False) parameter in FSMT, a buffer in fairseq: neither is trained,
so "parameters" below means trainable parameters.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers import FSMTConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.fsmt.modeling_fsmt import (Attention, DecoderLayer, EncoderLayer, FSMTDecoder, FSMTEncoder,
                                                    FSMTForConditionalGeneration, FSMTModel, PretrainedFSMTModel,
                                                    SinusoidalPositionalEmbedding)

from models import hf

# fairseq arch name -> architecture.  Dropouts are the paper's (appendix A.1); fairseq's own
# transformer_vaswani_wmt_en_de_big sets dropout 0.3 and no attention/relu dropout.
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
                 encoder_attention_heads=2, decoder_attention_heads=2, dropout=0.1, attention_dropout=0.0,
                 activation_dropout=0.0),
    # 3+3 layers, d 256: a scaled-down transformer_iwslt_de_en
    "small": dict(d_model=256, encoder_ffn_dim=1024, decoder_ffn_dim=1024, encoder_layers=3, decoder_layers=3,
                  encoder_attention_heads=4, decoder_attention_heads=4, dropout=0.3, attention_dropout=0.0,
                  activation_dropout=0.0),
    # the CPU benchmark model (benchmarks/translation_multi30k.sh): 2+2 layers, d 128
    "mini": dict(d_model=128, encoder_ffn_dim=512, decoder_ffn_dim=512, encoder_layers=2, decoder_layers=2,
                 encoder_attention_heads=4, decoder_attention_heads=4, dropout=0.3, attention_dropout=0.0,
                 activation_dropout=0.0),
    "transformer_iwslt_de_en": dict(d_model=512, encoder_ffn_dim=1024, decoder_ffn_dim=1024, encoder_layers=6,
                                    decoder_layers=6, encoder_attention_heads=4, decoder_attention_heads=4,
                                    dropout=0.3, attention_dropout=0.0, activation_dropout=0.0),
    "transformer_vaswani_wmt_en_de_big": dict(d_model=1024, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
                                              encoder_layers=6, decoder_layers=6, encoder_attention_heads=16,
                                              decoder_attention_heads=16, dropout=0.1, attention_dropout=0.1,
                                              activation_dropout=0.1),
}


class _EncoderLayer(GradientCheckpointingLayer, EncoderLayer):
    """FSMT's encoder layer, checkpointable (HF wraps ``forward`` in torch.utils.checkpoint when enabled)."""


class _DecoderLayer(GradientCheckpointingLayer, DecoderLayer):
    """FSMT's decoder layer, checkpointable."""


class _OutputProjection(nn.Linear):
    """fairseq's bias-free output projection.  While ``features_only`` is set (TransformerMT.forward(features_only=
    True)) it passes the decoder's hidden states through unchanged, so the decoder returns them instead of logits.
    A subclass of nn.Linear: the parameter name, tying and state dict are FSMT's."""
    features_only = False

    def forward(self, x):
        return x if self.features_only else super().forward(x)


class _Encoder(FSMTEncoder):
    def __init__(self, config: FSMTConfig):
        super().__init__(config)
        self.layers = nn.ModuleList([_EncoderLayer(config) for _ in range(config.encoder_layers)])


class _Decoder(FSMTDecoder):
    def __init__(self, config: FSMTConfig):
        super().__init__(config)
        self.layers = nn.ModuleList([_DecoderLayer(config, layer_idx=i) for i in range(config.decoder_layers)])
        self.output_projection = _OutputProjection(config.d_model, config.tgt_vocab_size, bias=False)


class _SharedFSMTModel(FSMTModel):
    """FSMTModel whose weight tying follows fairseq's two flags instead of FSMT's all-or-nothing, with
    checkpointable layers and an output projection that can be skipped (features_only)."""

    def __init__(self, config: FSMTConfig):
        PretrainedFSMTModel.__init__(self, config)          # FSMTModel.__init__ with our encoder and decoder
        self.encoder = _Encoder(config)
        self.decoder = _Decoder(config)
        self.post_init()

    def _init_weights(self, module):
        _fairseq_init(self.config, module)

    @property
    def _tied_weights_keys(self):
        c = self.config
        keys = {}
        if getattr(c, "share_all_embeddings", False):
            keys["encoder.embed_tokens.weight"] = "decoder.embed_tokens.weight"
        if getattr(c, "share_all_embeddings", False) or getattr(c, "share_decoder_input_output_embed", False):
            keys["decoder.output_projection.weight"] = "decoder.embed_tokens.weight"
        return keys


class TransformerMT(FSMTForConditionalGeneration):
    """FSMTForConditionalGeneration with fairseq's sharing flags and initialisation, activation checkpointing, and
    ``forward(..., features_only=True)``: the FSMTModel output (``last_hidden_state`` = the decoder's final hidden
    states [B, T, d], before the output projection) instead of logits.  Go through the DeepSpeed engine with it
    (``engine(..., features_only=True)``): the engine's forward registers the hooks its backward relies on."""
    supports_gradient_checkpointing = True

    def __init__(self, config: FSMTConfig):
        PretrainedFSMTModel.__init__(self, config)
        self.model = _SharedFSMTModel(config)
        self.post_init()

    def forward(self, *args, features_only: bool = False, **kwargs):
        if not features_only:
            return super().forward(*args, **kwargs)
        kwargs.pop("labels", None)
        proj = self.model.decoder.output_projection
        proj.features_only = True
        try:
            return self.model(*args, **kwargs)
        finally:
            proj.features_only = False

    def output_projection(self) -> nn.Linear:
        """The module that maps decoder hidden states to logits (FSMT's get_output_embeddings returns the decoder's
        input embedding instead, which is the same weight only when the two are shared)."""
        return self.model.decoder.output_projection

    def _init_weights(self, module):
        _fairseq_init(self.config, module)


def _fairseq_init(config, module):
    from transformers import initialization as init
    if isinstance(module, SinusoidalPositionalEmbedding):
        init.copy_(module.weight, module.get_embedding(*module.weight.shape, module.padding_idx))
    elif isinstance(module, Attention):
        gain = 1 / math.sqrt(2)
        for proj in (module.q_proj, module.k_proj, module.v_proj):
            init.xavier_uniform_(proj.weight, gain=gain)
        init.xavier_uniform_(module.out_proj.weight)
        for proj in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
            if proj.bias is not None:
                init.zeros_(proj.bias)
    elif isinstance(module, nn.Linear):
        if module.weight.shape[0] in (config.src_vocab_size, config.tgt_vocab_size) and \
                module.weight.shape[1] == config.d_model and module.bias is None:
            init.normal_(module.weight, mean=0.0, std=config.d_model ** -0.5)   # unshared output proj
        else:
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        init.normal_(module.weight, mean=0.0, std=config.d_model ** -0.5)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)


def freeze_positions(model: nn.Module) -> None:
    """The sinusoidal tables are constants (a buffer in fairseq): never trained, never in the optimizer."""
    for m in model.modules():
        if isinstance(m, SinusoidalPositionalEmbedding):
            m.weight.requires_grad_(False)


def make_config(preset: str, src_vocab_size: int, tgt_vocab_size: int, *, share_all_embeddings: bool,
                share_decoder_input_output_embed: bool = True, pad_token_id: int = 1, bos_token_id: int = 0,
                eos_token_id: int = 2, max_positions: int = 1024, dropout: float | None = None,
                attention_dropout: float | None = None, activation_dropout: float | None = None,
                langs=("de", "en")) -> FSMTConfig:
    arch = dict(PRESETS[preset])
    for k, v in (("dropout", dropout), ("attention_dropout", attention_dropout),
                 ("activation_dropout", activation_dropout)):
        if v is not None:
            arch[k] = v
    if share_all_embeddings and src_vocab_size != tgt_vocab_size:
        raise ValueError("share_all_embeddings needs one joint vocabulary (src_vocab_size == tgt_vocab_size)")
    tie = share_all_embeddings or share_decoder_input_output_embed
    config = FSMTConfig(langs=list(langs), src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size,
                        max_position_embeddings=max_positions, scale_embedding=True, activation_function="relu",
                        tie_word_embeddings=tie, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                        eos_token_id=eos_token_id, decoder_start_token_id=eos_token_id,
                        forced_eos_token_id=None, **arch)
    config.share_all_embeddings = bool(share_all_embeddings)
    config.share_decoder_input_output_embed = bool(share_decoder_input_output_embed or share_all_embeddings)
    config.preset = preset
    return config


def build(config: FSMTConfig, ds_config: dict, pretrained: str = "") -> TransformerMT:
    model = hf.build(TransformerMT, config, ds_config, pretrained)
    freeze_positions(model)
    return model


def trainable_params(model: nn.Module) -> int:
    """Distinct trainable parameters (tied weights counted once), like fairseq's 'num. model params'."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fairseq_num_params(preset: str, src_vocab_size: int, tgt_vocab_size: int, share_all_embeddings: bool,
                       share_decoder_input_output_embed: bool) -> int:
    """fairseq TransformerModel.build_model's parameter count for a post-norm transformer with sinusoidal positions.

    Embedding(V, d) per side; MultiheadAttention = 4 Linear(d, d) with bias; TransformerEncoderLayer =
    self-attn + self_attn_layer_norm + fc1 Linear(d, f) + fc2 Linear(f, d) + final_layer_norm; the decoder layer
    adds encoder_attn + encoder_attn_layer_norm; no layernorm_embedding, no final encoder/decoder layer norm
    (normalize_before False); output_projection Linear(d, V_tgt, bias=False) unless shared; the sinusoidal table
    is a buffer (0 parameters).
    """
    a = PRESETS[preset]
    d, fe, fd = a["d_model"], a["encoder_ffn_dim"], a["decoder_ffn_dim"]
    le, ld = a["encoder_layers"], a["decoder_layers"]
    mha = 4 * (d * d + d)
    ln = 2 * d
    enc_layer = mha + ln + (d * fe + fe) + (fe * d + d) + ln
    dec_layer = 2 * mha + 3 * ln + (d * fd + fd) + (fd * d + d)
    emb = src_vocab_size * d
    if not share_all_embeddings:
        emb += tgt_vocab_size * d
    if not (share_all_embeddings or share_decoder_input_output_embed):
        emb += tgt_vocab_size * d
    return emb + le * enc_layer + ld * dec_layer
