"""Shared text pieces for the token tasks (translation, summarization, language modelling): reading text and
tables (.gz too) with one-line errors, hub datasets, BPE training with ``tokenizers`` cached by a content hash,
encoding and decoding.

Private helper modules live in tasks/ with a leading underscore (``tasks/_text.py``, ``tasks/_seq2seq.py``): they
sit beside the tasks that use them, ``get_task_class`` never lists them (it skips ``_*``), and ``--task _text``
is refused because they define no ``TASK``.
"""
from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import json
import os

from engine.config import ConfigError
from engine.records import json_lines

BPE_VERSION = 1          # bump when a tokenizer recipe changes (part of every cache key)


# ------------------------------------------------------------------------------------------------ reading

def open_text(path: str, encoding: str = "utf-8"):
    return gzip.open(path, "rt", encoding=encoding, newline="") if path.endswith(".gz") else \
        open(path, encoding=encoding, newline="")


def _decode_error(path: str, e: UnicodeDecodeError, lines_read: int, encoding: str = "utf-8") -> ConfigError:
    if codecs.lookup(encoding).name == "utf-8":
        return ConfigError(f"{path} is not valid UTF-8 (line {lines_read + 1}: {e.reason}): re-encode it as UTF-8, "
                           "e.g. iconv -f latin1 -t utf-8")
    return ConfigError(f"{path} is not valid {encoding} text (line {lines_read + 1}: {e.reason}): give the file's "
                       f"real encoding or re-encode it (iconv -f FROM -t {encoding})")


def read_lines(path: str, encoding: str = "utf-8") -> list[str]:
    """Lines without their line ending (\\n, \\r\\n and \\r end a line, as in Python's text files, and nothing else:
    not the other characters str.splitlines() breaks on).  ``encoding``: of the file (UTF-8 by default).  Invalid
    text, an unknown encoding or an unreadable .gz is one ConfigError naming the file (and the line)."""
    out: list[str] = []
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ConfigError(f"{encoding!r} is not a known text encoding: use e.g. utf-8 or latin-1") from None
    try:
        with open_text(path, encoding) as f:
            for line in f:
                out.append(line.rstrip("\n").rstrip("\r"))
    except UnicodeDecodeError as e:
        raise _decode_error(path, e, len(out), encoding) from None
    except (OSError, EOFError) as e:
        raise ConfigError(f"cannot read {path} ({type(e).__name__}: {e}): check the file (a truncated or "
                          "corrupt .gz?)") from None
    return out


def table_format(path: str) -> str:
    base = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(base)[1].lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}.get(ext, "")


def read_table(path: str, columns: list[str]) -> dict[str, list[str]]:
    """The named text columns of a jsonl / csv / tsv file (.gz too); a missing column or a bad row is one
    ConfigError that names the file, the line and the fix.  Missing values read as ''."""
    fmt = table_format(path)
    if not fmt:
        raise ConfigError(f"{path}: unknown table format: use .jsonl, .csv or .tsv (optionally .gz)")
    out: dict[str, list[str]] = {c: [] for c in columns}
    line = 0
    try:
        with open_text(path) as f:
            if fmt == "jsonl":
                for line, rec in json_lines(f, path, ConfigError):
                    _take(rec, columns, out, path, line)
            else:
                reader = csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
                header = reader.fieldnames or []
                missing = [c for c in columns if c not in header]
                if missing:
                    raise ConfigError(f"{path} has no column {', '.join(map(repr, missing))} (columns: "
                                      f"{', '.join(header)}): pass the right column flag")
                for line, rec in enumerate(reader, 2):
                    _take(rec, columns, out, path, line)
    except UnicodeDecodeError as e:
        raise _decode_error(path, e, line) from None
    except csv.Error as e:
        raise ConfigError(f"{path} line {line + 1} is not valid {fmt.upper()} ({e}): fix the file") from None
    except (OSError, EOFError) as e:
        raise ConfigError(f"cannot read {path} ({type(e).__name__}: {e}): check the file") from None
    return out


def _take(rec: dict, columns: list[str], out: dict, path: str, line: int) -> None:
    for c in columns:
        if c not in rec:
            raise ConfigError(f"{path} line {line} has no field {c!r} (fields: {', '.join(rec)}): pass the right "
                              "column flag")
        v = rec[c]
        out[c].append("" if v is None else str(v))


def find_file(data_dir: str, stems: list[str], exts: list[str]) -> str | None:
    """The first DIR/STEM.EXT that exists (stems and extensions in order of preference)."""
    for stem in stems:
        for ext in exts:
            p = os.path.join(data_dir, f"{stem}{ext}")
            if os.path.isfile(p):
                return p
    return None


def load_hub(name: str, config: str | None, split: str):
    """A Hugging Face dataset split; offline or unknown names are one ConfigError."""
    try:
        import datasets
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # offline, unknown name / config / split
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise ConfigError(f"could not load dataset {name!r} (config {config or 'default'}, split {split!r}: "
                          f"{type(e).__name__}: {first}): go online once, or use --task.data_dir") from None


# ------------------------------------------------------------------------------------------------ BPE

def content_key(parts: list[list[str]], settings: dict) -> str:
    """A short hash of text lists and settings: names a tokenizer cache folder (data or settings change ->
    a new folder, so a stale tokenizer is never reused)."""
    h = hashlib.sha256()
    for part in parts:
        for line in part:
            h.update(line.encode("utf-8"))
            h.update(b"\n")
        h.update(b"\0")
    h.update(json.dumps({"v": BPE_VERSION, **settings}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def train_bpe(texts: list[str], vocab_size: int, specials: list[str], kind: str = "metaspace",
              unk: str | None = None):
    """A BPE ``tokenizers.Tokenizer`` trained on ``texts``; ``specials`` get ids 0, 1, ... in order.

    kind "metaspace": split on spaces (kept as the ``▁`` marker, so decoding restores the raw text) and
    punctuation, NFC-normalised; "byte_level": GPT-2 / BART byte-level BPE (no unknown symbols, any text)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token=unk))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
            pre_tokenizers.Punctuation(behavior="isolated")])
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        raise ValueError(f"unknown BPE kind {kind!r}")
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, s in enumerate(specials):
        assert tok.token_to_id(s) == i, "special tokens must take the first ids, in order"
    return tok


def cached_tokenizers(cache_root: str, key: str, files: list[str], train, settings: dict, log=print) -> str:
    """The folder ``cache_root/bpe-KEY`` holding ``files``; ``train(folder)`` writes them when the folder is not
    complete yet.  Files are written under temporary names and renamed, and a ``done`` marker comes last, so a
    crash never leaves a half-written tokenizer that a later run would trust.  Call on one process at a time
    (``Task.prepare`` runs on rank 0 first)."""
    folder = os.path.join(cache_root, f"bpe-{key}")
    done = os.path.join(folder, "done")
    if os.path.isfile(done) and all(os.path.isfile(os.path.join(folder, f)) for f in files):
        return folder
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the tokenizer cache {folder} ({e.strerror}): pass a writable "
                          "--task.cache_dir") from None
    tokenizers = train()
    for name, tok in tokenizers.items():
        tmp = os.path.join(folder, f"{name}.tmp{os.getpid()}")
        tok.save(tmp)
        os.replace(tmp, os.path.join(folder, name))
    with open(os.path.join(folder, "settings.json"), "w") as f:
        json.dump({"key": key, **settings}, f, indent=2, sort_keys=True)
    open(done, "w").close()
    log(f"trained BPE ({settings.get('vocab_size')} symbols) -> {folder}")
    return folder


def load_tokenizer(path: str):
    from tokenizers import Tokenizer
    if not os.path.isfile(path):
        raise ConfigError(f"tokenizer file {path} is missing: put --task.cache_dir on a file system every rank "
                          "sees, or delete the cache folder to retrain")
    return Tokenizer.from_file(path)


def encode(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (the task's layout adds them)."""
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True).strip()
