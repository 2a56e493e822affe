"""BART presets on HF BartForConditionalGeneration, and a MiniLM-to-MiniLM encoder-decoder warm start.

bart_base / bart_large are fairseq's ``bart_base`` / ``bart_large`` architectures: d 768 / 1024, 6+6 / 12+12 layers,
FFN 3072 / 4096, 12 / 16 heads, learned positions for 1024 tokens, layer norm on the embeddings, post-norm layers,
GELU, shared input/output embeddings, with the fine-tuning dropouts of fairseq's CNN/DM recipe (dropout 0.1,
attention dropout 0.1; activation dropout 0).  bart_small / bart_mini are scaled down for CPU runs, bart_tiny is for
tests.  ``fairseq_num_params`` writes fairseq's parameter count out (the tests compare it with the HF model):
HF's ``final_logits_bias`` is a buffer, not a parameter, so the two counts agree.

``BartForRDrop`` is HF's BartForConditionalGeneration plus ``forward(..., features_only=True)``, which returns the
BartModel output (``last_hidden_state`` = the decoder's final hidden states, before ``lm_head`` and
``final_logits_bias``) for the fused token loss; its weights, state dict and exports are BART's.

minilm2minilm: HF's EncoderDecoderModel with the offline pretrained all-MiniLM-L6-v2 (BERT, 6 layers, d 384) as
encoder and as decoder (a causal decoder with randomly initialised cross-attention, Rothe et al. 2020's "BERT2BERT"
warm start), sharing MiniLM's WordPiece vocabulary.
"""
from __future__ import annotations

import functools

from models import hf

PRESETS: dict[str, dict] = {
    "bart_tiny": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                      encoder_attention_heads=2, decoder_attention_heads=2),
    "bart_mini": dict(d_model=128, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=512, decoder_ffn_dim=512,
                      encoder_attention_heads=4, decoder_attention_heads=4),
    "bart_small": dict(d_model=256, encoder_layers=3, decoder_layers=3, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
                       encoder_attention_heads=4, decoder_attention_heads=4),
    "bart_base": dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                      encoder_attention_heads=12, decoder_attention_heads=12),
    "bart_large": dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_ffn_dim=4096,
                       decoder_ffn_dim=4096, encoder_attention_heads=16, decoder_attention_heads=16),
}
ENCODER_DECODER = ("minilm2minilm",)
DEFAULT_DROPOUT = dict(dropout=0.1, attention_dropout=0.1, activation_dropout=0.0)


def bart_config(preset: str, vocab_size: int, *, pad: int = 1, bos: int = 0, eos: int = 2,
                max_positions: int = 1024, dropout=None, attention_dropout=None, activation_dropout=None,
                copy: bool = False):
    """BartConfig of a preset (a BartCopyConfig with ``copy``: the pointer-generator of models/bart_copy.py)."""
    if copy:
        from models.bart_copy import BartCopyConfig as config_cls
    else:
        from transformers import BartConfig as config_cls
    arch = dict(PRESETS[preset])
    for k, v in (("dropout", dropout), ("attention_dropout", attention_dropout),
                 ("activation_dropout", activation_dropout)):
        arch[k] = DEFAULT_DROPOUT[k] if v is None else v
    return config_cls(vocab_size=vocab_size, max_position_embeddings=max_positions, activation_function="gelu",
                      scale_embedding=False, tie_word_embeddings=True, pad_token_id=pad, bos_token_id=bos,
                      eos_token_id=eos, decoder_start_token_id=eos, forced_eos_token_id=None,
                      forced_bos_token_id=None, **arch)


@functools.cache
def bart_class():
    """BartForRDrop, defined on first use (transformers is imported lazily here, as in the rest of this module)."""
    from transformers import BartForConditionalGeneration

    class BartForRDrop(BartForConditionalGeneration):
        """BartForConditionalGeneration with ``features_only``: go through the DeepSpeed engine with it
        (``engine(..., features_only=True)``), whose forward registers the hooks its backward relies on."""

        def forward(self, *args, features_only: bool = False, **kwargs):
            if not features_only:
                return super().forward(*args, **kwargs)
            kwargs.pop("labels", None)
            return self.model(*args, **kwargs)

    return BartForRDrop


def build_bart(config, ds_config: dict, pretrained: str = ""):
    if getattr(config, "model_type", "") == "bart_copy":
        from models.bart_copy import BartCopyForConditionalGeneration
        return hf.build(BartCopyForConditionalGeneration, config, ds_config, pretrained)
    return hf.build(bart_class(), config, ds_config, pretrained)


def copy_num_params(d: int) -> int:
    """Parameters the copy mechanism adds: query and key projections (d x d + d each) and the gate (2d + 1)."""
    return 2 * (d * d + d) + 2 * d + 1


def pretrained_bart_config(path: str, dropout=None, attention_dropout=None, activation_dropout=None):
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path)
    for k, v in (("dropout", dropout), ("attention_dropout", attention_dropout),
                 ("activation_dropout", activation_dropout)):
        setattr(config, k, DEFAULT_DROPOUT[k] if v is None else v)
    return config


def check_pretrained(config, preset: str, path: str, positions: int) -> None:
    """A pretrained BART folder must be the architecture ``--task.model`` names and hold enough positions."""
    from engine.config import ConfigError
    if getattr(config, "model_type", "") != "bart":
        raise ConfigError(f"--task.pretrained {path} is a {getattr(config, 'model_type', '?')} model, not BART: "
                          "pass a BART checkpoint (facebook/bart-large, or DIR/hf_model of a bart_* run)")
    got = {k: getattr(config, k) for k in PRESETS[preset]}
    if got != PRESETS[preset]:
        diff = ", ".join(f"{k} {got[k]} (not {v})" for k, v in PRESETS[preset].items() if got[k] != v)
        raise ConfigError(f"--task.pretrained {path} is not a {preset}: {diff}; pass the --task.model it was "
                          "trained as")
    if config.max_position_embeddings < positions:
        raise ConfigError(f"--task.pretrained {path} has {config.max_position_embeddings} positions: keep "
                          f"--task.max_source_positions / --task.max_target_positions <= that")


def init_cross_attention_from_self(model) -> int:
    """Copy each decoder layer's pretrained self-attention (query, key, value, output projection and its layer norm)
    into the layer's new cross-attention; returns the number of layers copied.  The cross-attention then starts as
    the attention the pretrained network already computes, now over the encoder's states, which live in the same
    representation space (the encoder is the same pretrained network), instead of from random weights."""
    n = 0
    for layer in model.decoder.bert.encoder.layer:
        src, dst = layer.attention, layer.crossattention
        for name in ("query", "key", "value"):
            getattr(dst.self, name).load_state_dict(getattr(src.self, name).state_dict())
        dst.output.load_state_dict(src.output.state_dict())
        n += 1
    return n


def build_minilm2minilm(ds_config: dict, path: str, *, pad: int, cls: int, sep: int, dropout: float | None = None,
                        attention_dropout: float | None = None, cross_attention_init: str = "self"):
    """EncoderDecoderModel(MiniLM encoder, MiniLM decoder with cross-attention); tokens: [CLS] x [SEP] ->
    [CLS] y [SEP] (decoder start [CLS], end [SEP]).  ``cross_attention_init``: "self" (copy each layer's
    pretrained self-attention, :func:`init_cross_attention_from_self`) or "random" (HF's initialisation, as in
    Rothe et al. 2020)."""
    from transformers import AutoConfig, EncoderDecoderConfig, EncoderDecoderModel
    enc = AutoConfig.from_pretrained(path)
    dec = AutoConfig.from_pretrained(path, is_decoder=True, add_cross_attention=True)
    for c in (enc, dec):
        if dropout is not None:
            c.hidden_dropout_prob = dropout
        if attention_dropout is not None:
            c.attention_probs_dropout_prob = attention_dropout
    config = EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = cls, pad, sep
    config.bos_token_id = cls
    config.tie_encoder_decoder = False
    dschf = None
    from engine.ds_config import zero_stage
    if zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig
        dschf = HfDeepSpeedConfig(ds_config)
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path, encoder_config=enc, decoder_config=dec)
    model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id = cls, pad, sep
    model.config.bos_token_id = cls
    if cross_attention_init == "self":
        if dschf is None:
            init_cross_attention_from_self(model)
        else:                           # ZeRO-3: the weights are partitioned; gather, copy on rank 0, re-partition
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(model.decoder.parameters()), modifier_rank=0):
                init_cross_attention_from_self(model)
    if dschf is not None:
        model._hf_deepspeed_config = dschf
    return model


def fairseq_num_params(preset: str, vocab_size: int, max_positions: int = 1024) -> int:
    """fairseq BARTModel's parameter count: one shared Embedding(V, d); learned positions (max_positions + 2 rows,
    fairseq's offset = HF's); layernorm_embedding on both sides; post-norm layers with biased projections; no
    final encoder/decoder layer norm; the output projection tied to the embeddings (the classification heads of
    fairseq's BART are not part of the summarization model)."""
    a = PRESETS[preset]
    d, fe, fd = a["d_model"], a["encoder_ffn_dim"], a["decoder_ffn_dim"]
    mha, ln = 4 * (d * d + d), 2 * d
    enc_layer = mha + ln + (d * fe + fe) + (fe * d + d) + ln
    dec_layer = 2 * mha + 3 * ln + (d * fd + fd) + (fd * d + d)
    positions = 2 * (max_positions + 2) * d
    return vocab_size * d + positions + 2 * ln + a["encoder_layers"] * enc_layer + a["decoder_layers"] * dec_layer
