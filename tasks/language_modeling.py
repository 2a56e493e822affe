"""Language modelling (appendix A.3): GPT-style and adaptive-input transformers on WikiText, with R-Drop.

Data (``--task.FIELD``), read once by ``prepare()`` on rank 0 (text files through tasks/_text.py, --task.encoding
for files that are not UTF-8) and cached (vocabulary + encoded token streams as .npy) under --task.cache_dir
(default OUTPUT_DIR/lm_data) in a folder keyed by the sources and the settings:
  data_dir        a folder with WikiText's wiki.{train,valid,test}.tokens (../shared/data/wikitext-2) or
                  {train,valid,test}.txt, or pass train_file / valid_file / test_file (any plain-text files)
  dataset         without files: a hub dataset with a ``text`` column, one line per row (``wikitext`` with
                  dataset_config ``wikitext-103-v1``, or ``wikitext-103-raw-v1`` for raw text + BPE)
  tokenizer       word (default): fairseq's preprocessing -- every line split on whitespace plus an end-of-line
                  </s>, a dictionary of the training split in fairseq's order (<s> <pad> </s> <unk>, then count
                  descending, ties alphabetical, padded to a multiple of 8 with madeupwordNNNN; WikiText's literal
                  <unk> is the <unk> entry), 267,744 symbols on WikiText-103 | bpe: a byte-level BPE of
                  --task.vocab_size trained on the training split (_text.train_bpe) | an HF tokenizer name or path
                  (``gpt2``; the default with --task.pretrained): each line encoded, then its end-of-line symbol
Training blocks: the whole split is one token stream cut into blocks of --task.tokens_per_sample tokens
(fairseq's --sample-break-mode none); block i predicts tokens [i*B, (i+1)*B) from the stream shifted by one (the
very first input is </s>), the last block may be shorter.  Batches: --train.max_tokens N (fairseq's --max-tokens;
the recipes' default) packs whole blocks, N // tokens_per_sample of them per micro-batch (``example_sizes`` gives
the block lengths to engine/data.py), or --train.micro_batch_size blocks; the engine's seeded sampler shuffles them.

Loss (the engine's one reduction, units = scored target tokens of one copy): NLL summed over tokens (label
smoothing --task.label_smoothing, default 0) and the R-Drop hook's per-token symmetric KL, always the engine's
default loss / rdrop_terms.  GPT models: with --task.fused_loss auto (fused from fused_loss.FUSED_MIN_VOCAB
symbols, e.g. WikiText-2's 33,280) or true, the forward returns GPT-2's final hidden states (through the model's own
forward, its tied lm_head asked for no position) and the engine's fused, chunked loss projects them chunk by chunk
(engine/fused_loss.py: no [2 x tokens, V] logits in forward or backward; evaluation NLL in chunks too); false gives
full logits.  The adaptive softmax is its own head (AdaptiveTokenLoss, the same interface): NLL with fairseq's
adaptive loss, and the KL over the FULL output distribution (the authors' reg_adaptive_loss
compares head and tail distributions separately): a [tokens, V] log-probability tensor per copy would take
tokens x V x 4 bytes (6,144 R-Drop tokens x 267,744 words = 6.6 GB each, a few of them live with autograd), so
the full distribution is produced in chunks of positions whose size keeps one chunk's pair of [c, V] tensors
under --task.softmax_chunk_mb (256 MB: c = 125 tokens on WikiText-103), reduced at once and recomputed in backward
(models/adaptive_lm.py, AdaptiveSoftmax).  Peak memory is then a few chunks' worth whatever the batch: measured
on CPU for 256 positions x 2 copies over 267,744 words, +3.4 GB unchunked (about 6.5 times one [2, n, V] tensor)
against +0.49 GB in chunks of 16 positions.

Evaluation: loss per token (natural log) and perplexity exp(loss) on the valid split at every evaluation and on
the test split at the final one (test_loss, test_ppl); the best checkpoint is picked by valid ``ppl``.  With
--task.context_window C (fairseq eval_lm --context-window) the split is scored in windows of
--task.eval_tokens_per_sample W (default: tokens_per_sample) tokens of which only the last W - C are scored, the
first C being the preceding tokens as context; every token is scored exactly once.  For sub-word tokenizers
``word_ppl`` normalises the same total NLL by words (+ one end-of-line per line) instead of tokens.

Recipes: wikitext103_transformer_lm_gpt, wikitext103_adaptive (appendix A.3 with fairseq's / the authors' settings:
tokens per batch x update frequency, NAG for the adaptive model) and wikitext2_small (a small GPT on WikiText-2
for a CPU machine; results/lm_wikitext2).

Export (DIR/hf_model, DIR/best_model): a complete HF folder -- weights and config (the adaptive model with its code,
adaptive_lm.py, and ``auto_map`` for ``trust_remote_code=True``), the tokenizer (the word vocabulary as a WordLevel
PreTrainedTokenizerFast with a whitespace split, <unk>, </s> as eos and line break; the BPE; or the pretrained
tokenizer), generation_config.json (greedy, stops at </s>), and a card whose usage code (the text-generation
pipeline, and the perplexity with the run's windows through AutoModelForCausalLM) reproduces the engine's numbers.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engine import fused_loss, losses
from engine.config import ConfigError
from engine.task import Task, TaskConfig, TaskOutput
from models import transformer_lm as lm
from tasks import _text

IGNORE = -100                                   # target of a position that is not scored (padding, context)
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")    # fairseq Dictionary order: bos 0, pad 1, eos 2, unk 3
BOS, PAD, EOS, UNK = 0, 1, 2, 3
SPLITS = ("train", "valid", "test")
FILE_CANDIDATES = {
    "train": ("wiki.train.tokens", "wiki.train.raw", "train.txt", "train.tokens", "train.raw"),
    "valid": ("wiki.valid.tokens", "wiki.valid.raw", "valid.txt", "valid.tokens", "valid.raw", "validation.txt",
              "val.txt", "dev.txt"),
    "test": ("wiki.test.tokens", "wiki.test.raw", "test.txt", "test.tokens", "test.raw"),
}
CACHE_VERSION = 3                               # 3: BPE from _text.train_bpe (a space before every line's first word)
FUSED_SETTINGS = ("auto", "true", "false", "on", "off")


@dataclass
class Config(TaskConfig):
    model: str = "small"            # GPT: tiny | mini | small | transformer_lm_gpt; adaptive input: adaptive_tiny |
                                    # adaptive_small | transformer_lm_wiki103 (models/transformer_lm.py)
    pretrained: str = ""            # an HF GPT-2 name or directory (gpt2), or an export of this task (DIR/hf_model,
                                    # GPT or adaptive): initial weights, and its tokenizer / vocabulary
    data_dir: str = ""              # wiki.{train,valid,test}.tokens or {train,valid,test}.txt
    train_file: str = ""            # explicit plain-text files (override data_dir discovery)
    valid_file: str = ""
    test_file: str = ""
    dataset: str = ""               # hub dataset when no files are given (wikitext)
    dataset_config: str = ""        # its config (wikitext-103-v1 / wikitext-103-raw-v1 / wikitext-2-v1)
    encoding: str = "utf-8"         # of the text files
    tokenizer: str = ""             # word | bpe | a fairseq dict.txt | a tokenizer.json | an HF tokenizer name or
                                    # directory; "" = word (with --task.pretrained: the model's)
    vocab_size: int = 32000         # bpe only
    cache_dir: str = ""             # vocabulary + encoded streams; "" = OUTPUT_DIR/lm_data
    tokens_per_sample: int = 512    # training block length (fairseq --tokens-per-sample)
    max_positions: int = 0          # learned-position table of GPT presets; 0 = max(tokens_per_sample, eval window)
    eval_tokens_per_sample: int = 0  # evaluation window incl. context; 0 = tokens_per_sample
    context_window: int = 0         # fairseq eval_lm --context-window: context tokens before the scored ones
    max_eval_tokens: int = 0        # score only the first N tokens of valid/test (quick checks); 0 = all
    eval_test: bool = True          # score the test split too at the final evaluation (when it exists)
    dropout: float = -1.0           # -1 = the preset's
    attention_dropout: float = -1.0
    activation_dropout: float = -1.0          # adaptive models only
    adaptive_softmax_dropout: float = -1.0    # adaptive models only
    adaptive_cutoffs: str = ""      # e.g. 20000,60000; "" = the preset's
    label_smoothing: float = 0.0
    fused_loss: str = "auto"        # GPT models: auto | true | false, the chunked fused token loss (engine/fused_loss.py);
                                    # auto = fused when the vocabulary >= fused_loss.FUSED_MIN_VOCAB (WikiText's 33k)
    softmax_chunk_mb: int = 256     # adaptive softmax: size of one chunk's pair of fp32 [c, V] log-prob tensors
    softmax_chunk_tokens: int = 0   # positions per chunk instead (0 = from softmax_chunk_mb)

    def validate(self) -> None:
        if not self.pretrained and self.model not in lm.PRESETS:
            raise ConfigError(f"--task.model {self.model!r} is not a preset: choose one of {', '.join(lm.PRESETS)} "
                              "or pass --task.pretrained NAME_OR_DIR")
        if self.tokens_per_sample < 2:
            raise ConfigError(f"--task.tokens_per_sample must be >= 2, got {self.tokens_per_sample}")
        window = self.eval_tokens_per_sample or self.tokens_per_sample
        if not 0 <= self.context_window < window:
            raise ConfigError(f"--task.context_window {self.context_window} must be >= 0 and smaller than the "
                              f"evaluation window {window} (--task.eval_tokens_per_sample)")
        for name in ("max_positions", "eval_tokens_per_sample", "max_eval_tokens", "vocab_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--task.{name} must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--task.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("dropout", "attention_dropout", "activation_dropout", "adaptive_softmax_dropout"):
            v = getattr(self, name)
            if v != -1.0 and not 0 <= v < 1:
                raise ConfigError(f"--task.{name} must be in [0, 1) (or -1 for the preset's), got {v}")
        if str(self.fused_loss).lower() not in FUSED_SETTINGS:
            raise ConfigError(f"--task.fused_loss must be auto, true or false, got {self.fused_loss!r}")
        if self.softmax_chunk_mb <= 0 or self.softmax_chunk_tokens < 0:
            raise ConfigError("--task.softmax_chunk_mb must be > 0 and --task.softmax_chunk_tokens >= 0")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(f"--task.encoding {self.encoding!r} is not a known text encoding: use e.g. utf-8 or "
                              "latin-1") from None
        if self.adaptive_cutoffs:
            self.cutoffs()
        if self.data_dir and not os.path.isdir(self.data_dir):
            raise ConfigError(f"--task.data_dir {self.data_dir} does not exist: pass a folder with "
                              "wiki.train.tokens (e.g. ../shared/data/wikitext-2) or train.txt")
        for name in ("train_file", "valid_file", "test_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"--task.{name} {path} does not exist: pass a plain-text file")
        if not (self.data_dir or self.train_file or self.dataset):
            raise ConfigError("no data: pass --task.data_dir DIR (e.g. ../shared/data/wikitext-2), "
                              "--task.train_file FILE or --task.dataset wikitext --task.dataset_config NAME")

    def cutoffs(self) -> list[int] | None:
        if not self.adaptive_cutoffs:
            return None
        try:
            return [int(x) for x in self.adaptive_cutoffs.split(",")]
        except ValueError:
            raise ConfigError(f"--task.adaptive_cutoffs {self.adaptive_cutoffs!r} is not a comma-separated list "
                              "of integers (e.g. 20000,60000)") from None

    def vocab_source(self) -> tuple[str, str]:
        """(kind, where): ("word", "") a dictionary built from the training split, ("word", dict.txt) a given one,
        ("bpe", "") a BPE trained here, ("bpe", tokenizer.json) a given one, ("hf", name) an HF tokenizer."""
        tok = self.tokenizer
        if not tok and self.pretrained:
            info = exported_info(self.pretrained)
            if info is None:
                return "hf", self.pretrained
            if info["tokenizer"] in ("word", "bpe"):
                name = "dict.txt" if info["tokenizer"] == "word" else "tokenizer.json"
                return info["tokenizer"], os.path.join(self.pretrained, name)
            return "hf", info["tokenizer"]
        if tok in ("", "word", "bpe"):
            return tok or "word", ""
        if os.path.isfile(tok):
            return ("bpe" if tok.endswith(".json") else "word"), tok
        return "hf", tok


def exported_info(model_dir: str) -> dict | None:
    """language_model.json of an export of this task, or None (an HF model name or another directory)."""
    path = os.path.join(model_dir, "language_model.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def is_adaptive_dir(model_dir: str) -> bool:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("model_type") == lm.AdaptiveLMConfig.model_type


# ---------------------------------------------------------------------------------------------- text

SPACE_NORMALIZER = re.compile(r"\s+")


def tokenize_line(line: str) -> list[str]:
    """fairseq.tokenizer.tokenize_line."""
    return SPACE_NORMALIZER.sub(" ", line).strip().split()


def word_count(lines: list[str]) -> int:
    """Words plus one end-of-line per line: the units of word-level perplexity."""
    return sum(len(tokenize_line(line)) + 1 for line in lines)


class WordVocab:
    """fairseq's Dictionary for word-level LM data (fairseq-preprocess --only-source, padding_factor 8)."""

    def __init__(self, symbols: list[str], counts: list[int]):
        self.symbols, self.counts = list(symbols), list(counts)
        self.index = {s: i for i, s in enumerate(self.symbols)}
        self.bos, self.pad, self.eos, self.unk = BOS, PAD, EOS, UNK

    def __len__(self) -> int:
        return len(self.symbols)

    @classmethod
    def build(cls, lines, padding_factor: int = 8) -> "WordVocab":
        counts: Counter = Counter()
        for line in lines:
            counts.update(tokenize_line(line))
        counts[SPECIALS[EOS]] += len(lines)
        special = [counts.pop(s, 0) for s in SPECIALS]
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))   # Counter.most_common over sorted keys
        symbols = list(SPECIALS) + [w for w, _ in ordered]
        freqs = special + [c for _, c in ordered]
        i = 0
        while len(symbols) % padding_factor:
            symbols.append(f"madeupword{i:04d}")
            freqs.append(0)
            i += 1
        return cls(symbols, freqs)

    def save(self, path: str) -> None:
        """fairseq dict.txt: 'symbol count' per line, the four specials omitted."""
        with open(path, "w", encoding="utf-8") as f:
            for s, c in zip(self.symbols[len(SPECIALS):], self.counts[len(SPECIALS):]):
                f.write(f"{s} {c}\n")

    @classmethod
    def load(cls, path: str) -> "WordVocab":
        symbols, counts = list(SPECIALS), [0] * len(SPECIALS)
        with open(path, encoding="utf-8") as f:
            for line in f:
                s, c = line.rstrip("\n").rsplit(" ", 1)
                symbols.append(s)
                counts.append(int(c))
        return cls(symbols, counts)

    def encode_lines(self, lines) -> np.ndarray:
        idx, unk, out = self.index, self.unk, []
        for line in lines:
            out.extend(idx.get(w, unk) for w in tokenize_line(line))
            out.append(self.eos)
        return np.asarray(out, dtype=np.int32)

    def string(self, ids) -> str:
        return " ".join(self.symbols[int(i)] for i in ids)

    def fingerprint(self) -> str:
        """Identifies the id -> symbol mapping (what a trained model depends on), not the counts."""
        return _sha1("\n".join(self.symbols))


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


class SubwordVocab:
    """A `tokenizers` BPE trained here, or an HF tokenizer: each line (stripped) encoded, then end-of-line."""

    def __init__(self, encode, size: int, bos: int, pad: int, eos: int, unk: int | None, decode=None,
                 symbols: dict | None = None):
        self._encode, self._decode, self.size = encode, decode, size
        self.bos, self.pad, self.eos, self.unk = bos, pad, eos, unk
        self._symbols = symbols or {}

    def fingerprint(self) -> str:
        return _sha1("\n".join(f"{i} {s}" for s, i in sorted(self._symbols.items(), key=lambda kv: kv[1])))

    def __len__(self) -> int:
        return self.size

    def encode_lines(self, lines) -> np.ndarray:
        out = []
        for line in lines:
            line = line.strip()
            if line:
                out.extend(self._encode(line))
            out.append(self.eos)
        return np.asarray(out, dtype=np.int32)


def train_bpe(lines: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2's kind: no unknown symbols) on the non-empty lines, the four specials first."""
    return _text.train_bpe([line.strip() for line in lines if line.strip()], vocab_size, list(SPECIALS),
                           kind="byte_level")


def bpe_vocab(tok) -> SubwordVocab:
    return SubwordVocab(lambda s: tok.encode(s).ids, tok.get_vocab_size(), BOS, PAD, EOS, UNK, tok.decode,
                        tok.get_vocab())


def hf_vocab(name: str) -> SubwordVocab:
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load tokenizer {name!r} ({type(e).__name__}): go online once, or pass a "
                          "local directory (--task.tokenizer / --task.pretrained)") from None
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    if eos is None:
        raise ConfigError(f"tokenizer {name!r} has no end-of-sequence token to end lines with: choose another one")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    bos = tok.bos_token_id if tok.bos_token_id is not None else eos
    return SubwordVocab(lambda s: tok.encode(s, add_special_tokens=False), len(tok), bos, pad, eos,
                        tok.unk_token_id, tok.decode, tok.get_vocab())


# ---------------------------------------------------------------------------------------------- blocks

class LMBlocks:
    """Examples cut from one token stream (fairseq TokenBlockDataset, break mode none, include_targets).

    Example i scores the targets stream[s:e], s = i * new_tokens, e = min(s + new_tokens, N); its input is the
    stream shifted right by one (</s> before the first token).  With ``context`` > 0 (evaluation, fairseq's
    LMContextWindowDataset) up to ``context`` preceding positions come first as unscored input, so every token is
    scored once with up to ``context + its offset in the block`` tokens of history.
    Items: (input ids, targets with IGNORE on context positions), int64 arrays of equal length."""

    def __init__(self, stream: np.ndarray, new_tokens: int, context: int, eos: int):
        self.stream, self.new, self.context, self.eos = stream, int(new_tokens), int(context), int(eos)
        self.n_tokens = len(stream)

    def __len__(self) -> int:
        return -(-self.n_tokens // self.new)

    def span(self, i: int) -> tuple[int, int, int]:
        """(context start, first scored, end) positions of example i."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = i * self.new
        return max(0, s - self.context), s, min(s + self.new, self.n_tokens)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        cs, s, e = self.span(i)
        tgt = np.asarray(self.stream[cs:e], dtype=np.int64)
        src = np.empty_like(tgt)
        src[1:] = tgt[:-1]
        src[0] = self.stream[cs - 1] if cs > 0 else self.eos
        tgt = tgt.copy()
        tgt[:s - cs] = IGNORE
        return src, tgt

    @property
    def sizes(self) -> np.ndarray:
        """Input length of every example (the last block may be shorter)."""
        starts = np.arange(len(self)) * self.new
        ends = np.minimum(starts + self.new, self.n_tokens)
        return ends - np.maximum(starts - self.context, 0)


# ---------------------------------------------------------------------------------------------- the task

class AdaptiveTokenLoss:
    """The fused-loss head of engine/task.py (``TaskOutput.head``) for an adaptive softmax, so that the engine's
    default loss / rdrop_terms / evaluation serve both model families: called like engine.fused_loss.FusedTokenLoss
    on hidden states [copies x N, T, d] it returns (NLL summed over the scored tokens of all copies, symmetric KL
    or None).  The NLL alone is fairseq's adaptive loss (only the target's tail is evaluated); label smoothing and
    the KL need the FULL distribution, produced in chunks of ``chunk_tokens(rows)`` positions per copy and
    recomputed in backward (models/adaptive_lm.py, AdaptiveSoftmax.forward)."""

    def __init__(self, softmax, chunk_tokens):
        self.softmax, self.chunk_tokens = softmax, chunk_tokens

    def __call__(self, hidden: Tensor, target: Tensor, pad_mask: Tensor | None = None, label_smoothing: float = 0.0,
                 consistency: str | None = "kl", copies: int = 2) -> tuple[Tensor, Tensor | None]:
        if consistency not in (None, "kl"):
            raise ValueError(f"the adaptive softmax has no {consistency!r} consistency term (no pre-softmax logits)")
        h = hidden.reshape(copies, -1, hidden.shape[-1])              # [copies, N*T, d], copy a's rows first
        t = target.reshape(-1)
        if pad_mask is not None:                                     # scored positions only
            keep = ~pad_mask.reshape(-1)
            h, t = h[:, keep], t[keep]
        ls = label_smoothing
        if consistency is None and ls == 0:                          # fairseq's adaptive loss
            return self.softmax(h.reshape(-1, h.shape[-1]), target=t.repeat(copies)).sum(), None

        def sums(lp, tt):        # one chunk of every copy's full distribution: NLL of each copy (+ symmetric KL)
            nll = sum(losses.nll_loss(lp[k], tt, None, ls) for k in range(copies))
            return torch.stack([nll, losses.symmetric_kl(lp[0], lp[1])]) if consistency else nll.reshape(1)
        out = self.softmax(h, reduce=sums, extras=(t,), chunk_tokens=self.chunk_tokens(copies))
        return out[0], (out[1] if consistency else None)

    @torch.no_grad()
    def token_nll(self, hidden: Tensor, target: Tensor, pad_mask: Tensor | None = None,
                  label_smoothing: float = 0.0) -> Tensor:
        """Per-position NLL (evaluation), 0 where not scored; only the target's tail is evaluated."""
        if label_smoothing:
            raise ValueError("the adaptive softmax's evaluation NLL is unsmoothed")
        return self.softmax(hidden, target=target if pad_mask is None else target.masked_fill(pad_mask, IGNORE))

    @torch.no_grad()
    def logits(self, hidden: Tensor) -> Tensor:
        """Full log-probabilities (softmax and argmax read them as logits)."""
        return self.softmax(hidden)


def unwrap(model):
    """The nn.Module inside a DeepSpeed engine (or the module itself)."""
    return getattr(model, "module", model)


class LanguageModeling(Task):
    Config = Config
    metric = "ppl"
    metric_mode = "min"
    default_eval_split = "valid"

    @classmethod
    def default_overrides(cls):
        # fairseq's language-model settings (examples/language_model): Adam(0.9, 0.98) with decoupled weight
        # decay 0.01, inverse_sqrt after warmup from 1e-7, no clipping, alpha 1.0 (appendix A.3).
        return {"optim.name": "adamw", "optim.beta1": 0.9, "optim.beta2": 0.98, "optim.eps": 1e-8,
                "optim.weight_decay": 0.01, "optim.lr": 5e-4, "optim.schedule": "inverse_sqrt",
                "optim.warmup_steps": 4000, "optim.warmup_init_lr": 1e-7, "optim.clip_grad": 0.0,
                "rdrop.alpha": 1.0, "train.max_tokens": 2048, "eval.batch_size": 4}

    @classmethod
    def recipes(cls):
        wiki103 = {"task.dataset": "wikitext", "task.dataset_config": "wikitext-103-v1",
                   "task.eval_tokens_per_sample": 512, "task.context_window": 400,   # the authors' eval script
                   "rdrop.mode": "rdrop", "rdrop.alpha": 1.0, "eval.batch_size": 2}
        # fairseq's transformer_lm recipe (examples/language_model, which the authors' train_lm_wiki103_rdrop.sh
        # follows): transformer_lm_gpt, shared embeddings, dropout 0.1, Adam(0.9, 0.98) wd 0.01, lr 5e-4
        # inverse_sqrt, 4,000 warmup from 1e-7, no clipping, blocks of 512, --max-tokens 2048 (4 blocks) x
        # update-freq 16 per GPU, 50k updates (the appendix).  (The authors' script says --max-tokens 2000, i.e. 3
        # blocks, since fairseq packs whole blocks.)  The batch is per rank: with W ranks set --train.grad_accum
        # 128/W to keep fairseq's 8 GPUs x 16 (W=8: 16).
        gpt = {**wiki103, "task.model": "transformer_lm_gpt", "task.tokens_per_sample": 512, "task.dropout": 0.1,
               "task.attention_dropout": 0.1, "optim.name": "adamw", "optim.beta1": 0.9, "optim.beta2": 0.98,
               "optim.eps": 1e-8, "optim.weight_decay": 0.01, "optim.clip_grad": 0.0, "optim.lr": 5e-4,
               "optim.schedule": "inverse_sqrt", "optim.warmup_steps": 4000, "optim.warmup_init_lr": 1e-7,
               "train.max_steps": 50000, "train.max_tokens": 2048, "train.grad_accum": 16,
               "eval.every_steps": 1000, "checkpoint.every_steps": 1000, "checkpoint.keep_last": 2}
        # The authors' train_lm_adaptive_wiki103_rdrop.sh / fairseq's README.adaptive_inputs: transformer_lm_wiki103,
        # blocks of 3,072 tokens, --max-tokens 3072 (1 block) x update-freq 3 x 8 GPUs = 24 blocks per update,
        # 286k updates (the appendix; their script says 320k), lr 1.0 with 16k warmup from 1e-7 then one cosine
        # period of 270k updates down to 1e-4 (t-mult 2 never starts a second period), clip 0.1, fairseq's NAG
        # optimizer: SGD with Nesterov momentum 0.99 (fairseq's NAG scales the momentum buffer by the lr ratio when
        # the lr changes, torch's SGD does not; the update is otherwise the same).  With W ranks set
        # --train.grad_accum 24/W.
        adaptive = {**wiki103, "task.model": "transformer_lm_wiki103", "task.tokens_per_sample": 3072,
                    "optim.name": "sgd", "optim.impl": "torch", "optim.momentum": 0.99, "optim.nesterov": True,
                    "optim.weight_decay": 0.0,
                    "optim.lr": 1.0, "optim.schedule": "cosine", "optim.warmup_steps": 16000,
                    "optim.warmup_init_lr": 1e-7, "optim.end_lr": 1e-4, "optim.clip_grad": 0.1,
                    "train.max_steps": 286000, "train.max_tokens": 3072, "train.grad_accum": 3,
                    "eval.every_steps": 5000, "checkpoint.every_steps": 5000, "checkpoint.keep_last": 2}
        # A small GPT on WikiText-2 for a 2-core CPU machine (the baseline vs R-Drop comparison, results/
        # lm_wikitext2): blocks of 128, 256 tokens (2 blocks) per rank, 512 per step on 2 ranks, about one epoch in
        # 4,000 steps.  On CPU the time goes into the 33,280-way softmax and KL, i.e. it grows with the tokens per
        # step; the fused loss (auto at this vocabulary) keeps the [tokens, V] logits out of memory.
        small = {"task.model": "small", "task.data_dir": "../shared/data/wikitext-2", "task.tokens_per_sample": 128,
                 "task.context_window": 0, "optim.lr": 1e-3, "optim.schedule": "inverse_sqrt",
                 "optim.warmup_steps": 200, "optim.warmup_init_lr": 1e-7, "optim.weight_decay": 0.01,
                 "train.max_tokens": 256, "train.grad_accum": 1, "train.max_steps": 4000,
                 "rdrop.alpha": 1.0, "eval.batch_size": 16, "eval.every_steps": 500,
                 "checkpoint.every_steps": 500, "checkpoint.keep_last": 1}
        return {"wikitext103_transformer_lm_gpt": gpt, "wikitext103_adaptive": adaptive, "wikitext2_small": small}

    def __init__(self, run_cfg, world=None):
        super().__init__(run_cfg, world)
        c = self.cfg
        self.adaptive = is_adaptive_dir(c.pretrained) if c.pretrained else lm.is_adaptive(c.model)
        self.vocab = None
        self.folder = None
        self.meta: dict = {}
        self._splits: dict = {}
        mode = getattr(getattr(run_cfg, "rdrop", None), "mode", "rdrop")
        if self.adaptive and mode == "fd":
            raise ConfigError("--rdrop.mode fd needs pre-softmax logits, which an adaptive softmax does not have: "
                              "use a GPT preset or --rdrop.mode rdrop|duplicate|none")
        if self.adaptive and str(c.fused_loss).lower() in ("true", "on"):
            raise ConfigError("--task.fused_loss true is for GPT models: the adaptive softmax computes its own "
                              "chunked loss (--task.softmax_chunk_mb); use --task.fused_loss auto or false")

    def _log(self, msg: str) -> None:
        if self.is_main:
            print(f"[language_modeling] {msg}", flush=True)

    # -- sources -----------------------------------------------------------------------------------------
    def source(self, split: str):
        """('file', path) | ('hub', dataset, config, split) | None when the split does not exist."""
        c = self.cfg
        explicit = getattr(c, f"{split}_file")
        if explicit:
            return ("file", explicit)
        if c.data_dir:
            for name in FILE_CANDIDATES[split]:
                path = os.path.join(c.data_dir, name)
                if os.path.isfile(path):
                    return ("file", path)
            return None
        if c.train_file:                   # only files were given: no hub fallback for the other splits
            return None
        if c.dataset:
            return ("hub", c.dataset, c.dataset_config, {"valid": "validation"}.get(split, split))
        return None

    def missing_split_error(self, split: str) -> ConfigError:
        c = self.cfg
        if c.data_dir and not getattr(c, f"{split}_file"):
            names = ", ".join(FILE_CANDIDATES[split])
            return ConfigError(f"no {split} split in {c.data_dir}: expected one of {names} "
                               f"(or pass --task.{split}_file FILE)")
        return ConfigError(f"no {split} split: pass --task.{split}_file FILE or --task.data_dir DIR")

    def read(self, split: str) -> list[str]:
        src = self.source(split)
        if src is None:
            raise self.missing_split_error(split)
        if src[0] == "file":
            lines = _text.read_lines(src[1], self.cfg.encoding)
            if not any(t.strip() for t in lines):
                raise ConfigError(f"{src[1]} is empty (no text): point the task at a file with text")
            return lines
        _, name, config, hub_split = src
        ds = _text.load_hub(name, config, hub_split)
        if "text" not in ds.column_names:
            raise ConfigError(f"hub dataset {name!r} has columns {ds.column_names}: a 'text' column is needed")
        lines = [t[:-1] if t.endswith("\n") else t for t in ds["text"]]
        if not any(t.strip() for t in lines):
            raise ConfigError(f"hub dataset {name!r} split {hub_split!r} is empty (no text)")
        return lines

    def cache_key(self) -> str:
        """A hash of the sources (path, size, mtime) and of every setting that changes the token streams."""
        c = self.cfg
        kind, where = c.vocab_source()
        if where:
            st = os.stat(where)
            where = [os.path.realpath(where), st.st_size, st.st_mtime_ns]
        parts = {"v": CACHE_VERSION, "tokenizer": [kind, where], "encoding": c.encoding,
                 "vocab_size": c.vocab_size if (kind, where) == ("bpe", "") else None}
        for split in SPLITS:
            src = self.source(split)
            if src and src[0] == "file":
                st = os.stat(src[1])
                src = ("file", os.path.realpath(src[1]), st.st_size, st.st_mtime_ns)
            parts[split] = src
        return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def cache_root(self) -> str:
        return self.cfg.cache_dir or os.path.join(self.run_cfg.output_dir, "lm_data")

    # -- prepare: vocabulary and encoded streams (rank 0 first; the others load) ----------------------------
    def prepare(self) -> None:
        if self.folder is not None:
            return
        c = self.cfg
        kind, where = c.vocab_source()
        folder = os.path.join(self.cache_root(), f"{kind}-{self.cache_key()}")
        eval_split = self.run_cfg.eval.split if getattr(self.run_cfg, "eval", None) else ""
        needed = {"train", eval_split or self.default_eval_split}
        for split in sorted(needed):
            if split in SPLITS and self.source(split) is None:
                raise self.missing_split_error(split)
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta_path):
            if not self.is_main:
                raise ConfigError(f"the LM data cache {folder} is not visible on this rank: put --task.cache_dir "
                                  "on a filesystem every node shares")
            self._build_cache(folder, kind, where, needed)
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.vocab = self._load_vocab(folder, kind, where)
        self.folder = folder

    def _build_cache(self, folder: str, kind: str, where: str, needed: set) -> None:
        tmp = folder + f".tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        train = self.read("train")
        if kind == "word":
            vocab = WordVocab.load(where) if where else WordVocab.build(train)
            vocab.save(os.path.join(tmp, "dict.txt"))
            what = (f"word dictionary {where}" if where else "word dictionary of the training split (fairseq "
                    "order, padded to a multiple of 8)") + f": {len(vocab):,} symbols"
        elif kind == "bpe":
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(where) if where else train_bpe(train, self.cfg.vocab_size)
            tok.save(os.path.join(tmp, "tokenizer.json"))
            vocab = bpe_vocab(tok)
            what = f"byte-level BPE {where or 'trained on the training split'}: {len(vocab):,} symbols"
        else:
            vocab = hf_vocab(where)
            what = f"tokenizer {where}: {len(vocab):,} symbols"
        meta = {"tokenizer": kind if kind != "hf" else where, "vocab_size": len(vocab),
                "fingerprint": vocab.fingerprint(), "bos": vocab.bos,
                "pad": vocab.pad, "eos": vocab.eos,
                "unk": vocab.unk, "splits": {}}
        for split in SPLITS:
            if self.source(split) is None:
                continue
            try:
                lines = train if split == "train" else self.read(split)
            except ConfigError as e:        # a hub dataset without this optional split
                if split in needed or self.source(split)[0] != "hub":
                    raise
                self._log(f"no {split} split ({e})")
                continue
            stream = vocab.encode_lines(lines)
            np.save(os.path.join(tmp, f"{split}.npy"), stream)
            unk = int((stream == vocab.unk).sum()) if vocab.unk is not None else 0
            meta["splits"][split] = {"tokens": int(len(stream)), "lines": len(lines), "words": word_count(lines),
                                     "unk": unk, "source": list(self.source(split))}
            self._log(f"{split}: {len(lines):,} lines, {len(stream):,} tokens ({unk:,} <unk>)")
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.isdir(folder):               # another run built it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        self._log(f"{what}, cached in {folder}")

    def _load_vocab(self, folder: str, kind: str, where: str):
        if kind == "word":
            return WordVocab.load(os.path.join(folder, "dict.txt"))
        if kind == "bpe":
            from tokenizers import Tokenizer
            return bpe_vocab(Tokenizer.from_file(os.path.join(folder, "tokenizer.json")))
        return hf_vocab(where)

    # -- datasets -------------------------------------------------------------------------------------------
    def stream(self, split: str) -> np.ndarray:
        self.prepare()
        path = os.path.join(self.folder, f"{split}.npy")
        if split not in self.meta["splits"] or not os.path.isfile(path):
            raise self.missing_split_error(split)
        return np.load(path, mmap_mode="r")

    def eval_window(self) -> int:
        return self.cfg.eval_tokens_per_sample or self.cfg.tokens_per_sample

    def build_dataset(self, split: str) -> LMBlocks:
        if split in self._splits:
            return self._splits[split]
        c = self.cfg
        stream = self.stream(split)
        eos = self.meta["eos"]
        if split == "train":
            ds = LMBlocks(stream, c.tokens_per_sample, 0, eos)
        else:
            if c.max_eval_tokens:
                stream = stream[:c.max_eval_tokens]
            ds = LMBlocks(stream, self.eval_window() - c.context_window, c.context_window, eos)
        self._splits[split] = ds
        return ds

    def example_sizes(self, dataset):
        return dataset.sizes

    def collate(self, samples, generator=None):
        T = max(len(s[0]) for s in samples)
        ids = torch.full((len(samples), T), self.meta["pad"], dtype=torch.long)
        labels = torch.full((len(samples), T), IGNORE, dtype=torch.long)
        for i, (src, tgt) in enumerate(samples):
            ids[i, :len(src)] = torch.from_numpy(src)
            labels[i, :len(tgt)] = torch.from_numpy(tgt)
        return {"input_ids": ids, "labels": labels}

    def num_units(self, batch):
        return int(batch["labels"].ne(IGNORE).sum())

    # -- model ----------------------------------------------------------------------------------------------
    def max_positions(self) -> int:
        return self.cfg.max_positions or max(self.cfg.tokens_per_sample, self.eval_window())

    def model_config(self):
        c = self.cfg
        self.prepare()
        opt = lambda v: None if v == -1.0 else v  # noqa: E731
        ids = dict(bos_token_id=self.meta["bos"], eos_token_id=self.meta["eos"], pad_token_id=self.meta["pad"])
        if c.pretrained:
            return self._pretrained_config(opt)
        if self.adaptive:
            try:
                return lm.adaptive_config(c.model, self.meta["vocab_size"], self.max_positions(),
                                          cutoffs=c.cutoffs(), dropout=opt(c.dropout),
                                          attention_dropout=opt(c.attention_dropout),
                                          activation_dropout=opt(c.activation_dropout),
                                          adaptive_softmax_dropout=opt(c.adaptive_softmax_dropout), **ids)
            except ValueError as e:
                raise ConfigError(f"{e}: set --task.adaptive_cutoffs below the vocabulary size "
                                  f"({self.meta['vocab_size']:,})") from None
        return lm.gpt_config(c.model, self.meta["vocab_size"], self.max_positions(), dropout=opt(c.dropout),
                             attention_dropout=opt(c.attention_dropout), **ids)

    def _pretrained_config(self, opt):
        """The config of --task.pretrained with this run's dropout flags applied (-1 keeps the saved values)."""
        c = self.cfg
        cls = lm.AdaptiveLMConfig if self.adaptive else lm.GPT2Config
        try:
            config = cls.from_pretrained(c.pretrained)
        except (OSError, ValueError) as e:
            raise ConfigError(f"could not load the model config of {c.pretrained!r} ({type(e).__name__}): go "
                              "online once, or pass a local directory") from None
        if self.adaptive:
            names = {"dropout": "dropout", "attention_dropout": "attention_dropout",
                     "activation_dropout": "activation_dropout",
                     "adaptive_softmax_dropout": "adaptive_softmax_dropout"}
        else:
            names = {"resid_pdrop": "dropout", "embd_pdrop": "dropout", "attn_pdrop": "attention_dropout"}
            config.use_cache = False
            if self.max_positions() > config.n_positions:
                raise ConfigError(f"{c.pretrained} has {config.n_positions} positions: lower "
                                  "--task.tokens_per_sample / eval_tokens_per_sample to at most that")
        for key, flag in names.items():
            if opt(getattr(c, flag)) is not None:
                setattr(config, key, getattr(c, flag))
        if self.meta["vocab_size"] > config.vocab_size:
            raise ConfigError(f"the vocabulary has {self.meta['vocab_size']} symbols but {c.pretrained} only "
                              f"{config.vocab_size}: use the model's own tokenizer (leave --task.tokenizer empty)")
        return config

    def _check_resume_vocab(self) -> None:
        """A resumed run must use the vocabulary its checkpoint was trained with (DIR/lm_vocab.json records it)."""
        path = os.path.join(self.run_cfg.output_dir, "lm_vocab.json")
        mine = {"vocab_size": self.meta["vocab_size"], "fingerprint": self.meta["fingerprint"]}
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            if saved != mine:
                raise ConfigError(f"vocabulary mismatch: the run in {self.run_cfg.output_dir} was trained with "
                                  f"{saved['vocab_size']} symbols (fingerprint {saved['fingerprint']}) but these "
                                  f"data/settings give {mine['vocab_size']} ({mine['fingerprint']}): resume with the "
                                  "same training data and --task.tokenizer, or use a new --output_dir")
        elif self.is_main:
            os.makedirs(self.run_cfg.output_dir, exist_ok=True)
            with open(path, "w") as f:
                json.dump(mine, f, indent=2)

    def build_model(self, ds_config: dict):
        c = self.cfg
        self.prepare()
        self._check_resume_vocab()
        config = self.model_config()
        if self.adaptive:
            model = lm.build_adaptive(config, ds_config, c.pretrained)
            n = lm.fairseq_num_params_adaptive(config)
        else:
            model = lm.build_gpt(config, ds_config, c.pretrained)
            n = lm.fairseq_num_params_gpt(c.model, config.vocab_size, self.max_positions()) \
                if not c.pretrained else None
            self._setup_fused_loss(model, config.vocab_size)
        count = f"{n:,} parameters (fairseq's count; " if n is not None else "("
        self._log(f"model {c.pretrained or c.model}: vocab {config.vocab_size:,}, {count}"
                  f"{lm.trainable_params(model):,} in this process, a shard under ZeRO-3)")
        return model

    def _setup_fused_loss(self, model, vocab_size: int) -> None:
        """GPT: attach the fused token loss over the tied lm_head when --task.fused_loss asks for it (before
        deepspeed.initialize).  The adaptive softmax has its own chunked loss (AdaptiveTokenLoss)."""
        if self.adaptive or not fused_loss.want_fused(str(self.cfg.fused_loss), vocab_size):
            return
        fused_loss.attach(model)
        self._log(f"fused loss: on (vocabulary {vocab_size:,}, chunks of {fused_loss.default_chunk_size(vocab_size)} "
                  "tokens per copy; --task.fused_loss false turns it off)")

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, model, batch):
        """Logits (GPT, unfused), or the final hidden states + a head that scores them in chunks: the fused token
        loss (GPT) or the adaptive softmax.  Either way the hidden states come from calling ``model`` (the DeepSpeed
        engine) itself, never a submodule of it (engine/fused_loss.py says why)."""
        ids, labels = batch["input_ids"], batch["labels"]
        pad = labels.eq(IGNORE)
        if self.adaptive:
            hidden = model(input_ids=ids, features_only=True).last_hidden_state
            head = AdaptiveTokenLoss(unwrap(model).adaptive_softmax, self.chunk_tokens)
            return TaskOutput(None, labels, pad, hidden=hidden, head=head)
        head = fused_loss.find(model)
        if head is not None:          # the lm_head computes nothing (an empty index), the fused loss projects
            out = model(input_ids=ids, use_cache=False, output_hidden_states=True,
                        logits_to_keep=torch.zeros(0, dtype=torch.long, device=ids.device))
            return TaskOutput(None, labels, pad, hidden=out.hidden_states[-1], head=head)
        return TaskOutput(model(input_ids=ids, use_cache=False).logits, labels, pad)

    def chunk_tokens(self, rows: int = 1) -> int:
        """Positions per chunk so that ``rows`` fp32 [c, V] log-prob tensors fit in --task.softmax_chunk_mb."""
        if self.cfg.softmax_chunk_tokens:
            return self.cfg.softmax_chunk_tokens
        return max(1, self.cfg.softmax_chunk_mb * 2 ** 20 // (4 * rows * self.meta["vocab_size"]))

    # -- evaluation -----------------------------------------------------------------------------------------
    def token_nll(self, out: TaskOutput) -> Tensor:
        """NLL (natural log) of every position [N, T]; 0 where not scored; chunked when the output is."""
        if out.fused:
            return out.head.token_nll(out.hidden, out.target, out.pad_mask)
        nll = F.cross_entropy(out.logits.float().transpose(1, 2), out.target, ignore_index=IGNORE,
                              reduction="none")
        return nll.masked_fill(out.pad_mask, 0.0)

    @torch.no_grad()
    def score(self, ctx, split: str) -> dict[str, float]:
        """Total NLL and scored tokens of ``split`` over all ranks (per-example sums, so shard padding drops)."""
        local: dict[str, list] = {"nll": [], "tokens": []}
        for batch in ctx.batches(split):
            out = self.forward(ctx.model, batch)
            nll = self.token_nll(out).double().sum(-1)
            local["nll"].append(nll.cpu())
            local["tokens"].append((~out.pad_mask).sum(-1).double().cpu())
        r = ctx.gather(local, len(ctx.dataset(split)))
        nll, tokens = float(r["nll"].sum()), float(r["tokens"].sum())
        loss = nll / max(tokens, 1.0)
        metrics = {"loss": loss, "ppl": math.exp(min(loss, 100.0)), "tokens": tokens}
        info = self.meta["splits"].get(split, {})
        if self.meta["tokenizer"] != "word" and not self.cfg.max_eval_tokens and info.get("words"):
            metrics["word_ppl"] = math.exp(min(nll / info["words"], 100.0))
        return metrics

    def evaluate(self, ctx, split):
        metrics = self.score(ctx, split)
        if ctx.final and self.cfg.eval_test and split != "test":
            if "test" in self.meta["splits"]:
                metrics.update({f"test_{k}": v for k, v in self.score(ctx, "test").items()})
            else:
                self._log("no test split: skipping the final test evaluation")
        return metrics

    def check_data(self, splits, dataset=None):
        """The training and evaluation splits, and the test split that the final evaluation scores."""
        self.prepare()
        if self.cfg.eval_test and "test" in self.meta["splits"]:
            splits = [*splits, "test"]
        super().check_data(splits, dataset)

    # -- export ---------------------------------------------------------------------------------------------
    def special_tokens(self) -> dict[str, str]:
        return {"bos_token": SPECIALS[BOS], "eos_token": SPECIALS[EOS], "pad_token": SPECIALS[PAD],
                "unk_token": SPECIALS[UNK]}

    def save_tokenizer(self, out_dir: str) -> None:
        """The run's tokenizer as a complete HF tokenizer in ``out_dir``: the word vocabulary as a WordLevel
        PreTrainedTokenizerFast (word_tokenizer), the BPE trained here as one, or the pretrained tokenizer used."""
        from engine.export import clean_tokenizer_files, save_fast_tokenizer
        kind = self.meta["tokenizer"]
        if kind == "word":
            tok = word_tokenizer(self.vocab)
        elif kind == "bpe":
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(os.path.join(self.folder, "tokenizer.json"))
        else:                                   # an HF tokenizer (gpt2, or a --task.pretrained directory)
            from transformers import AutoTokenizer
            AutoTokenizer.from_pretrained(kind).save_pretrained(out_dir)
            clean_tokenizer_files(out_dir)
            return
        # no clean-up of tokenization spaces on decode: it would glue WikiText's " 's" / " ," to the word before,
        # and the text-generation pipeline cuts the prompt off the decoded text by its length
        save_fast_tokenizer(tok, out_dir, self.special_tokens(), model_max_length=self.max_positions(),
                            clean_up_tokenization_spaces=False)

    def generation_config(self):
        """Greedy continuation that stops at the end of a line (</s>, fairseq's line-end symbol) or at the longest
        context the run trained on."""
        from transformers import GenerationConfig
        m = self.meta
        return GenerationConfig(do_sample=False, max_length=self.max_positions(), bos_token_id=m["bos"],
                                eos_token_id=m["eos"], pad_token_id=m["pad"])

    def export(self, model, state_dict, out_dir):
        """A complete HF folder: weights + config (the adaptive model with its code, adaptive_lm.py, and config.json's
        auto_map for trust_remote_code), the tokenizer (tokenizer.json + tokenizer_config.json), generation_config.json,
        and for --task.pretrained / this task's tools the fairseq dict.txt and language_model.json."""
        super().export(model, state_dict, out_dir)
        self.save_tokenizer(out_dir)
        self.generation_config().save_pretrained(out_dir)
        if self.meta["tokenizer"] == "word":
            shutil.copy(os.path.join(self.folder, "dict.txt"), os.path.join(out_dir, "dict.txt"))
        info = {k: self.meta[k] for k in ("tokenizer", "vocab_size", "bos", "pad", "eos", "unk")}
        info.update(model=self.cfg.pretrained or self.cfg.model, adaptive=self.adaptive,
                    tokens_per_sample=self.cfg.tokens_per_sample, eval_tokens_per_sample=self.eval_window(),
                    context_window=self.cfg.context_window)
        with open(os.path.join(out_dir, "language_model.json"), "w") as f:
            json.dump(info, f, indent=2)

    def export_info(self) -> dict:
        c = self.cfg
        remote = ", trust_remote_code=True" if self.adaptive else ""
        window, context = self.eval_window(), c.context_window
        source = f"files in {c.data_dir}" if c.data_dir else (c.train_file or f"hub dataset {c.dataset} "
                                                              f"{c.dataset_config}".strip())
        usage = f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

generate = pipeline("text-generation", model="{{path}}"{remote})
print(generate("The tower is", max_new_tokens=30)[0]["generated_text"])     # greedy, stops at the line end
```

Perplexity as the engine measured it: every line of the text, then the end-of-line symbol
`{SPECIALS[EOS] if self.meta["tokenizer"] in ("word", "bpe") else "eos_token"}`, as one token stream, scored in
windows of {window} tokens whose first {context} are context only (fairseq eval_lm --context-window {context}):

```python
import math, torch
import torch.nn.functional as F

tok = AutoTokenizer.from_pretrained("{{path}}")
model = AutoModelForCausalLM.from_pretrained("{{path}}"{remote}).eval()
lines = open("wiki.test.tokens", encoding="utf-8").read().split("\\n")[:-1]
stream = [i for line in lines for i in tok(line.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
new, context, nll = {window - context}, {context}, 0.0
with torch.no_grad():
    for s in range(0, len(stream), new):
        start, end = max(0, s - context), min(s + new, len(stream))
        inputs = ([tok.eos_token_id] + stream[:end - 1]) if start == 0 else stream[start - 1:end - 1]
        logits = model(input_ids=torch.tensor([inputs])).logits[0].float()
        nll += F.cross_entropy(logits[s - start:], torch.tensor(stream[s:end]), reduction="sum").item()
print("perplexity", math.exp(nll / len(stream)))
```"""
        if self.adaptive:
            usage += ("\n\nThe adaptive-input model's code (adaptive_lm.py) is in this folder: `trust_remote_code=True` "
                      "runs it; its logits are log-probabilities over the whole vocabulary.")
        return {"pipeline_tag": "text-generation", "pipeline_kwargs": {"trust_remote_code": True} if self.adaptive
                else {}, "inputs": {"kind": "text"}, "data": f"{source}, {self.meta['vocab_size']:,}-symbol "
                f"{self.meta['tokenizer']} vocabulary", "usage": usage}


def word_tokenizer(vocab: "WordVocab"):
    """The word vocabulary as a ``tokenizers.Tokenizer``: a WordLevel model over the dictionary (unknown words ->
    <unk>) after a whitespace split, as fairseq's tokenize_line; a line break in the text becomes </s>, fairseq's
    end-of-line symbol, so encoding a whole file gives the engine's token stream."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    tok = Tokenizer(models.WordLevel(vocab=dict(vocab.index), unk_token=SPECIALS[UNK]))
    tok.normalizer = normalizers.Replace(Regex(r"\r\n|\r|\n"), f" {SPECIALS[EOS]} ")
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()     # no decoder: decoding joins the words with spaces
    return tok


TASK = LanguageModeling
