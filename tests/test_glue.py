"""The GLUE task: loaders on the real GLUE files, metrics against hand-computed values, recipes, errors, and
2-rank R-Drop runs through the real `deepspeed` launcher (tiny BERT, a few steps)."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil

import pytest
import torch

from engine.config import ConfigError, parse_args
from tasks import glue
from tests.helpers import DATA, metrics, run

GLUE = DATA / "glue"
FAST = ["--optim.impl", "torch", "--log.every_steps", "1", "--log.progress", "false", "--task.model", "tiny",
        "--checkpoint.export_hf", "false", "--checkpoint.save_best", "false"]


def make_task(*flags):
    cfg = parse_args(["--task", "glue", "--output_dir", "/nonexistent", "--ds_config", "ds_configs/zero2.json",
                      *flags])
    return glue.TASK(cfg, None)


# ---------------------------------------------------------------------------------------------- loaders

@pytest.mark.parametrize("name,folder,train,dev", [
    ("cola", "CoLA", 8551, 1043), ("sst2", "SST-2", 67349, 872), ("mrpc", "MRPC", 3668, 408),
    ("stsb", "STS-B", 5749, 1500), ("rte", "RTE", 2490, 277), ("wnli", "WNLI", 635, 71),
    ("mnli", "MNLI-sample", 8999, 1000), ("qnli", "QNLI-sample", 8999, 1000), ("qqp", "QQP-sample", 8999, 1000),
])
def test_loader_row_counts(name, folder, train, dev):
    spec = glue.SPECS[name]
    tr = glue.load_local(spec, str(GLUE / folder), "train")
    dv = glue.load_local(spec, str(GLUE / folder), "valid")
    assert (len(tr), len(dv)) == (train, dev)
    labels = set(tr.labels) | set(dv.labels)
    if spec.labels is None:
        assert all(isinstance(y, float) and 0 <= y <= 5 for y in labels) and len(labels) > 10
    else:
        assert labels == set(range(len(spec.labels)))      # every class occurs, nothing outside the label set
    assert all(isinstance(s, str) and s for s in tr.a[:100])
    assert (tr.b is None) == (len(spec.fields) == 1)


def test_loader_qnli_dev_tsv_and_exact_rows():
    qnli = glue.load_local(glue.SPECS["qnli"], str(GLUE / "QNLI"), "valid")
    assert len(qnli) == 5463
    assert qnli[1][2] == 1 and qnli[0][2] == 0             # not_entailment -> 1, entailment -> 0 (HF ids)
    cola = glue.load_local(glue.SPECS["cola"], str(GLUE / "CoLA"), "train")   # headerless: first row is data
    assert cola[0] == ("Our friends won't buy this analysis, let alone the next one we propose.", None, 1, "0")
    mrpc = glue.load_local(glue.SPECS["mrpc"], str(GLUE / "MRPC"), "valid")   # BOM header, quotes kept verbatim
    assert mrpc[0][1].startswith('" The foodservice pie business') and mrpc[0][2] == 1 and mrpc[1][2] == 0
    stsb = glue.load_local(glue.SPECS["stsb"], str(GLUE / "STS-B"), "valid")
    assert stsb[1][:3] == ("A young child is riding a horse.", "A child is riding a horse.", 4.75)
    sst = glue.load_local(glue.SPECS["sst2"], str(GLUE / "SST-2"), "valid")
    assert sst[1] == ("unflinchingly bleak and desperate ", None, 0, "1")


def test_collate_dynamic_padding_and_truncation():
    task = make_task("--task.name", "mrpc", "--task.data_dir", str(GLUE / "MRPC"), "--task.max_length", "16")
    ds = task.build_dataset("valid")
    short = [("a b", "c", 1, "0"), ("a b c d e", "f g", 0, "1")]
    b = task.collate(short)
    # [CLS] a b [SEP] c [SEP] = 6; [CLS] a b c d e [SEP] f g [SEP] = 10: padded to the longest in the batch
    assert b["input_ids"].shape == (2, 10) and b["attention_mask"].sum(1).tolist() == [6, 10]
    assert b["token_type_ids"][1].tolist() == [0] * 7 + [1] * 3
    assert b["labels"].dtype == torch.long and b["labels"].tolist() == [1, 0]
    long = task.collate([ds[i] for i in range(8)])
    assert long["input_ids"].shape[1] == 16                 # truncated to --task.max_length
    single = make_task("--task.name", "sst2", "--task.data_dir", str(GLUE / "SST-2"))
    sb = single.collate([("good movie", None, 1, "0")])
    assert sb["input_ids"].shape == (1, 4) and sb["token_type_ids"].sum() == 0
    reg = make_task("--task.name", "stsb", "--task.data_dir", str(GLUE / "STS-B"))
    assert reg.collate([("a", "b", 4.75, "0")])["labels"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------- metrics

def test_metric_values_hand_computed():
    # CoLA: sklearn's matthews_corrcoef doc example ([+1,+1,+1,-1] vs [+1,-1,+1,+1]): TP 2, FN 1, FP 1, TN 0
    # -> (2*0 - 1*1) / sqrt(3*3*1*1) = -1/3
    m = glue.compute_glue_metrics("cola", [1, 0, 1, 1], [1, 1, 1, 0])
    assert m["mcc"] == pytest.approx(-1 / 3) and m["accuracy"] == pytest.approx(0.5)
    # MRPC/QQP: TP 2, FP 1, FN 1 -> precision = recall = 2/3 -> F1 2/3; 3 of 5 right
    for name in ("mrpc", "qqp"):
        m = glue.compute_glue_metrics(name, [1, 0, 0, 1, 1], [1, 1, 0, 0, 1])
        assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(0.6)
    # F1 is on class 1, not macro: all-zero predictions give F1 0 with accuracy 0.75
    assert glue.compute_glue_metrics("mrpc", [0, 0, 0, 0], [0, 0, 0, 1])["f1"] == 0.0
    # STS-B: x = 1..5, y = [2,4,5,4,5]: Pearson 6/sqrt(60); ranks of y [1,2.5,4.5,2.5,4.5] -> Spearman 7/sqrt(90)
    m = glue.compute_glue_metrics("stsb", [1.0, 2, 3, 4, 5], [2.0, 4, 5, 4, 5])
    assert m["pearson"] == pytest.approx(6 / math.sqrt(60)) and m["spearman"] == pytest.approx(7 / math.sqrt(90))
    for name in ("sst2", "qnli", "rte", "wnli", "mnli"):
        assert glue.compute_glue_metrics(name, [0, 1, 2 % 2, 1], [0, 1, 1, 1]) == {"accuracy": 0.75}


def test_primary_metric_per_task():
    expect = {"cola": "mcc", "sst2": "accuracy", "mrpc": "f1", "stsb": "pearson", "qqp": "f1", "mnli": "accuracy_m",
              "qnli": "accuracy", "rte": "accuracy", "wnli": "accuracy"}
    for name, metric in expect.items():
        task = make_task("--task.name", name)
        assert (task.metric, task.metric_mode) == (metric, "max")
        assert task.regression == (name == "stsb") and task.num_labels == {"stsb": 1, "mnli": 3}.get(name, 2)
        assert (task.cfg.metric, task.cfg.regression) == (metric, name == "stsb")   # one owner: the task's Config


def test_consistency_mse_for_stsb_kl_for_classification():
    a = torch.tensor([1.0, 2.0, -0.5])
    b = torch.tensor([1.5, 1.0, -0.5])
    reg = make_task("--task.name", "stsb")
    out_a, out_b = glue.TaskOutput(a, torch.zeros(3)), glue.TaskOutput(b, torch.zeros(3))
    assert reg.consistency(out_a, out_b).item() == pytest.approx(0.25 + 1.0 + 0.0)       # sum of squared diffs
    assert reg.loss(glue.TaskOutput(a, torch.tensor([1.0, 1.0, 0.5]))).item() == pytest.approx(0 + 1 + 1)
    cls = make_task("--task.name", "rte")
    la, lb = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])   # P1 = (1/2, 1/2), P2 = (3/4, 1/4)
    kl12 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    kl21 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    got = cls.consistency(glue.TaskOutput(la, torch.zeros(1, dtype=torch.long)),
                          glue.TaskOutput(lb, torch.zeros(1, dtype=torch.long)))
    assert got.item() == pytest.approx((kl12 + kl21) / 2)


def test_recipes_table1():
    cfg = parse_args(["--task", "glue", "--output_dir", "/x", "--ds_config", "ds_configs/zero2.json",
                      "--recipe", "mrpc"])
    assert cfg.task_cfg.name == "mrpc" and cfg.task_cfg.dropout == 0.1 and cfg.task_cfg.model == "bert-base-uncased"
    assert (cfg.optim.lr, cfg.train.max_steps, cfg.train.micro_batch_size, cfg.rdrop.alpha) == (1e-5, 2296, 16, 1.0)
    assert (cfg.optim.name, cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps, cfg.optim.weight_decay) == \
        ("adamw", 0.9, 0.98, 1e-6, 0.01)
    assert cfg.optim.no_decay_bias_norm and cfg.optim.schedule == "linear" and cfg.optim.warmup_steps == 138
    expect = {"cola": (5336, 16, 0.5), "rte": (3120, 8, 1.0), "sst2": (20935, 32, 1.0), "mnli": (123873, 32, 0.5),
              "qnli": (33112, 32, 1.0), "qqp": (113272, 32, 0.5), "stsb": (3598, 16, 1.0)}
    for name, (steps, batch, alpha) in expect.items():
        c = parse_args(["--task", "glue", "--output_dir", "/x", "--ds_config", "ds_configs/zero2.json",
                        "--recipe", name, "--task.model", "minilm"])       # flags override the recipe
        assert (c.task_cfg.name, c.train.max_steps, c.train.micro_batch_size, c.rdrop.alpha) == \
            (name, steps, batch, alpha)
        assert c.optim.lr == 1e-5 and c.optim.warmup_steps == round(0.06 * steps) and c.task_cfg.model == "minilm"


# ---------------------------------------------------------------------------------------------- bad input

def _copy(tmp_path, folder, name="d"):
    dst = tmp_path / name
    shutil.copytree(GLUE / folder, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def _online() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "yes")


def test_bad_inputs_one_line_errors(tmp_path):
    spec = glue.SPECS["rte"]
    d = _copy(tmp_path, "RTE")
    lines = (d / "train.tsv").read_text().splitlines()
    # malformed row: a field missing on line 5
    (d / "train.tsv").write_text("\n".join(lines[:4] + ["\t".join(lines[4].split("\t")[:3])] + lines[5:]) + "\n")
    with pytest.raises(ConfigError, match=r"train\.tsv line 5: expected 4 tab-separated fields, got 3"):
        glue.load_local(spec, str(d), "train")
    # label outside the label set, line 3
    bad = lines[2].split("\t")
    bad[3] = "maybe"
    (d / "train.tsv").write_text("\n".join(lines[:2] + ["\t".join(bad)] + lines[3:]) + "\n")
    with pytest.raises(ConfigError, match=r"train\.tsv line 3: label 'maybe' is not one of rte's labels"):
        glue.load_local(spec, str(d), "train")
    # wrong columns: SST-2 files given to a pair task
    with pytest.raises(ConfigError, match=r"needs \['sentence1', 'sentence2'\].*point --task.data_dir at the RTE"):
        glue.load_local(spec, str(GLUE / "SST-2"), "train")
    # empty split (header only)
    (d / "dev.tsv").write_text(lines[0] + "\n")
    with pytest.raises(ConfigError, match=r"dev\.tsv has no examples"):
        glue.load_local(spec, str(d), "valid")
    # missing split
    with pytest.raises(ConfigError, match=r"no test data for rte"):
        glue.load_local(spec, str(d), "test")
    # jsonl: bad JSON, out-of-range label id, missing field
    j = tmp_path / "mnli"
    j.mkdir()
    good = (GLUE / "MNLI-sample" / "dev.jsonl").read_text().splitlines()[:3]
    (j / "train.jsonl").write_text("\n".join(good[:2] + ["{not json"]) + "\n")
    with pytest.raises(ConfigError, match=r"train\.jsonl line 3: not valid JSON"):
        glue.load_local(glue.SPECS["mnli"], str(j), "train")
    (j / "train.jsonl").write_text(json.dumps({"premise": "a", "hypothesis": "b", "label": 3}) + "\n")
    with pytest.raises(ConfigError, match=r"line 1: label 3 is not one of mnli's labels"):
        glue.load_local(glue.SPECS["mnli"], str(j), "train")
    (j / "train.jsonl").write_text(json.dumps({"premise": "a", "label": 0}) + "\n")
    with pytest.raises(ConfigError, match=r"line 1: .* lack \['hypothesis'\]"):
        glue.load_local(glue.SPECS["mnli"], str(j), "train")
    # STS-B score outside [0, 5]
    s = _copy(tmp_path, "STS-B", "s")
    sl = (s / "dev.tsv").read_text().splitlines()
    (s / "dev.tsv").write_text("\n".join(sl[:2] + [sl[2].rsplit("\t", 1)[0] + "\t7.5"]) + "\n")
    with pytest.raises(ConfigError, match=r"dev\.tsv line 3: STS-B score 7.5 is outside"):
        glue.load_local(glue.SPECS["stsb"], str(s), "valid")
    # the hub while offline (the tests run with HF_HUB_OFFLINE=1), an unknown model
    if not _online():
        with pytest.raises(ConfigError, match=r"could not load hub dataset 'glue' \(rte\).*pass --task.data_dir"):
            make_task("--task.name", "rte").build_dataset("train")
        with pytest.raises(ConfigError, match=r"could not load model 'no-such-model-xyz'.*--task.model minilm"):
            make_task("--task.name", "rte", "--task.model", "no-such-model-xyz").build_model({})
        hub = make_task("--task.dataset", "MRPC")            # "mrpc" style names GLUE's config and the task
        assert hub.spec.name == "mrpc" and hub.metric == "f1"
        with pytest.raises(ConfigError, match=r"hub dataset 'glue' \(mrpc\) split 'validation'"):
            hub.build_dataset("valid")
    # every message is one line
    with pytest.raises(ConfigError) as e:
        make_task("--task.name", "mnli-x")
    assert "\n" not in str(e.value) and "choose one of cola|sst2" in str(e.value)


def test_cli_errors_exit_2_single_line(tmp_path):
    p = run(["--task", "glue", "--output_dir", str(tmp_path / "o1"), "--ds_config", "ds_configs/zero2.json",
             "--task.name", "glu", *FAST], check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert p.stderr.startswith("error: --task.name 'glu' is not a GLUE task: choose one of")
    d = _copy(tmp_path, "RTE")
    lines = (d / "train.tsv").read_text().splitlines()
    (d / "train.tsv").write_text("\n".join(lines[:6] + [lines[6] + "\textra"] + lines[7:]) + "\n")
    p = run(["--task", "glue", "--output_dir", str(tmp_path / "o2"), "--ds_config", "ds_configs/zero2.json",
             "--task.name", "rte", "--task.data_dir", str(d), "--train.max_steps", "1", *FAST], check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"{d / 'train.tsv'} line 7: expected 4 tab-separated fields, got 5" in err[0]


# ---------------------------------------------------------------------------------------------- real runs

def _small_task_dir(tmp_path, folder, n_train, n_dev, n_test, drop_label_col):
    """A tmp copy of a GLUE task dir with the first rows of train/dev and a GLUE-style unlabeled test.tsv."""
    d = tmp_path / folder
    d.mkdir()
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = (GLUE / folder / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        (d / f"{split}.tsv").write_text("\n".join(rows[:n + 1]) + "\n", encoding="utf-8")
    dev = (GLUE / folder / "dev.tsv").read_text(encoding="utf-8").splitlines()
    test = ["\t".join(c for i, c in enumerate(r.split("\t")) if i != drop_label_col) for r in dev[:n_test + 1]]
    (d / "test.tsv").write_text("\n".join(test) + "\n", encoding="utf-8")
    return d


def _read_predictions(path):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@pytest.mark.dist
@pytest.mark.parametrize("name,folder,label_col,nproc", [("rte", "RTE", 3, 1), ("stsb", "STS-B", 9, 2)])
def test_rdrop_run(tmp_path, name, folder, label_col, nproc):
    """The task's real-launcher run is STS-B's (regression: the MSE consistency) on 2 ranks; RTE (classification)
    runs as one plain process: the launcher adds nothing the STS-B run does not already show."""
    d = _small_task_dir(tmp_path, folder, 64, 41, 23, label_col)
    out = tmp_path / "run"
    run(["--task", "glue", "--output_dir", str(out), "--ds_config", "ds_configs/zero2.json", "--task.name", name,
         "--task.data_dir", str(d), "--train.max_steps", "3", "--train.micro_batch_size", "4",
         "--task.max_length", "64", "--optim.lr", "1e-3", "--eval.batch_size", "16", "--rdrop.alpha", "1.0", *FAST],
        nproc=nproc, launcher="deepspeed" if nproc > 1 else "python", timeout=400)
    train = metrics(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["consistency"] > 0 and math.isfinite(r["loss"]) for r in train)
    # loss = nll (averaged over both copies) * 2 + alpha * consistency, per example of one copy
    for r in train:
        assert r["loss"] == pytest.approx(2 * r["nll"] + r["consistency"], rel=1e-4)
    ev = metrics(out, "eval")[-1]
    if name == "stsb":
        assert set(ev) >= {"pearson", "spearman", "loss"} and -1 <= ev["pearson"] <= 1
    else:
        assert set(ev) >= {"accuracy", "loss"} and 0 <= ev["accuracy"] <= 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == nproc and cfg["rdrop"]["mode"] == "rdrop"
    pred = _read_predictions(out / "predictions" / ("RTE.tsv" if name == "rte" else "STS-B.tsv"))
    assert pred[0] == ["index", "prediction"] and [r[0] for r in pred[1:]] == [str(i) for i in range(23)]
    if name == "rte":
        assert {r[1] for r in pred[1:]} <= {"entailment", "not_entailment"}
    else:
        assert all(0.0 <= float(r[1]) <= 5.0 and len(r[1].split(".")[1]) == 3 for r in pred[1:])


@pytest.mark.dist
def test_mnli_matched_and_mismatched(tmp_path):
    d = tmp_path / "mnli"
    d.mkdir()
    src = (GLUE / "MNLI-sample" / "dev.jsonl").read_text().splitlines()
    train = (GLUE / "MNLI-sample" / "train.jsonl").read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join(train[:32]) + "\n")
    (d / "dev_matched.jsonl").write_text("\n".join(src[:30]) + "\n")
    (d / "dev_mismatched.jsonl").write_text("\n".join(src[30:50]) + "\n")
    for stem, rows in (("test_matched", src[50:57]), ("test_mismatched", src[57:62])):
        recs = [dict(json.loads(r), label=-1, idx=100 + i) for i, r in enumerate(rows)]
        (d / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "run"
    run(["--task", "glue", "--output_dir", str(out), "--ds_config", "ds_configs/zero2.json", "--task.name", "mnli",
         "--task.data_dir", str(d), "--train.max_steps", "2", "--train.micro_batch_size", "8",
         "--task.max_length", "48", *FAST], timeout=300)
    ev = metrics(out, "eval")[-1]
    assert set(ev) >= {"accuracy_m", "accuracy_mm", "loss_m", "loss_mm"}
    # accuracies over 30 and 20 examples: multiples of 1/30 and 1/20
    assert round(ev["accuracy_m"] * 30, 6).is_integer() and round(ev["accuracy_mm"] * 20, 6).is_integer()
    m, mm = (_read_predictions(out / "predictions" / f) for f in ("MNLI-m.tsv", "MNLI-mm.tsv"))
    assert [r[0] for r in m[1:]] == [str(100 + i) for i in range(7)] and len(mm) == 6
    assert {r[1] for r in m[1:] + mm[1:]} <= {"entailment", "neutral", "contradiction"}
