"""Building Hugging Face models under DeepSpeed, ZeRO-3 included.

Under ZeRO-3 the model must be built inside transformers' own zero.Init, which it enters when an
``HfDeepSpeedConfig`` object is alive (a bare ``deepspeed.zero.Init`` breaks HF models on torch 2.13 /
transformers 5.x: see the notes in docs).  That object is created here and kept alive on the model until the
process ends; nothing else in the project needs to know.

Attention: models that support it get torch's scaled_dot_product_attention (``attn_implementation="sdpa"``: the
flash / memory-efficient kernels on a GPU), stated here rather than left to the library's default; others (FSMT,
whose attention is its own code) keep their eager attention.
"""
from __future__ import annotations

from engine.ds_config import zero_stage


def attn_implementation(model_cls) -> str | None:
    """"sdpa" when the model class supports torch's SDPA attention, else None (the model's own)."""
    return "sdpa" if getattr(model_cls, "_supports_sdpa", False) else None


def build(model_cls, config, ds_config: dict, pretrained: str = "", **from_pretrained_kwargs):
    """``model_cls`` from ``config`` (random init) or from ``pretrained`` (an HF name or a local directory)."""
    attn = attn_implementation(model_cls)
    if attn is not None:
        from_pretrained_kwargs.setdefault("attn_implementation", attn)
    dschf = None
    if zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig
        dschf = HfDeepSpeedConfig(ds_config)   # must outlive model construction
    if pretrained:
        model = model_cls.from_pretrained(pretrained, config=config, **from_pretrained_kwargs)
    else:
        model = model_cls._from_config(config, **({"attn_implementation": attn} if attn else {}))
    if dschf is not None:
        model._hf_deepspeed_config = dschf
    return model
