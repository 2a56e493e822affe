"""Image classification with a ViT (appendix A.5): top-1 accuracy.

Data, by ``--task.dataset`` / ``--task.data_dir``:
  digits (default)      scikit-learn's bundled 8x8 handwritten digits (1,797 images, installs with scikit-learn),
                        split 80/20 stratified with a fixed seed: train 1,437 / test 360
  a HF datasets name    e.g. cifar100 (needs the hub, or the datasets cache)
  --task.data_dir DIR   local parquet in the hub's layout (DIR/train*.parquet, DIR/test*.parquet, columns
                        img|image + label|fine_label; ../shared/data/cifar10 is one) or an image folder
                        (DIR/train/CLASS/*.png, DIR/test/CLASS/*.png)
Training batches are resized to the model's image size, randomly cropped (reflect-padded by size/8) and, except
for digits, flipped; evaluation only resizes.  Pixels are scaled to [-1, 1] (mean 0.5, std 0.5, as HF ViT).
"""
from __future__ import annotations

import glob
import io
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.config import ConfigError
from engine.task import Task, TaskConfig, TaskOutput
from models.vit import PRESETS, build_vit

IMAGE_COLUMNS = ("img", "image", "pixel_values")
# The authors' ViT alpha (0.3, vit_src) in engine units: 2 * a * B with their per-GPU micro-batch B = 512 / 16.
VIT_ALPHA = 2 * 0.3 * (512 // 16)
LABEL_COLUMNS = ("label", "fine_label", "labels")


@dataclass
class Config(TaskConfig):
    model: str = "small"          # preset: tiny | small | vit_b16 | vit_l16
    pretrained: str = ""          # HF model name or local directory with ViT weights (fresh classifier head)
    dataset: str = "digits"       # digits | a HF datasets name (cifar100, ...); ignored when data_dir is set
    data_dir: str = ""            # local parquet files or an image folder (see the module docstring)
    train_split: str = "train"
    test_split: str = "test"
    image_size: int = 0           # 0 = the preset's (16 small/tiny, 224 vit_b16/vit_l16)
    dropout: float = 0.1          # hidden dropout (the paper: 0.1)
    attention_dropout: float = 0.0
    augment: bool = True          # random crop (+ flip) on training batches
    hflip: str = "auto"           # auto (on, except digits) | true | false
    max_train_examples: int = 0   # use only the first N training examples (0 = all)
    max_eval_examples: int = 0    # evaluate on the first N examples of the eval split (0 = all)

    def validate(self) -> None:
        if self.model not in PRESETS:
            raise ConfigError(f"--task.model {self.model!r} is not a ViT preset: choose one of {', '.join(PRESETS)}")
        if not 0 <= self.dropout < 1 or not 0 <= self.attention_dropout < 1:
            raise ConfigError("--task.dropout and --task.attention_dropout must be in [0, 1)")
        if self.hflip not in ("auto", "true", "false"):
            raise ConfigError(f"--task.hflip must be auto, true or false, got {self.hflip!r}")
        if self.data_dir and not os.path.isdir(self.data_dir):
            raise ConfigError(f"--task.data_dir {self.data_dir} does not exist: pass a directory of parquet files "
                              "or an image folder")


class ImageSet:
    """A split as (uint8 HxWxC array, int label) pairs; images decoded lazily from the backing store."""

    def __init__(self, images, labels, decode=None):
        self.images, self.labels, self.decode = images, labels, decode

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i]
        return (self.decode(img) if self.decode else img), int(self.labels[i])


def _to_array(img) -> np.ndarray:
    from PIL import Image
    if isinstance(img, dict):
        img = Image.open(io.BytesIO(img["bytes"])) if img.get("bytes") else Image.open(img["path"])
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def load_digits_split(split: str) -> ImageSet:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]   # 0..16 -> 0..255, 1 channel
    tr_x, te_x, tr_y, te_y = train_test_split(images, d.target, test_size=0.2, random_state=0, stratify=d.target)
    if split == "train":
        return ImageSet(tr_x, tr_y)
    if split == "test":
        return ImageSet(te_x, te_y)
    raise ConfigError(f"digits has splits train and test, not {split!r}: set --task.test_split test")


def _columns(names: list[str], where: str) -> tuple[str, str]:
    img = next((c for c in IMAGE_COLUMNS if c in names), None)
    lab = next((c for c in LABEL_COLUMNS if c in names), None)
    if img is None or lab is None:
        raise ConfigError(f"{where} has columns {names}: an image column ({'|'.join(IMAGE_COLUMNS)}) and a label "
                          f"column ({'|'.join(LABEL_COLUMNS)}) are needed")
    return img, lab


def load_hf_split(ds) -> ImageSet:
    img, lab = _columns(list(ds.column_names), "the dataset")
    from datasets import Image as HFImage
    ds = ds.cast_column(img, HFImage(decode=False))
    return ImageSet(_Column(ds, img), np.asarray(list(ds[lab])), _to_array)


class _Column:
    """Lazy column access so a 50k-image split is not decoded (or even materialised) up front."""

    def __init__(self, ds, col):
        self.ds, self.col = ds, col

    def __getitem__(self, i):
        return self.ds[int(i)][self.col]

    def __len__(self):
        return len(self.ds)


def load_local_split(data_dir: str, split: str) -> ImageSet:
    parquet = sorted(glob.glob(os.path.join(data_dir, f"{split}*.parquet")) +
                     glob.glob(os.path.join(data_dir, split, "*.parquet")))
    import datasets
    if parquet:
        ds = datasets.load_dataset("parquet", data_files={split: parquet}, split=split)
        return load_hf_split(ds)
    folder = os.path.join(data_dir, split)
    if os.path.isdir(folder):
        classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        files, labels = [], []
        for c, name in enumerate(classes):
            for f in sorted(os.listdir(os.path.join(folder, name))):
                files.append({"path": os.path.join(folder, name, f)})
                labels.append(c)
        if not files:
            raise ConfigError(f"{folder} holds no images in class folders: use {folder}/CLASS/IMAGE.png")
        return ImageSet(files, np.array(labels), _to_array)
    raise ConfigError(f"no {split} data in {data_dir}: expected {split}*.parquet or a {split}/CLASS/ image folder")


class ImageClassification(Task):
    Config = Config
    metric = "accuracy"
    metric_mode = "max"
    default_eval_split = "test"

    @classmethod
    def default_overrides(cls):
        # The offline demo: a small ViT on digits, AdamW with warmup + linear decay; 30 epochs (660 steps on
        # 2 ranks) reach ~94% test accuracy in about a minute or two on 2 CPU cores.
        return {"optim.lr": 2e-3, "optim.weight_decay": 0.05, "optim.warmup_steps": 20, "optim.schedule": "linear",
                "train.max_epochs": 30, "train.micro_batch_size": 32, "rdrop.alpha": 0.6, "eval.every_steps": 200,
                "checkpoint.every_steps": 200, "checkpoint.keep_last": 2}

    @classmethod
    def recipes(cls):
        # Appendix A.5 / the authors' ViT code: SGD momentum 0.9, lr 3e-2 (CIFAR-100, ViT-B/16, 10k steps,
        # batch 512, warmup 500, cosine), dropout 0.1, alpha decaying with the lr.  Their loss is
        # CE_mean(a) + CE_mean(b) + a * (KL.sum + rKL.sum) with the KL summed over their per-GPU micro-batch B, so
        # their a = 0.3 is 2 * a * B here (engine/rdrop.py); batch 512 / accumulation 16 gives B = 32: 19.2.
        # 64 examples per rank x 8 ranks is their global batch of 512 (the alpha does not depend on it).
        return {"cifar100_vit_b16": {"task.model": "vit_b16", "task.dataset": "cifar100", "task.image_size": 224,
                                     "optim.name": "sgd", "optim.impl": "torch", "optim.lr": 3e-2,
                                     "optim.momentum": 0.9, "optim.weight_decay": 0.0, "optim.schedule": "cosine",
                                     "optim.warmup_steps": 500, "optim.clip_grad": 1.0, "train.max_steps": 10000,
                                     "train.micro_batch_size": 64, "rdrop.alpha": VIT_ALPHA,
                                     "rdrop.alpha_schedule": "linear_with_lr", "eval.every_steps": 1000,
                                     "checkpoint.every_steps": 1000}}

    def __init__(self, run_cfg, world=None):
        super().__init__(run_cfg, world)
        self._splits: dict = {}

    # -- data ------------------------------------------------------------------------------------------
    def _split_name(self, split: str) -> str:
        return {"train": self.cfg.train_split, "test": self.cfg.test_split, "valid": self.cfg.test_split}.get(
            split, split)

    def build_dataset(self, split: str) -> ImageSet:
        name = self._split_name(split)
        if name in self._splits:
            return self._splits[name]
        c = self.cfg
        if c.data_dir:
            ds = load_local_split(c.data_dir, name)
        elif c.dataset == "digits":
            ds = load_digits_split(name)
        else:
            import datasets
            try:
                ds = load_hf_split(datasets.load_dataset(c.dataset, split=name))
            except Exception as e:  # offline, unknown name, missing split
                raise ConfigError(f"could not load HF dataset {c.dataset!r} split {name!r} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:160]}): go online once, or use --task.data_dir") from None
        if split == "train":
            self._num_labels = int(np.max(ds.labels)) + 1 if len(ds) else 0
            if len(ds) and np.min(ds.labels) < 0:
                raise ConfigError(f"the {name} split has negative labels: labels must be class ids 0..C-1")
        limit = c.max_train_examples if split == "train" else c.max_eval_examples
        if limit and limit < len(ds):
            # a seeded random subset, not the head: files sorted by class (cifar10 parquet is) would give one class
            keep = np.sort(np.random.default_rng(0).choice(len(ds), limit, replace=False))
            ds = ImageSet(_Subset(ds.images, keep), np.asarray(ds.labels)[keep], ds.decode)
        if len(ds) == 0:
            raise ConfigError(f"the {name} split is empty: point --task.data_dir at data with images")
        self._splits[name] = ds
        return ds

    @property
    def num_labels(self) -> int:
        """Classes in the FULL training split (before --task.max_train_examples)."""
        self.build_dataset("train")
        return self._num_labels

    @property
    def is_digits(self) -> bool:
        return not self.cfg.data_dir and self.cfg.dataset == "digits"

    def image_size(self) -> int:
        return self.cfg.image_size or PRESETS[self.cfg.model]["image_size"]

    # -- model -----------------------------------------------------------------------------------------
    def build_model(self, ds_config: dict):
        c = self.cfg
        sample, _ = self.build_dataset("train")[0]
        self.channels = 3 if c.pretrained else sample.shape[-1]
        return build_vit(c.model, self.num_labels, ds_config, num_channels=self.channels, image_size=c.image_size,
                         dropout=c.dropout, attention_dropout=c.attention_dropout, pretrained=c.pretrained)

    # -- batches ---------------------------------------------------------------------------------------
    def collate(self, samples, generator=None):
        images = torch.from_numpy(np.stack([s[0] for s in samples])).permute(0, 3, 1, 2).float() / 255.0
        if images.shape[1] != getattr(self, "channels", images.shape[1]):
            images = images.expand(-1, self.channels, -1, -1) if images.shape[1] == 1 else images[:, :self.channels]
        size = self.image_size()
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if generator is not None and self.cfg.augment:
            images = self._augment(images, generator)
        labels = torch.tensor([s[1] for s in samples], dtype=torch.long)
        return {"pixel_values": (images - 0.5) / 0.5, "labels": labels}

    def _augment(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = images.shape
        pad = max(1, h // 8)
        padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
        ys = torch.randint(0, 2 * pad + 1, (n,), generator=g)
        xs = torch.randint(0, 2 * pad + 1, (n,), generator=g)
        out = torch.stack([padded[i, :, ys[i]:ys[i] + h, xs[i]:xs[i] + w] for i in range(n)])
        flip = self.cfg.hflip == "true" or (self.cfg.hflip == "auto" and not self.is_digits)
        if flip:
            mask = torch.rand(n, generator=g) < 0.5
            out[mask] = out[mask].flip(-1)
        return out

    # -- model call and metrics --------------------------------------------------------------------------
    def forward(self, model, batch):
        dtype = next(model.parameters()).dtype
        logits = model(pixel_values=batch["pixel_values"].to(dtype)).logits
        return TaskOutput(logits=logits, target=batch["labels"])

    def eval_step(self, out, batch):
        nll = F.cross_entropy(out.logits.float(), out.target, reduction="none")
        return {"pred": out.logits.argmax(-1), "target": out.target, "nll": nll}

    def compute_metrics(self, r):
        return {"accuracy": float((r["pred"] == r["target"]).float().mean()), "loss": float(r["nll"].mean())}


class _Subset:
    def __init__(self, seq, keep):
        self.seq, self.keep = seq, keep

    def __getitem__(self, i):
        return self.seq[int(self.keep[i])]

    def __len__(self):
        return len(self.keep)


TASK = ImageClassification
