"""The image-classification task in-process: data sources, batches, augmentation, pretrained weights."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from engine.config import ConfigError, parse_args
from engine.distributed import rank_seed
from engine.task import get_task_class
from tests.helpers import DATA


def make_task(*flags):
    cfg = parse_args(["--task", "image_classification", "--output_dir", "/tmp/unused", "--ds_config",
                      "ds_configs/zero2.json", "--task.model", "tiny", *flags])
    return get_task_class("image_classification")(cfg)


def test_digits_split_sizes_and_labels():
    task = make_task()
    train, test = task.build_dataset("train"), task.build_dataset("test")
    assert (len(train), len(test)) == (1437, 360)
    assert task.num_labels == 10
    img, label = train[0]
    assert img.shape == (8, 8, 1) and img.dtype == np.uint8 and 0 <= label < 10


def test_digits_cache_is_the_sklearn_split_and_survives_a_bad_file(tmp_path, monkeypatch):
    """The cached split is scikit-learn's stratified 80/20 split (seed 0) exactly; a corrupt cache is remade."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from tasks import image_classification as ic
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = ic.digits_cache_path()
    assert path.startswith(str(tmp_path)) and not os.path.exists(path)
    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    tr_x, te_x, tr_y, te_y = train_test_split(x, d.target, test_size=0.2, random_state=0, stratify=d.target)
    for attempt in ("made", "read", "remade"):
        train, test = ic.load_digits_split("train"), ic.load_digits_split("test")
        assert np.array_equal(train.images, tr_x) and np.array_equal(train.labels, tr_y), attempt
        assert np.array_equal(test.images, te_x) and np.array_equal(test.labels, te_y), attempt
        assert os.path.isfile(path)
        if attempt == "read":
            open(path, "wb").write(b"not an npz")
    with pytest.raises(ConfigError, match="--task.test_split test"):
        ic.load_digits_split("validation")


def test_collate_resizes_normalises_and_augments_deterministically():
    task = make_task()
    samples = [task.build_dataset("train")[i] for i in range(6)]
    ev = task.collate(samples)
    # grey digits come out as RGB (the image processor's do_convert_rgb; what the HF pipeline feeds the export)
    assert ev["pixel_values"].shape == (6, 3, 16, 16) and ev["labels"].tolist() == [s[1] for s in samples]
    assert torch.equal(ev["pixel_values"][:, 0], ev["pixel_values"][:, 2])
    assert ev["pixel_values"].min() >= -1 and ev["pixel_values"].max() <= 1
    a = task.collate(samples, torch.Generator().manual_seed(5))
    b = task.collate(samples, torch.Generator().manual_seed(5))
    c = task.collate(samples, torch.Generator().manual_seed(6))
    assert torch.equal(a["pixel_values"], b["pixel_values"])          # same seed, same crops
    assert not torch.equal(a["pixel_values"], c["pixel_values"])
    assert not torch.equal(a["pixel_values"], ev["pixel_values"])     # training batches are augmented
    assert torch.equal(task.collate(samples)["pixel_values"], ev["pixel_values"])   # eval is not


def test_image_folder_and_bad_layouts(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            d = tmp_path / "imgs" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(d / f"{i}.png")
    task = make_task("--task.data_dir", str(tmp_path / "imgs"))
    train = task.build_dataset("train")
    assert len(train) == 6 and task.num_labels == 2 and train[0][0].shape == (12, 10, 3)
    assert sorted(int(train[i][1]) for i in range(6)) == [0, 0, 0, 1, 1, 1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no train data in"):
        make_task("--task.data_dir", str(tmp_path / "empty")).build_dataset("train")
    with pytest.raises(ConfigError, match="does not exist"):
        make_task("--task.data_dir", str(tmp_path / "missing"))


def test_parquet_wrong_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"pixels": [b"x"], "y": [1]}), tmp_path / "train.parquet")
    with pytest.raises(ConfigError, match="an image column"):
        make_task("--task.data_dir", str(tmp_path)).build_dataset("train")


def test_cifar10_parquet_rows_decode():
    task = make_task("--task.data_dir", str(DATA / "cifar10"), "--task.max_eval_examples", "20")
    test = task.build_dataset("test")
    assert len(test) == 20
    img, label = test[3]
    assert img.shape == (32, 32, 3) and 0 <= label <= 9


def test_pretrained_weights_from_a_local_directory(tmp_path):
    from models.vit import build_vit
    torch.manual_seed(0)
    src = build_vit("tiny", 5, {}, num_channels=3)
    src.save_pretrained(tmp_path / "vit")
    task = make_task("--task.pretrained", str(tmp_path / "vit"))
    model = task.build_model({})        # digits: 10 classes, a fresh head; the body is the saved one
    assert model.config.num_labels == 10 and task.channels == 3
    body_src = dict(src.vit.named_parameters())
    for name, p in model.vit.named_parameters():
        assert torch.equal(p, body_src[name]), name
    samples = [task.build_dataset("train")[i] for i in range(2)]
    assert task.collate(samples)["pixel_values"].shape == (2, 3, 16, 16)   # grey digits repeated to RGB


def test_presets_match_the_paper():
    from transformers import ViTConfig
    from models.vit import PRESETS
    b, large = PRESETS["vit_b16"], PRESETS["vit_l16"]
    assert (b["num_hidden_layers"], b["hidden_size"], b["intermediate_size"], b["num_attention_heads"],
            b["patch_size"]) == (12, 768, 3072, 12, 16)
    assert (large["num_hidden_layers"], large["hidden_size"], large["intermediate_size"],
            large["num_attention_heads"]) == (24, 1024, 4096, 16)
    # ViT-B/16 at 224 with a 1000-class head has 86.6M parameters (Dosovitskiy et al.)
    from transformers import ViTForImageClassification
    with torch.device("meta"):
        m = ViTForImageClassification(ViTConfig(**b, num_labels=1000))
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(86.6e6, rel=0.01)


def test_rank_seeds_differ_and_repeat():
    seeds = [rank_seed(1, r) for r in range(8)]
    assert len(set(seeds)) == 8 and seeds == [rank_seed(1, r) for r in range(8)]
    assert rank_seed(2, 0) != rank_seed(1, 0)
