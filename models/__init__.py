"""Named architectures built on Hugging Face transformers classes (see models/vit.py, models/hf.py)."""
