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


def image_processor(image_size: int):
    """The preprocessing of every ViT here, as a Hugging Face image processor: RGB (grey images repeated),
    bilinear resize to image_size x image_size, pixels / 255, normalised with mean 0.5 / std 0.5 (to [-1, 1], as
    HF ViT).  tasks/image_classification.py batches with it and exports it, so the engine's evaluation and
    ``pipeline("image-classification", model=EXPORT)`` preprocess identically.  The class is the one
    ``AutoImageProcessor`` picks on this machine: the torchvision backend when torchvision is installed, else PIL
    (their bilinear resizes differ in the last bits)."""
    from transformers.image_utils import PILImageResampling
    from transformers.utils import is_torchvision_available
    if is_torchvision_available():
        from transformers.models.vit.image_processing_vit import ViTImageProcessor as cls
    else:
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil as cls
    return cls(size={"height": image_size, "width": image_size}, resample=PILImageResampling.BILINEAR,
               do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True)


def build_vit(preset: str, num_labels: int, ds_config: dict, num_channels: int = 3, image_size: int = 0,
              dropout: float = 0.1, attention_dropout: float = 0.0, pretrained: str = "",
              label_names: list[str] | None = None):
    from transformers import ViTConfig, ViTForImageClassification

    overrides = dict(num_labels=num_labels, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=attention_dropout)
    if label_names:
        from engine.export import label_config
        overrides.update(label_config(label_names))
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
