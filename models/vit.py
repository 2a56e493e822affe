"""Vision Transformer presets on HF ViTForImageClassification.

vit_b16 / vit_l16 are the paper's ViT-B/16 and ViT-L/16 (appendix A.5: 12 x 768 / 3,072 / 12 heads and
24 x 1,024 / 4,096 / 16 heads, patch 16, dropout 0.1).  small is the default for the offline demo on 8x8 digits
upscaled to 16x16, tiny is for tests.
"""
from __future__ import annotations

from models import hf

PRESETS: dict[str, dict] = {
    "tiny": dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64),
    "small": dict(image_size=16, patch_size=4, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=256),
    "vit_b16": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072),
    "vit_l16": dict(image_size=224, patch_size=16, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                    intermediate_size=4096),
}


def build_vit(preset: str, num_labels: int, ds_config: dict, num_channels: int = 3, image_size: int = 0,
              dropout: float = 0.1, attention_dropout: float = 0.0, pretrained: str = ""):
    from transformers import ViTConfig, ViTForImageClassification

    overrides = dict(num_labels=num_labels, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=attention_dropout)
    if pretrained:
        config = ViTConfig.from_pretrained(pretrained, **overrides)
        if image_size:
            config.image_size = image_size
        return hf.build(ViTForImageClassification, config, ds_config, pretrained, ignore_mismatched_sizes=True)
    arch = dict(PRESETS[preset])
    if image_size:
        arch["image_size"] = image_size
    config = ViTConfig(**arch, num_channels=num_channels, **overrides)
    return hf.build(ViTForImageClassification, config, ds_config)
