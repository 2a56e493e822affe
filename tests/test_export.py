"""Complete Hugging Face exports (issue 13, classification): a short real run per task, then the export folder is
used the way a new user would -- transformers.pipeline / the Auto classes / python -m engine.predict, without the
engine -- and must reproduce the engine's own final metric on the evaluation split.

One run per task (module-scoped fixtures, 1 rank, no launcher): GLUE RTE with the pretrained MiniLM (sentence pairs,
truncation at --task.max_length 64 on the full dev set), GLUE STS-B with the tiny BERT (regression, full dev set,
the best checkpoint exported under ZeRO-1), digits with the tiny ViT (full test split, ZeRO-0), CIFAR-10 parquet
from ../shared/data (a 200-image subset of the test split)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from engine import export as hf_export
from engine import predict
from engine.config import ConfigError, parse_args
from engine.task import get_task_class
from tests.helpers import DATA, PY, ROOT, env, metrics, run

GLUE = DATA / "glue"
COMMON = ["--optim.impl", "torch", "--log.progress", "false", "--log.every_steps", "1"]


def make_task(name, *flags):
    cfg = parse_args(["--task", name, "--output_dir", "/nonexistent", "--ds_config", "ds_configs/zero2.json", *flags])
    return get_task_class(name)(cfg, None)


def final_eval(out):
    return metrics(out, "eval")[-1]


def train(tmp_path_factory, name, args):
    out = tmp_path_factory.mktemp(name) / "run"
    run([*args, "--output_dir", str(out), *COMMON], timeout=400, OMP_NUM_THREADS=2)
    return out


RTE_FLAGS = ["--task.name", "rte", "--task.data_dir", str(GLUE / "RTE"), "--task.model", "minilm",
             "--task.max_length", "64"]
STSB_FLAGS = ["--task.name", "stsb", "--task.data_dir", str(GLUE / "STS-B"), "--task.model", "tiny",
              "--task.max_length", "64"]
CIFAR_FLAGS = ["--task.model", "tiny", "--task.data_dir", str(DATA / "cifar10"), "--task.max_train_examples", "256",
               "--task.max_eval_examples", "200"]


@pytest.fixture(scope="module")
def rte_run(tmp_path_factory):
    return train(tmp_path_factory, "rte", [
        "--task", "glue", *RTE_FLAGS, "--ds_config", "ds_configs/zero2.json", "--train.max_steps", "4",
        "--train.micro_batch_size", "8", "--optim.lr", "1e-4", "--eval.batch_size", "64",
        "--checkpoint.save_best", "false"])


@pytest.fixture(scope="module")
def stsb_run(tmp_path_factory):
    return train(tmp_path_factory, "stsb", [
        "--task", "glue", *STSB_FLAGS, "--ds_config", "ds_configs/zero1.json", "--train.max_steps", "6",
        "--eval.every_steps", "2", "--train.micro_batch_size", "16", "--optim.lr", "2e-3", "--eval.batch_size", "256"])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return train(tmp_path_factory, "digits", [
        "--task", "image_classification", "--task.model", "tiny", "--ds_config", "ds_configs/zero0.json",
        "--train.max_steps", "40", "--eval.every_steps", "20", "--optim.lr", "3e-3", "--eval.batch_size", "128"])


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    return train(tmp_path_factory, "cifar", [
        "--task", "image_classification", *CIFAR_FLAGS, "--ds_config", "ds_configs/zero2.json",
        "--train.max_steps", "8", "--train.micro_batch_size", "32", "--eval.batch_size", "100",
        "--checkpoint.save_best", "false"])


# ---------------------------------------------------------------------------------------------- helpers (unit)

def _bpe(specials=("<s>", "<pad>", "</s>", "<unk>")):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    lines = (DATA / "glue" / "RTE" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:120]
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials)))
    return tok


def test_fast_tokenizer_export_loads_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer
    tok = _bpe()
    special = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    out = tmp_path / "tok"
    hf_export.save_fast_tokenizer(tok, str(out), special, model_max_length=12, template="$A </s>")
    assert tok.post_processor is None                              # the caller's tokenizer is untouched
    (out / "config.json").write_text(json.dumps({"model_type": "fsmt"}))   # a model type with its own tokenizer
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["model_max_length"] == 12
    hf = AutoTokenizer.from_pretrained(str(out))
    text = "The cat sat on the mat."
    assert hf(text).input_ids == tok.encode(text).ids + [tok.token_to_id("</s>")]       # EOS appended, fairseq-style
    assert hf.decode(hf(text).input_ids, skip_special_tokens=True).strip() == text
    assert (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    long = " ".join(["word"] * 50)
    assert len(hf(long, truncation=True).input_ids) == 12             # truncation=True cuts at model_max_length
    batch = hf(["a", "a b c d"], padding=True)
    assert batch.input_ids[0][-1] == 1 and batch.attention_mask[0][-1] == 0
    pair = hf("a b", "c d").input_ids
    assert pair.count(2) == 2                                        # default pair template: $A </s> $B </s>


def test_fast_tokenizer_errors_are_one_line():
    tok = _bpe(specials=("<pad>", "<unk>"))
    with pytest.raises(ConfigError, match=r"special tokens \['</s>'\] are not in the tokenizer's vocabulary"):
        hf_export.fast_tokenizer(tok, {"eos_token": "</s>"})
    with pytest.raises(ConfigError, match="unknown special token keys"):
        hf_export.fast_tokenizer(tok, {"end_token": "<pad>"})
    with pytest.raises(ConfigError, match="uses"):
        hf_export.fast_tokenizer(tok, {"pad_token": "<pad>"}, template="$A <eos>")


def test_label_helpers(tmp_path):
    assert hf_export.label_config(["neg", "pos"]) == {"id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}}
    with pytest.raises(ConfigError, match="distinct"):
        hf_export.label_config(["a", "a"])
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}))
    hf_export.write_label_names(str(tmp_path), ["similarity"], "regression")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["id2label"] == {"0": "similarity"} and cfg["problem_type"] == "regression"


def test_command_record_strips_launcher_flags_and_survives_resume(tmp_path):
    argv = ["--local_rank=1", "--task", "glue", "--output_dir", str(tmp_path), "--local_rank", "0", "--task.name",
            "rte x"]
    cfg = types.SimpleNamespace(argv=argv, output_dir=str(tmp_path), resume="")
    rec = hf_export.command_record(cfg, 2)["run_command"]
    assert rec["command"] == f"python -m engine.train --task glue --output_dir {tmp_path} --task.name 'rte x'"
    assert rec["world_size"] == 2
    (tmp_path / "config.json").write_text(json.dumps({"run_command": rec}))
    again = hf_export.command_record(types.SimpleNamespace(argv=["--resume", "auto"], output_dir=str(tmp_path),
                                                           resume="auto"), 1)
    assert again["run_command"] == rec and again["resumed_with"][0]["command"].endswith("--resume auto")


def test_copy_assets_skips_weights(tmp_path):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "generation_config.json"):
        (src / name).write_text("x")
    assert hf_export.copy_assets(str(src), str(dst)) == ["README.md", "generation_config.json", "tokenizer.json"]


# ---------------------------------------------------------------------------------------------- GLUE

def _glue_pipeline_labels(model_dir, split, batch_size=32):
    from transformers import pipeline
    clf = pipeline("text-classification", model=str(model_dir))
    items = [{"text": a, "text_pair": b} if b is not None else a for a, b, _, _ in (split[i] for i in range(len(split)))]
    out = clf(items, top_k=1, truncation=True, batch_size=batch_size)
    return clf, [o[0] for o in out]


def test_glue_rte_export_is_complete_and_reproduces_accuracy(rte_run):
    from transformers import AutoTokenizer
    from tasks import glue
    folder = rte_run / "hf_model"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
            "export.json"} <= names
    assert not (rte_run / "best_model").exists()                 # --checkpoint.save_best false: nothing to export
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["id2label"] == {"0": "entailment", "1": "not_entailment"}
    assert cfg["problem_type"] == "single_label_classification"
    # the tokenizer: the engine's collate and AutoTokenizer(export) with truncation=True give the same ids
    task = make_task("glue", *RTE_FLAGS)
    dev = task.build_dataset("valid")
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok.model_max_length == 64 and len(tok) == 30522
    truncated = 0
    for start in range(0, len(dev), 64):
        rows = [dev[i] for i in range(start, min(start + 64, len(dev)))]
        batch = task.collate(rows)
        for j, (a, b, _, _) in enumerate(rows):
            enc = tok(a, b, truncation=True)
            n = int(batch["attention_mask"][j].sum())
            assert enc.input_ids == batch["input_ids"][j, :n].tolist()
            assert enc.token_type_ids == batch["token_type_ids"][j, :n].tolist()
            truncated += n == 64
    assert truncated > 50                                      # the truncation path is really exercised
    # one line, the whole dev set: the engine's final accuracy exactly
    engine = final_eval(rte_run)
    clf, out = _glue_pipeline_labels(folder, dev)
    assert {o["label"] for o in out} <= {"entailment", "not_entailment"}
    pred = [clf.model.config.label2id[o["label"]] for o in out]
    correct = sum(p == y for p, (_, _, y, _) in zip(pred, (dev[i] for i in range(len(dev)))))
    print(f"[export] RTE accuracy: engine {engine['accuracy']:.6f}, pipeline {correct}/{len(dev)} = "
          f"{correct / len(dev):.6f}")
    assert correct == round(engine["accuracy"] * len(dev)) and correct / len(dev) == pytest.approx(engine["accuracy"])
    # the same through engine.predict (no DeepSpeed in that process), from GLUE's own dev.tsv columns (40 rows)
    head = (GLUE / "RTE" / "dev.tsv").read_text(encoding="utf-8").splitlines()[:41]
    (rte_run / "dev40.tsv").write_text("\n".join(head) + "\n", encoding="utf-8")
    preds = _predict_subprocess(folder, rte_run / "dev40.tsv", rte_run / "pred.tsv")
    assert [p[1] for p in preds] == [o["label"] for o in out[:40]]
    assert [p[0] for p in preds] == [dev[i][3] for i in range(40)]      # GLUE's index column kept


def test_glue_model_card_and_manifest(rte_run):
    folder = rte_run / "hf_model"
    m = json.loads((folder / "export.json").read_text())
    engine = final_eval(rte_run)
    assert m["weights"] == "final" and m["step"] == 4 and m["eval_split"] == "valid"
    assert m["metrics"]["accuracy"] == engine["accuracy"] and m["pipeline_kwargs"] == {"truncation": True}
    assert m["inputs"]["fields"] == ["sentence1", "sentence2"] and m["labels"] == ["entailment", "not_entailment"]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-classification\n")
    assert f"| accuracy | {engine['accuracy']:.4f} |" in card
    assert "| R-Drop | mode rdrop, alpha 1.0 (constant) |" in card and "entailment, not_entailment" in card
    assert "python -m engine.train --task glue --task.name rte" in card and "Launcher: python, 1 rank(s)" in card
    assert f'pipeline("text-classification", model="{folder}")' in card and "truncation=True" in card
    cfg = json.loads((rte_run / "config.json").read_text())
    assert cfg["run_command"]["command"] in card


def test_glue_stsb_regression_and_best_model(stsb_run):
    from tasks import glue
    task = make_task("glue", *STSB_FLAGS)
    dev = task.build_dataset("valid")
    targets = np.array([dev[i][2] for i in range(len(dev))])
    evals = metrics(stsb_run, "eval")
    assert [r["step"] for r in evals] == [2, 4, 6]
    best = max(evals, key=lambda r: r["pearson"])               # the first of equal maxima is the one saved
    for folder, want in ((stsb_run / "hf_model", evals[-1]), (stsb_run / "best_model", best)):
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["problem_type"] == "regression" and cfg["id2label"] == {"0": "similarity"}
        m = json.loads((folder / "export.json").read_text())
        assert m["step"] == want["step"] and m["metrics"]["pearson"] == want["pearson"]
        _, out = _glue_pipeline_labels(folder, dev, batch_size=128)
        assert {o["label"] for o in out} == {"similarity"}
        pred = np.array([o["score"] for o in out], dtype=np.float32)
        got = glue.compute_glue_metrics("stsb", pred, targets.astype(np.float32))
        print(f"[export] STS-B {folder.name} (step {want['step']}) pearson: engine {want['pearson']:.8f}, "
              f"pipeline {got['pearson']:.8f}")
        assert got["pearson"] == pytest.approx(want["pearson"], abs=1e-6)
        assert got["spearman"] == pytest.approx(want["spearman"], abs=1e-6)
    m = json.loads((stsb_run / "best_model" / "export.json").read_text())
    assert m["weights"] == "best" and m["selected_by"] == "pearson (max)"
    assert f"the best checkpoint (highest pearson, step {m['step']} of 6)" in (stsb_run / "best_model" / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- images

def _pipeline_accuracy(model_dir, images, labels):
    from transformers import pipeline
    clf = pipeline("image-classification", model=str(model_dir))
    out = clf(images, top_k=1, batch_size=64)
    pred = [clf.model.config.label2id[o[0]["label"]] for o in out]
    return clf, sum(int(p == y) for p, y in zip(pred, labels)), [o[0]["label"] for o in out]


def test_digits_export_reproduces_accuracy(digits_run, tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor
    from transformers.image_utils import load_image
    task = make_task("image_classification", "--task.model", "tiny")
    test = task.build_dataset("test")
    pil = [Image.fromarray(test[i][0][:, :, 0], "L") for i in range(len(test))]
    labels = [test[i][1] for i in range(len(test))]
    for folder, step in ((digits_run / "hf_model", 40), (digits_run / "best_model", None)):
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "export.json"} <= names
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["id2label"] == {str(i): str(i) for i in range(10)} and cfg["num_channels"] == 3
        m = json.loads((folder / "export.json").read_text())
        want = next(r for r in metrics(digits_run, "eval") if r["step"] == (step or m["step"]))
        clf, correct, _ = _pipeline_accuracy(folder, pil, labels)
        print(f"[export] digits {folder.name} (step {want['step']}) accuracy: engine {want['accuracy']:.6f}, "
              f"pipeline {correct}/{len(test)} = {correct / len(test):.6f}")
        assert correct == round(want["accuracy"] * len(test))
    # the processor the pipeline loads IS the engine's: identical pixels for the whole test split
    proc = AutoImageProcessor.from_pretrained(str(digits_run / "hf_model"))
    assert type(proc) is type(task.image_processor)
    engine_px = task.collate([test[i] for i in range(len(test))])["pixel_values"]
    hf_px = proc(images=[load_image(p) for p in pil], return_tensors="pt")["pixel_values"]
    assert torch.equal(engine_px, hf_px)
    # engine.predict on a folder of PNG files (what a user has), in a process without DeepSpeed
    d = tmp_path / "pngs"
    d.mkdir()
    for i, img in enumerate(pil):
        img.save(d / f"{i:03d}.png")
    preds = _predict_subprocess(digits_run / "hf_model", d, tmp_path / "digits.tsv")
    assert [p[0] for p in preds] == [str(d / f"{i:03d}.png") for i in range(len(pil))]
    correct = sum(int(p[1] == str(y)) for p, y in zip(preds, labels))
    assert correct == round(final_eval(digits_run)["accuracy"] * len(test))


def test_cifar10_export_reproduces_accuracy(cifar_run):
    from PIL import Image
    task = make_task("image_classification", *CIFAR_FLAGS)
    test = task.build_dataset("test")
    assert len(test) == 200
    images = [Image.open(io.BytesIO(test.images[i]["bytes"])) for i in range(len(test))]      # the JPEGs as stored
    labels = [int(y) for y in test.labels]
    assert len(metrics(cifar_run)) == 8                        # the parquet of ../shared/data/cifar10 trains
    folder = cifar_run / "hf_model"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_channels"] == 3 and len(cfg["id2label"]) == 10
    assert list(cfg["id2label"].values()) == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                              "horse", "ship", "truck"]
    _, correct, out = _pipeline_accuracy(folder, images, labels)
    print(f"[export] CIFAR-10 accuracy: engine {final_eval(cifar_run)['accuracy']:.6f}, pipeline "
          f"{correct}/{len(test)} = {correct / len(test):.6f}")
    assert correct == round(final_eval(cifar_run)["accuracy"] * len(test))
    assert set(out) <= set(cfg["id2label"].values())


# ---------------------------------------------------------------------------------------------- predict

def _predict_subprocess(model_dir, input_path, output_path):
    code = ("import sys\nfrom engine import predict\n"
            f"rc = predict.main(['--model', {str(model_dir)!r}, '--input', {str(input_path)!r}, '--output', "
            f"{str(output_path)!r}, '--batch_size', '32'])\n"
            "assert not any(m == 'deepspeed' or m.startswith('deepspeed.') for m in sys.modules), 'deepspeed imported'\n"
            "sys.exit(rc)\n")
    p = subprocess.run([PY, "-c", code], cwd=ROOT, env=env(OMP_NUM_THREADS=2), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = output_path.read_text(encoding="utf-8").splitlines()
    assert lines[0] in ("index\tlabel\tscore", "path\tlabel\tscore")
    return [line.split("\t") for line in lines[1:]]


def _error(capsys, *argv):
    assert predict.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_predict_inputs_and_one_line_errors(rte_run, tmp_path, capsys):
    model = str(rte_run / "hf_model")
    rows = (GLUE / "RTE" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:6]
    recs = [dict(zip(("idx", "sentence1", "sentence2"), r.split("\t")[:3])) for r in rows]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "x.out.jsonl"
    assert predict.main(["--model", model, "--input", str(tmp_path / "x.jsonl"), "--output", str(out)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["index"] for g in got] == [r["idx"] for r in recs]
    assert all(g["label"] in ("entailment", "not_entailment") and 0.5 <= g["score"] <= 1 for g in got)
    csv_path = tmp_path / "x.csv"
    import csv
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sentence1", "sentence2"])
        w.writeheader()
        w.writerows({k: r[k] for k in ("sentence1", "sentence2")} for r in recs)
    assert predict.main(["--model", model, "--input", str(csv_path), "--output", str(tmp_path / "c.tsv")]) == 0
    c = [line.split("\t") for line in (tmp_path / "c.tsv").read_text().splitlines()[1:]]
    assert [x[0] for x in c] == ["0", "1", "2", "3", "4"] and [x[1] for x in c] == [g["label"] for g in got]
    capsys.readouterr()
    # bad input: one line each, exit 2
    assert "not a folder" in _error(capsys, "--model", str(tmp_path / "nope"), "--input", "x", "--output", "y")
    assert "does not exist" in _error(capsys, "--model", model, "--input", str(tmp_path / "none.tsv"), "--output", "y")
    err = _error(capsys, "--model", model, "--input", str(GLUE / "SST-2" / "dev.tsv"), "--output", str(tmp_path / "y"))
    assert "needs ['sentence1', 'sentence2'] (missing sentence1)" in err
    (tmp_path / "bad.jsonl").write_text(json.dumps(recs[0]) + "\n{oops\n")
    assert "bad.jsonl line 2: not valid JSON" in _error(capsys, "--model", model, "--input",
                                                        str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "y"))
    (tmp_path / "t.txt").write_text("one sentence\n")
    assert "reads pairs" in _error(capsys, "--model", model, "--input", str(tmp_path / "t.txt"), "--output", "y")
    (tmp_path / "t.xml").write_text("<a/>")
    assert "unknown extension .xml" in _error(capsys, "--model", model, "--input", str(tmp_path / "t.xml"),
                                              "--output", "y")
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "config.json").write_text("{}")
    (gen / "export.json").write_text(json.dumps({"pipeline_tag": "translation"}))
    assert "translation export" in _error(capsys, "--model", str(gen), "--input", "x", "--output", "y")


def test_predict_image_errors(digits_run, tmp_path, capsys):
    model = str(digits_run / "hf_model")
    (tmp_path / "empty").mkdir()
    assert "holds no images" in _error(capsys, "--model", model, "--input", str(tmp_path / "empty"), "--output", "y")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    assert "a.png is not a readable image" in _error(capsys, "--model", model, "--input", str(tmp_path / "broken"),
                                                     "--output", str(tmp_path / "y"))
    (tmp_path / "list.txt").write_text("missing.png\n")
    assert "list.txt line 1: no image at" in _error(capsys, "--model", model, "--input", str(tmp_path / "list.txt"),
                                                   "--output", "y")
