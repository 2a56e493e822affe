"""Image classification with a ViT (appendix A.5): top-1 accuracy.

Data, by ``--task.dataset`` / ``--task.data_dir``:
  digits (default)      scikit-learn's bundled 8x8 handwritten digits (1,797 images, installs with scikit-learn),
                        split 80/20 stratified with a fixed seed: train 1,437 / test 360 (cached in
                        ~/.cache/rdrop-deepspeed, so that ranks need not import scikit-learn)
  a HF datasets name    e.g. cifar100 (needs the hub, or the datasets cache)
  --task.data_dir DIR   local parquet in the hub's layout (DIR/train*.parquet, DIR/test*.parquet, columns
                        img|image + label|fine_label; ../shared/data/cifar10 is one) or an image folder
                        (DIR/train/CLASS/*.png, DIR/test/CLASS/*.png)
Every batch goes through the model's Hugging Face image processor (models/vit.image_processor): RGB (grey images
such as digits are repeated over 3 channels), bilinear resize to the model's image size, pixels / 255, mean 0.5 /
std 0.5 (to [-1, 1], as HF ViT).  Training batches are then randomly cropped (reflect-padded by size/8) and, except
for digits, flipped; evaluation is the processor alone.  The export saves that processor beside the weights, so
``pipeline("image-classification", model=DIR/hf_model)`` preprocesses exactly as the engine evaluated.

Label names (config id2label of the export): digits "0".."9"; the ClassLabel names of a hub dataset or of parquet
files that carry them; CIFAR-10's class names for a parquet folder named cifar10 without them; the class folder
names of an image folder; ``--task.label_names a,b,...`` overrides them.
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
from models.vit import PRESETS, build_vit, image_processor

IMAGE_COLUMNS = ("img", "image", "pixel_values")
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
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
    label_names: str = ""         # comma-separated class names in label-id order ("" = from the data, see above)

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

    def __init__(self, images, labels, decode=None, names=None):
        self.images, self.labels, self.decode = images, labels, decode
        self.names = list(names) if names else None      # class names in label-id order, when the data has them

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


def digits_cache_path() -> str:
    """Where the digits split is cached: $XDG_CACHE_HOME (or ~/.cache)/rdrop-deepspeed, keyed by the scikit-learn
    version that made it (its version string is read without importing it)."""
    from importlib.metadata import version
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "rdrop-deepspeed", f"digits-sklearn-{version('scikit-learn')}.npz")


def _digits_arrays() -> dict[str, np.ndarray]:
    """The 80/20 stratified split (seed 0) of scikit-learn's digits, 0..16 scaled to 0..255.  Made with scikit-learn
    once and cached (115 KB): importing scikit-learn costs every rank of every run 2-6 s on a small CPU."""
    path = digits_cache_path()
    try:
        with np.load(path) as z:
            return {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
    except (OSError, KeyError, ValueError):
        pass                                    # absent or unreadable: make it again
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]   # 0..16 -> 0..255, 1 channel
    tr_x, te_x, tr_y, te_y = train_test_split(images, d.target, test_size=0.2, random_state=0, stratify=d.target)
    arrays = {"train_x": tr_x, "train_y": tr_y, "test_x": te_x, "test_y": te_y}
    try:                                        # atomic: ranks that make it at once each replace a whole file
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass                                    # a read-only home: no cache, same arrays
    return arrays


def load_digits_split(split: str) -> ImageSet:
    names = [str(i) for i in range(10)]
    if split not in ("train", "test"):
        raise ConfigError(f"digits has splits train and test, not {split!r}: set --task.test_split test")
    a = _digits_arrays()
    return ImageSet(a[f"{split}_x"], a[f"{split}_y"], names=names)


def _columns(names: list[str], where: str) -> tuple[str, str]:
    img = next((c for c in IMAGE_COLUMNS if c in names), None)
    lab = next((c for c in LABEL_COLUMNS if c in names), None)
    if img is None or lab is None:
        raise ConfigError(f"{where} has columns {names}: an image column ({'|'.join(IMAGE_COLUMNS)}) and a label "
                          f"column ({'|'.join(LABEL_COLUMNS)}) are needed")
    return img, lab


def load_hf_split(ds) -> ImageSet:
    img, lab = _columns(list(ds.column_names), "the dataset")
    from datasets import ClassLabel, Image as HFImage
    feature = ds.features.get(lab)
    names = list(feature.names) if isinstance(feature, ClassLabel) else None
    ds = ds.cast_column(img, HFImage(decode=False))
    return ImageSet(_Column(ds, img), np.asarray(list(ds[lab])), _to_array, names)


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
        import pyarrow.parquet as pq
        for f in parquet:        # a truncated or corrupt file fails here, by name, not deep inside datasets
            try:
                pq.read_metadata(f)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
                raise ConfigError(f"{f} is not a readable parquet file ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:120]}): re-download or remove it") from None
        ds = load_hf_split(datasets.load_dataset("parquet", data_files={split: parquet}, split=split))
        folder_name = os.path.basename(os.path.normpath(data_dir)).lower().replace("-", "").replace("_", "")
        if ds.names is None and folder_name == "cifar10" and len(ds) and int(np.max(ds.labels)) <= 9:
            ds.names = list(CIFAR10_NAMES)       # the hub's cifar10 ClassLabel; plain parquet copies lose it
        return ds
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
        return ImageSet(files, np.array(labels), _to_array, classes)
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
        self._processor = None
        self.channels = 3                 # the image processor makes every image RGB (see models/vit.py)

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
            self._label_names = self._names_for(ds)
            self._num_labels = max(self._num_labels, len(self._label_names))
        limit = c.max_train_examples if split == "train" else c.max_eval_examples
        if limit and limit < len(ds):
            # a seeded random subset, not the head: files sorted by class (cifar10 parquet is) would give one class
            keep = np.sort(np.random.default_rng(0).choice(len(ds), limit, replace=False))
            ds = ImageSet(_Subset(ds.images, keep), np.asarray(ds.labels)[keep], ds.decode, ds.names)
        if len(ds) == 0:
            raise ConfigError(f"the {name} split is empty: point --task.data_dir at data with images")
        self._splits[name] = ds
        return ds

    @property
    def num_labels(self) -> int:
        """Classes in the FULL training split (before --task.max_train_examples), or the data's class names."""
        self.build_dataset("train")
        return self._num_labels

    @property
    def label_names(self) -> list[str]:
        self.build_dataset("train")
        return self._label_names

    def _names_for(self, ds: ImageSet) -> list[str]:
        n = self._num_labels
        if self.cfg.label_names:
            names = [x.strip() for x in self.cfg.label_names.split(",")]
            if len(names) < n or not all(names):
                raise ConfigError(f"--task.label_names gives {len(names)} names but the training labels go up to "
                                  f"{n - 1}: give one non-empty name per class id, comma-separated")
            return names
        if ds.names and len(ds.names) >= n:
            return list(ds.names)
        return [str(i) for i in range(n)]

    @property
    def is_digits(self) -> bool:
        return not self.cfg.data_dir and self.cfg.dataset == "digits"

    def image_size(self) -> int:
        return self.cfg.image_size or PRESETS[self.cfg.model]["image_size"]

    def check_data(self, splits, dataset=None) -> None:
        """Every split builds (the default), and every image the run will read decodes: images are decoded
        lazily during training, so a corrupt file would otherwise stop the run when its batch comes up.  The
        ranks share the work and fail together with the first bad file."""
        super().check_data(splits, dataset)
        from engine import distributed as dist_utils
        dataset = dataset or self.build_dataset
        rank, world = (self.world.rank, self.world.world_size) if self.world is not None else (0, 1)
        problems = []
        for split in dict.fromkeys(splits):
            ds = dataset(split)
            if ds.decode is None:
                continue
            for i in range(rank, len(ds), world):
                try:
                    ds[i]
                except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad image
                    img = ds.images[i]
                    where = img.get("path") if isinstance(img, dict) and img.get("path") else f"example {i}"
                    problems.append(f"the {self._split_name(split)} split: {where} is not a readable image "
                                    f"({type(e).__name__}: {str(e).splitlines()[0][:100]}): fix or remove it")
                    break
        if self.world is not None:
            problems = dist_utils.gather_problems(problems, self.world)
        if problems:
            raise ConfigError(problems[0])

    # -- model -----------------------------------------------------------------------------------------
    def build_model(self, ds_config: dict):
        c = self.cfg
        return build_vit(c.model, self.num_labels, ds_config, num_channels=self.channels, image_size=c.image_size,
                         dropout=c.dropout, attention_dropout=c.attention_dropout, pretrained=c.pretrained,
                         label_names=self.label_names)

    # -- batches ---------------------------------------------------------------------------------------
    @property
    def image_processor(self):
        """The one preprocessing (RGB, resize, scale, normalise) of training, evaluation and the export."""
        if self._processor is None:
            self._processor = image_processor(self.image_size())
        return self._processor

    def collate(self, samples, generator=None):
        # dataset images are HxWxC uint8 arrays (C = 1 for digits); the processor returns [N, 3, S, S] in [-1, 1]
        pixels = self.image_processor(images=[s[0] for s in samples], return_tensors="pt",
                                      input_data_format="channels_last")["pixel_values"]
        if generator is not None and self.cfg.augment:
            pixels = self._augment(pixels, generator)
        labels = torch.tensor([s[1] for s in samples], dtype=torch.long)
        return {"pixel_values": pixels, "labels": labels}

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


    # -- export ----------------------------------------------------------------------------------------------
    def export_info(self):
        c, size = self.cfg, self.image_size()
        if c.data_dir:
            data = f"images in {c.data_dir} (splits {c.train_split} / {c.test_split})"
        elif self.is_digits:
            data = ("scikit-learn's handwritten digits: 8x8 grey, values 0..16 stored as round(v * 255 / 16), "
                    "split 80/20 stratified (seed 0)")
        else:
            data = f"hub dataset {c.dataset} (splits {c.train_split} / {c.test_split})"
        if c.max_train_examples:
            data += f", {c.max_train_examples} training examples"
        if c.max_eval_examples:
            data += f", evaluated on {c.max_eval_examples} examples"
        p = self.image_processor
        usage = f"""```python
from transformers import pipeline

clf = pipeline("image-classification", model="{{path}}")
clf("image.png")            # a path, a URL or a PIL image; a list of them for several
# -> [{{'label': ..., 'score': ...}}, ...] (top 5 by default; top_k=1 for the best only)
```

The folder's image processor is the one the engine trained and evaluated with: RGB (grey images repeated over 3
channels), bilinear resize to {size}x{size}, pixels / 255, normalised with mean 0.5 / std 0.5.  The engine used
its {p.backend} backend; `AutoImageProcessor` picks torchvision when it is installed, whose bilinear resize
differs in the last bits: pass `image_processor=AutoImageProcessor.from_pretrained(path, backend="{p.backend}")`
to the pipeline to reproduce the engine's numbers exactly.{" Digits images are 8x8 grey PNGs with pixel = round(v * 255 / 16) of scikit-learn's 0..16 values." if self.is_digits else ""}"""
        return {"pipeline_tag": "image-classification", "pipeline_kwargs": {}, "labels": self.label_names,
                "inputs": {"kind": "image", "backend": p.backend}, "data": data, "usage": usage}

    def export(self, model, state_dict, out_dir):
        """Weights + config (label names) + the image processor every batch went through."""
        super().export(model, state_dict, out_dir)
        self.image_processor.save_pretrained(out_dir)


class _Subset:
    def __init__(self, seq, keep):
        self.seq, self.keep = seq, keep

    def __getitem__(self, i):
        return self.seq[int(self.keep[i])]

    def __len__(self):
        return len(self.keep)


TASK = ImageClassification
