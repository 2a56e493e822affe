"""Predict with an exported classifier: ``python -m engine.predict --model DIR --input FILE --output FILE``.

DIR is an export folder (DIR/hf_model, DIR/best_model) of a classification task; nothing of DeepSpeed or of the
training engine runs, only ``transformers.pipeline`` on the folder, with the arguments the export names in its
export.json (e.g. ``truncation=True`` for GLUE), so the predictions are the ones the engine evaluated.

Text (GLUE) input, one example per row, the task's text fields by name (export.json ``inputs``; e.g. sentence1,
sentence2 for RTE, question1 / question2 for QQP; GLUE's own TSV column names such as ``#1 String`` work too):
  .tsv   tab-separated with a header (GLUE's files: dev.tsv, test.tsv)      .csv   comma-separated with a header
  .jsonl one JSON object per line                                           .txt   one text per line (one-text tasks)
Image input: a folder (every image in it and its sub-folders, sorted by path) or a .txt list of image paths, one per
line (relative paths are relative to the list).
Output: ``index<TAB>label<TAB>score`` (images: ``path<TAB>label<TAB>score``) with a header; ``.jsonl`` output
writes one object per line instead.  label is the class name (config id2label), score its probability; for a
regression (GLUE STS-B) label is the output's name and score the predicted value.  An ``index`` / ``idx`` / ``id``
column of the input is kept, else the row number (from 0) is written.

Bad input stops with one line on stderr naming the fix, exit code 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from engine.records import json_lines

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
INDEX_COLUMNS = ("index", "idx", "id")


class PredictError(ValueError):
    """Bad input: the message is one line and says how to fix it."""


# ---------------------------------------------------------------------------------------------- the export

def read_export(model_dir: str) -> dict:
    """export.json of an export folder, or (for a plain HF folder) what can be read from its config."""
    if not os.path.isdir(model_dir):
        raise PredictError(f"--model {model_dir} is not a folder: pass an export folder such as RUN/hf_model")
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise PredictError(f"{model_dir} has no config.json: pass an export folder such as RUN/hf_model")
    manifest_path = os.path.join(model_dir, "export.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            m = json.load(f)
    else:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        image = os.path.isfile(os.path.join(model_dir, "preprocessor_config.json"))
        m = {"pipeline_tag": "image-classification" if image else "text-classification",
             "pipeline_kwargs": {} if image else {"truncation": True},
             "inputs": {"kind": "image"} if image else {"kind": "text", "fields": [], "aliases": {}},
             "model_type": cfg.get("model_type")}
    tag = m.get("pipeline_tag")
    if tag not in ("text-classification", "image-classification"):
        raise PredictError(f"{model_dir} is a {tag or 'non-classification'} export: engine.predict serves "
                           "classification exports (use the translate / summarize tools for generation)")
    return m


# ---------------------------------------------------------------------------------------------- text input

def _pick_columns(header: list[str], fields: list[str], aliases: dict, where: str) -> list[str]:
    cols = []
    for f in fields:
        names = [f] + ([aliases[f]] if aliases.get(f) else [])
        found = next((n for n in names if n in header), None)
        if found is None:
            raise PredictError(f"{where} has columns {header} but the model needs {fields} "
                               f"(missing {f}{' / ' + aliases[f] if aliases.get(f) else ''}): fix the header")
        cols.append(found)
    return cols


def _default_fields(header: list[str]) -> list[str]:
    """For a plain HF folder without export.json: the usual GLUE field names, in order."""
    for pair in (("sentence1", "sentence2"), ("question1", "question2"), ("premise", "hypothesis"),
                 ("question", "sentence"), ("text", "text_pair")):
        if all(p in header for p in pair):
            return list(pair)
    for single in ("sentence", "text"):
        if single in header:
            return [single]
    raise PredictError(f"cannot tell which columns hold the text among {header}: name them sentence (one text) or "
                       "sentence1 / sentence2 (pairs)")


def read_texts(path: str, inputs: dict) -> list[tuple[str, dict]]:
    """(index, {"text": ..., "text_pair": ...}) per row of a tsv / csv / jsonl / txt file."""
    if not os.path.isfile(path):
        raise PredictError(f"--input {path} does not exist: pass a .tsv, .csv, .jsonl or .txt file")
    fields, aliases = list(inputs.get("fields") or []), dict(inputs.get("aliases") or {})
    ext = os.path.splitext(path)[1].lower()
    rows: list[tuple[str, dict]] = []

    def add(i: int, rec: dict, cols: list[str], where: str) -> None:
        texts = [rec.get(c) for c in cols]
        if any(t is None for t in texts):
            raise PredictError(f"{where}: no value for {[c for c, t in zip(cols, texts) if t is None]}: fix the row")
        index = next((str(rec[k]) for k in INDEX_COLUMNS if rec.get(k) not in (None, "")), str(i))
        ex = {"text": str(texts[0])}
        if len(texts) > 1:
            ex["text_pair"] = str(texts[1])
        rows.append((index, ex))

    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8-sig", newline="") as f:
        if ext in (".tsv", ".csv"):
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if ext == ".tsv" else csv.reader(f)
            header = next(reader, None)
            if not header:
                raise PredictError(f"{path} is empty: a header row and one example per row are needed")
            header = [h.strip() for h in header]
            cols = _pick_columns(header, fields or _default_fields(header), aliases, path)
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise PredictError(f"{path} line {reader.line_num}: {len(row)} fields, the header has "
                                       f"{len(header)}: fix the row")
                add(len(rows), dict(zip(header, row)), cols, f"{path} line {reader.line_num}")
        elif ext in (".jsonl", ".json"):
            cols = None
            for line, rec in json_lines(f, path, PredictError):
                if cols is None:
                    cols = _pick_columns(sorted(rec), fields or _default_fields(sorted(rec)), aliases,
                                         f"{path} line {line}")
                add(len(rows), rec, cols, f"{path} line {line}")
        elif ext == ".txt":
            if len(fields) > 1:
                raise PredictError(f"{path}: this model reads pairs ({', '.join(fields)}): give a .tsv / .csv / "
                                   ".jsonl with those columns instead of a .txt")
            for line in f:
                if line.strip():
                    rows.append((str(len(rows)), {"text": line.rstrip("\n")}))
        else:
            raise PredictError(f"--input {path}: unknown extension {ext or '(none)'}: use .tsv, .csv, .jsonl or .txt")
    if not rows:
        raise PredictError(f"{path} holds no examples: one example per row is needed")
    return rows


# ---------------------------------------------------------------------------------------------- image input

def read_images(path: str) -> list[str]:
    """Image paths from a folder (recursively, sorted) or a list file."""
    if os.path.isdir(path):
        found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                       if name.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            raise PredictError(f"--input {path} holds no images ({', '.join(IMAGE_EXTENSIONS)}): pass a folder of "
                               "images or a .txt list of image paths")
        return found
    if not os.path.isfile(path):
        raise PredictError(f"--input {path} does not exist: pass a folder of images or a .txt list of image paths")
    if path.lower().endswith(IMAGE_EXTENSIONS):
        return [path]
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            p = line.strip()
            if not p:
                continue
            full = p if os.path.isabs(p) else os.path.join(base, p)
            if not os.path.isfile(full):
                raise PredictError(f"{path} line {line_no}: no image at {full}: fix the path")
            out.append(full)
    if not out:
        raise PredictError(f"{path} lists no images: one image path per line")
    return out


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError
    try:
        img = Image.open(path)
        img.load()
        return img
    except (UnidentifiedImageError, OSError) as e:
        raise PredictError(f"{path} is not a readable image ({type(e).__name__}): remove it or fix the file") from None


# ---------------------------------------------------------------------------------------------- running

def build_pipeline(model_dir: str, m: dict, device: str | None = None):
    from transformers import pipeline
    kwargs = {}
    backend = (m.get("inputs") or {}).get("backend")
    if m["pipeline_tag"] == "image-classification" and backend:
        from transformers import AutoImageProcessor    # the backend the engine evaluated with: identical pixels
        kwargs["image_processor"] = AutoImageProcessor.from_pretrained(model_dir, backend=backend)
    try:
        return pipeline(m["pipeline_tag"], model=model_dir, device=device, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise PredictError(f"could not load {model_dir} ({first}): pass a complete export folder") from None


def predict(model_dir: str, input_path: str, batch_size: int = 16, device: str | None = None):
    """[(index or path, label, score)] for every example of the input."""
    m = read_export(model_dir)
    inputs = m.get("inputs") or {}
    if m["pipeline_tag"] == "image-classification":
        paths = read_images(input_path)
        items, keys = None, paths
    else:
        rows = read_texts(input_path, inputs)
        keys, items = [r[0] for r in rows], [r[1] for r in rows]
    pipe = build_pipeline(model_dir, m, device)
    out = []
    if items is None:
        for start in range(0, len(keys), batch_size):   # open each chunk here: bad files fail with their name
            chunk = [_open_image(p) for p in keys[start:start + batch_size]]
            res = pipe(chunk, top_k=1, batch_size=batch_size)
            out += [r[0] if isinstance(r, list) else r for r in res]
    else:
        res = pipe(items, top_k=1, batch_size=batch_size, **(m.get("pipeline_kwargs") or {}))
        out = [r[0] if isinstance(r, list) else r for r in res]
    return [(k, r["label"], float(r["score"])) for k, r in zip(keys, out)]


def write_predictions(path: str, preds, key_name: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        if path.lower().endswith(".jsonl"):
            for k, label, score in preds:
                f.write(json.dumps({key_name: k, "label": label, "score": score}, ensure_ascii=False) + "\n")
        else:
            f.write(f"{key_name}\tlabel\tscore\n")
            for k, label, score in preds:
                f.write(f"{k}\t{label}\t{score:.6g}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.predict",
                                description="Predict label names with an exported classifier (no DeepSpeed).")
    p.add_argument("--model", required=True, help="an export folder: RUN/hf_model or RUN/best_model")
    p.add_argument("--input", required=True, help="text: .tsv/.csv/.jsonl/.txt; images: a folder or a .txt list")
    p.add_argument("--output", required=True, help=".tsv (index, label, score) or .jsonl")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: transformers' choice)")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()          # no "Loading weights" bars on stderr: errors stay one line
    try:
        if args.batch_size < 1:
            raise PredictError("--batch_size must be >= 1")
        preds = predict(args.model, args.input, args.batch_size, args.device)
        m = read_export(args.model)
        write_predictions(args.output, preds, "path" if m["pipeline_tag"] == "image-classification" else "index")
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"{len(preds)} predictions -> {args.output}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
