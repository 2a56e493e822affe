"""Abstractive summarization (appendix A.2): BART (or a MiniLM encoder-decoder warm start), token-level R-Drop,
beam search with fairseq's BART decoding settings, ROUGE.  A thin task on the seq2seq core (tasks/_seq2seq.py).

Data, by ``--task.data_dir`` / ``--task.dataset``:
  --task.data_dir DIR   one file per split, jsonl / csv / tsv (optionally .gz), named SPLIT.EXT or *-SPLIT.EXT /
                        *_SPLIT.EXT (../shared/data/samsum: samsum-train.csv.gz ...; ../shared/data/xsum:
                        train.jsonl ...); columns from --task.source_column / --task.target_column (default
                        document / summary; SAMSum: --task.source_column dialogue)
  --task.dataset NAME   a Hugging Face dataset: cnn_dailymail (config 3.0.0, columns article / highlights), xsum
                        (document / summary), samsum (dialogue / summary), or another with the column flags
Documents or summaries that are empty are dropped (count printed); sources longer than the model's positions are
truncated (count printed), training targets too (--task.long_train_examples truncate).

Models (``--task.model``): bart_large | bart_base (fairseq's architectures) | bart_small | bart_mini | bart_tiny,
trained from scratch with a byte-level BPE learned on the training split (--task.vocab_size, cached like
translation's); ``--task.pretrained facebook/bart-large`` (or a local copy) loads the weights and their tokenizer;
minilm2minilm warm-starts an encoder-decoder from the offline pretrained MiniLM with its WordPiece vocabulary.

Loss: label-smoothed NLL (0.1) over non-pad target tokens, the engine's per-token symmetric KL with pads masked,
alpha 0.7 (the paper's CNN/DM value), the same reduction as translation.  BART with a vocabulary of >= 8192
symbols (pretrained BART's 50265) uses the fused chunked loss by default, lm_head + final_logits_bias applied chunk
by chunk (``--task.fused_loss auto|true|false``); minilm2minilm stays unfused (see ``fused_head``).

Metrics: ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F1 x 100 from ``rouge-score`` with the Porter stemmer.  ROUGE-Lsum
is computed over sentences: each text is split at its newlines and after ., ! or ? followed by whitespace
(:func:`split_sentences`), and the sentences are joined with newlines, which is how rouge-score's Lsum expects
them.  The best checkpoint follows rougeL.  The final evaluation writes DIR/predictions/SPLIT.hyp.

Recipes: cnndm_bart_large and xsum_bart_large (fairseq's BART fine-tuning and decoding settings), samsum_small
(this machine: see the README's summarization section for what it reaches).

Commands (no DeepSpeed needed):
  python -m tasks.summarization summarize --model DIR/hf_model --input FILE [--column dialogue] [--output FILE]
                                          [--reference FILE | --reference_column summary]
  python -m tasks.summarization average --checkpoints DIR/checkpoints (--last N | --best N) --output DIR/avg
"""
from __future__ import annotations

import glob
import os
import re
import sys
from dataclasses import dataclass

from engine.config import ConfigError
from tasks import _seq2seq, _text
from tasks._seq2seq import Layout, Seq2SeqConfig, Seq2SeqTask

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]   # BART's ids 0, 1, 2, 3; <mask> for text infilling
BART_LAYOUT = Layout(pad=1, eos=2, bos=0, decoder_start=2, src_bos=True, tgt_bos=True)
HUB = {"cnn_dailymail": ("3.0.0", "article", "highlights"), "xsum": (None, "document", "summary"),
       "samsum": (None, "dialogue", "summary")}
TABLE_EXTS = [".jsonl", ".jsonl.gz", ".json", ".csv", ".csv.gz", ".tsv", ".tsv.gz"]
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@dataclass
class Config(Seq2SeqConfig):
    model: str = "bart_small"           # bart_tiny | bart_mini | bart_small | bart_base | bart_large | minilm2minilm
    pretrained: str = ""                # HF name or local folder of pretrained BART weights + tokenizer
    source_column: str = ""             # "" = document (or the hub dataset's own column)
    target_column: str = ""             # "" = summary (or the hub dataset's own column)
    valid_split: str = "validation"
    vocab_size: int = 8000              # byte-level BPE trained on the training split (no pretrained tokenizer)
    long_train_examples: str = "truncate"
    beam: int = 4
    lenpen: float = 1.0
    max_len_a: float = 0.0              # summaries: a fixed maximum length (max_len_b) rather than one per source
    max_len_b: int = 100
    min_len: int = 1
    no_repeat_ngram_size: int = 3
    copy: bool = False                  # BART presets: a pointer-generator copy mechanism (models/bart_copy.py)
    cross_attention_init: str = "self"  # minilm2minilm: self (copy each layer's self-attention) | random
    objective: str = "summarize"        # summarize | denoise: BART's text infilling on the documents (pretraining)
    mask_ratio: float = 0.3             # denoise: the fraction of each document's tokens masked, in spans
    poisson_lambda: float = 3.0         # denoise: span lengths ~ Poisson(lambda); each span becomes one <mask>

    def validate(self) -> None:
        from models.bart import ENCODER_DECODER, PRESETS
        if self.model not in PRESETS and self.model not in ENCODER_DECODER:
            raise ConfigError(f"--task.model {self.model!r} is not a preset: choose one of "
                              f"{', '.join([*PRESETS, *ENCODER_DECODER])}")
        if self.pretrained and self.model not in PRESETS:
            raise ConfigError(f"--task.pretrained loads a BART checkpoint: pass a BART preset (bart_base, "
                              f"bart_large, ...) with it, not {self.model}")
        if self.copy and (self.model in ENCODER_DECODER or self.pretrained):
            raise ConfigError("--task.copy true adds a copy mechanism to a BART preset trained here: drop "
                              "--task.pretrained and use a bart_* model")
        if self.cross_attention_init not in ("self", "random"):
            raise ConfigError(f"--task.cross_attention_init must be self or random, got {self.cross_attention_init!r}")
        if self.objective not in ("summarize", "denoise"):
            raise ConfigError(f"--task.objective must be summarize or denoise, got {self.objective!r}")
        if self.objective == "denoise":
            if self.model in ENCODER_DECODER:
                raise ConfigError("--task.objective denoise pretrains a BART model: pass a BART preset, not "
                                  f"{self.model}")
            if not 0 < self.mask_ratio < 1 or not 0 < self.poisson_lambda < 100:
                raise ConfigError(f"--task.mask_ratio must be in (0, 1) and --task.poisson_lambda in (0, 100), got "
                                  f"{self.mask_ratio} / {self.poisson_lambda}")
            self.eval_generate = False  # a denoising run is scored by its loss / perplexity
        super().validate()


def split_sentences(text: str) -> list[str]:
    """Sentences for ROUGE-Lsum: the text's own line breaks, then a break after ., ! or ? followed by whitespace."""
    out = []
    for line in text.splitlines():
        out += [s for s in re.split(r"(?<=[.!?])\s+", line.strip()) if s]
    return out


def rouge_scores(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Mean ROUGE F1 x 100 over examples (rouge-score, Porter stemmer); Lsum on newline-joined sentences."""
    from rouge_score import rouge_scorer
    if len(hyps) != len(refs):
        raise ValueError("hypotheses and references differ in number")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for h, r in zip(hyps, refs):
        s = scorer.score("\n".join(split_sentences(r)), "\n".join(split_sentences(h)))
        for k in ROUGE_KEYS:
            totals[k] += s[k].fmeasure
    n = max(len(hyps), 1)
    return {k: 100.0 * v / n for k, v in totals.items()}


def text_infilling(ids: list[int], mask: int, ratio: float, lam: float, rng) -> list[int]:
    """BART's text infilling (Lewis et al. 2020; fairseq's DenoisingDataset with replace_length 1) on token ids:
    span lengths ~ Poisson(lam) are drawn until they cover round(ratio * len(ids)) tokens (the last one cut to fit),
    and each span is replaced by ONE ``mask`` (a span of length 0 inserts a mask), so the model must also infer how
    many tokens are missing.  The spans are placed without overlap at random (the unmasked tokens are split into
    len(spans) + 1 random runs around them, as in T5's span corruption), so exactly that many tokens are masked.
    ``rng`` is a numpy Generator (the caller seeds it)."""
    n = len(ids)
    budget = int(round(ratio * n))
    if n == 0 or budget == 0:
        return list(ids)
    lengths = []
    while sum(lengths) < budget:
        lengths.append(int(rng.poisson(lam)))
    lengths[-1] -= sum(lengths) - budget
    cuts = sorted(int(c) for c in rng.integers(0, n - budget + 1, size=len(lengths)))
    runs = [b - a for a, b in zip([0, *cuts], [*cuts, n - budget])]
    out, pos = [], 0
    for run, length in zip(runs, lengths):
        out += ids[pos:pos + run] + [mask]
        pos += run + length
    return out + ids[pos:]


def _remote_code(model_dir: str) -> dict:
    """{"trust_remote_code": True} for an export whose model code travels with it (the copy model), else {}."""
    import json
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            return {"trust_remote_code": True} if "auto_map" in json.load(f) else {}
    except (OSError, ValueError):
        return {}


def find_split_file(data_dir: str, split: str) -> str:
    for pattern in (f"{split}", f"*-{split}", f"*_{split}"):
        for ext in TABLE_EXTS:
            hits = sorted(glob.glob(os.path.join(glob.escape(data_dir), pattern + ext)))
            if hits:
                return hits[0]
    raise ConfigError(f"no {split} file in {data_dir}: expected {split}.jsonl / .csv / .tsv (optionally .gz, or "
                      f"NAME-{split}.*); check --task.data_dir and --task.{{train,valid,test}}_split")


class _ByObjective:
    """A class attribute whose value on a task object follows its ``--task.objective``."""

    def __init__(self, summarize, denoise):
        self.summarize, self.denoise = summarize, denoise

    def __get__(self, obj, owner=None):
        return self.summarize if obj is None or obj.cfg.objective == "summarize" else self.denoise


class Summarization(Seq2SeqTask):
    Config = Config
    # the config owns the metric: ROUGE-L when summarizing, the loss when denoising (nothing is generated); the
    # class itself (the average tool's --best) says rougeL
    metric = _ByObjective("rougeL", "nll")
    metric_mode = _ByObjective("max", "min")
    name = "summarization"
    pipeline_tag = "summarization"
    tool_name = "summarize"
    example_input = "Anna: are you coming tonight? Ben: yes, at 8. Anna: great, see you!"

    @classmethod
    def default_overrides(cls):
        # fairseq's BART fine-tuning: Adam (0.9, 0.999) eps 1e-8, weight decay 0.01, polynomial decay after
        # warmup, label smoothing 0.1, clip 0.1; alpha 0.7 (appendix A.2, CNN/DM).
        return {"optim.name": "adamw", "optim.lr": 3e-4, "optim.beta1": 0.9, "optim.beta2": 0.999, "optim.eps": 1e-8,
                "optim.weight_decay": 0.01, "optim.schedule": "polynomial", "optim.warmup_steps": 500,
                "optim.clip_grad": 0.1, "rdrop.alpha": 0.7, "train.max_tokens": 4096, "eval.batch_size": 32}

    @classmethod
    def recipes(cls):
        bart_large = {"task.model": "bart_large", "task.pretrained": "facebook/bart-large",
                      "task.label_smoothing": 0.1, "task.dropout": 0.1, "task.attention_dropout": 0.1,
                      "optim.lr": 3e-5, "optim.warmup_steps": 500, "optim.clip_grad": 0.1,
                      "optim.schedule": "polynomial", "optim.weight_decay": 0.01, "train.max_tokens": 2048,
                      "train.grad_accum": 4, "rdrop.alpha": 0.7}
        cnndm = {**bart_large, "task.dataset": "cnn_dailymail", "task.beam": 4, "task.lenpen": 2.0,
                 "task.min_len": 55, "task.max_len_a": 0.0, "task.max_len_b": 140, "task.no_repeat_ngram_size": 3,
                 "train.max_steps": 20000}
        xsum = {**bart_large, "task.dataset": "xsum", "task.beam": 6, "task.lenpen": 1.0, "task.min_len": 10,
                "task.max_len_a": 0.0, "task.max_len_b": 60, "task.no_repeat_ngram_size": 3,
                "train.max_steps": 15000}
        # this machine (2 CPU cores): a pointer-generator bart_small from scratch; without the copy mechanism a
        # model this size trained this briefly ignores the dialogue (results/summarization_samsum)
        samsum = {"task.model": "bart_small", "task.copy": True, "task.source_column": "dialogue",
                  "task.target_column": "summary", "task.vocab_size": 8000, "task.max_source_positions": 512,
                  "task.max_target_positions": 128, "task.beam": 4, "task.lenpen": 1.0, "task.min_len": 5,
                  "task.max_len_a": 0.0, "task.max_len_b": 60, "task.no_repeat_ngram_size": 3,
                  "task.eval_gen_examples": 200, "optim.lr": 7e-4, "optim.warmup_steps": 60,
                  "optim.schedule": "polynomial", "train.max_tokens": 4096, "train.max_steps": 300,
                  "rdrop.alpha": 0.7, "eval.every_steps": 100, "checkpoint.every_steps": 100,
                  "checkpoint.keep_last": 2}
        return {"cnndm_bart_large": cnndm, "xsum_bart_large": xsum, "samsum_small": samsum}

    # -- data ----------------------------------------------------------------------------------------------
    def columns(self) -> tuple[str, str]:
        c = self.cfg
        _, hub_src, hub_tgt = HUB.get(c.dataset, (None, "document", "summary")) if not c.data_dir else \
            (None, "document", "summary")
        return c.source_column or hub_src, c.target_column or hub_tgt

    def read_split(self, split_name):
        c = self.cfg
        src_col, tgt_col = self.columns()
        if c.data_dir:
            table = _text.read_table(find_split_file(c.data_dir, split_name), [src_col, tgt_col])
            return table[src_col], table[tgt_col]
        config = c.dataset_config or HUB.get(c.dataset, (None,))[0]
        ds = _text.load_hub(c.dataset, config, split_name)
        missing = [col for col in (src_col, tgt_col) if col not in ds.column_names]
        if missing:
            raise ConfigError(f"dataset {c.dataset} has no column {', '.join(missing)} (columns: "
                              f"{', '.join(ds.column_names)}): pass --task.source_column / --task.target_column")
        return [x or "" for x in ds[src_col]], [x or "" for x in ds[tgt_col]]

    def make_pairs(self, split, s_ids, t_ids, s_text, t_text):
        """denoise: (text infilling of the document, the document) for every document of the split, the target
        cut to the target positions; the noise is drawn once per split, seeded by the run's seed for training and
        by a fixed seed for the other splits (their loss stays comparable between runs)."""
        if self.cfg.objective != "denoise":
            return s_ids, t_ids, s_text, t_text
        import zlib

        import numpy as np
        c, lay = self.cfg, self.layout
        mask = self.tokenizers()[0].token_to_id("<mask>")
        if mask is None:
            raise ConfigError("--task.objective denoise needs a <mask> token, which this tokenizer lacks: train "
                              "the BPE for the run (no --task.pretrained) or pretrain from a BART checkpoint")
        seed = self.run_cfg.seed if split == "train" else 0
        rng = np.random.default_rng([seed, zlib.crc32(self.split_name(split).encode())])
        docs = [x[:c.max_target_positions - lay.tgt_extra] for x in s_ids]
        noised = [text_infilling(d, mask, c.mask_ratio, c.poisson_lambda, rng) for d in docs]
        return noised, docs, s_text, s_text

    # -- tokenizers ------------------------------------------------------------------------------------------
    def _pretrained_path(self) -> str:
        if self.cfg.model == "minilm2minilm":
            from tasks.glue import minilm_path
            return minilm_path()
        return self.cfg.pretrained

    def tokenizer_recipe(self):
        if self._pretrained_path():
            return None
        return {"vocab_size": self.cfg.vocab_size, "kind": "byte_level", "columns": list(self.columns()),
                "specials": SPECIALS}

    def train_tokenizers(self, src_texts, tgt_texts):
        return {"tokenizer.json": _text.train_bpe(list(src_texts) + list(tgt_texts), self.cfg.vocab_size,
                                                  SPECIALS, kind="byte_level")}

    def load_tokenizers(self, folder):
        if folder is not None:
            tok = _text.load_tokenizer(os.path.join(folder, "tokenizer.json"))
            return tok, tok
        from transformers import AutoTokenizer
        path = self._pretrained_path()
        try:
            hf_tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"could not load the tokenizer of {path!r} ({type(e).__name__}): go online once or "
                              "pass a local folder") from None
        self._hf_special = {"pad": hf_tok.pad_token_id, "bos": hf_tok.cls_token_id if hf_tok.cls_token_id is not None
                            else hf_tok.bos_token_id, "eos": hf_tok.sep_token_id if hf_tok.cls_token_id is not None
                            else hf_tok.eos_token_id}
        import copy
        backend = copy.deepcopy(hf_tok.backend_tokenizer)
        backend.no_padding()            # a saved tokenizer.json may pad / truncate every text to a fixed length
        backend.no_truncation()         # (MiniLM's: 128); the layout and the positions flags decide here
        return backend, backend

    @property
    def layout(self):
        if self.cfg.model == "minilm2minilm":
            self.tokenizers()
            s = self._hf_special        # [CLS] x [SEP] -> [CLS] y [SEP]
            return Layout(pad=s["pad"], eos=s["eos"], bos=s["bos"], decoder_start=s["bos"], src_bos=True)
        return BART_LAYOUT

    # -- model -----------------------------------------------------------------------------------------------
    def build_model(self, ds_config: dict):
        from models import bart
        c = self.cfg
        self.check_resume_vocab()
        opt = lambda v: None if v == -1.0 else v  # noqa: E731
        drop = dict(dropout=opt(c.dropout), attention_dropout=opt(c.attention_dropout))
        vocab = self.vocab_sizes()[0]
        if c.model == "minilm2minilm":
            lay = self.layout
            model = bart.build_minilm2minilm(ds_config, self._pretrained_path(), pad=lay.pad, cls=lay.bos,
                                             sep=lay.eos, cross_attention_init=c.cross_attention_init, **drop)
            self._log(f"model minilm2minilm: vocab {vocab}, warm-started from all-MiniLM-L6-v2")
            self.setup_fused_loss(model, vocab)
            return model
        if c.pretrained:
            config = bart.pretrained_bart_config(c.pretrained, activation_dropout=opt(c.activation_dropout), **drop)
            bart.check_pretrained(config, c.model, c.pretrained,
                                  max(c.max_source_positions, c.max_target_positions))
            model = bart.build_bart(config, ds_config, c.pretrained)
            self._log(f"model {c.model} from {c.pretrained}: vocab {config.vocab_size}")
            self.setup_fused_loss(model, config.vocab_size)
            return model
        if max(c.max_source_positions, c.max_target_positions) > 1024 and c.model in ("bart_base", "bart_large"):
            raise ConfigError("BART has 1024 learned positions: keep --task.max_*_positions <= 1024")
        config = bart.bart_config(c.model, vocab, max_positions=max(c.max_source_positions, c.max_target_positions),
                                  activation_dropout=opt(c.activation_dropout), copy=c.copy, **drop)
        n = bart.fairseq_num_params(c.model, vocab, config.max_position_embeddings)
        extra = bart.copy_num_params(config.d_model) if c.copy else 0
        self._log(f"model {c.model}: vocab {vocab}, {n:,} parameters (fairseq count)"
                  + (f" + {extra:,} of the copy mechanism" if extra else ""))
        model = bart.build_bart(config, ds_config)
        self.setup_fused_loss(model, vocab)
        return model

    def exports_code(self) -> bool:
        return self.cfg.copy            # the pointer-generator's code (bart_copy.py) travels with the export

    def fused_head(self, model):
        if self.cfg.copy:               # the output distribution mixes in the copy attention: no hidden-states path
            return None
        if self.cfg.model == "minilm2minilm":
            # HF's EncoderDecoderModel has no features-only forward, and its BERT decoder's LM head applies a
            # prediction transform (dense + GELU + LayerNorm) before the projection: stays unfused (MiniLM's
            # 30522 x 384 logits are the small case; --task.fused_loss true is refused with a message).
            return None
        return {"head": model.lm_head, "extra_bias": "final_logits_bias"}

    @classmethod
    def load_exported(cls, model_dir):
        """The Auto class on the folder; a copy model's code comes with its export (trust_remote_code only then)."""
        from transformers import AutoModelForSeq2SeqLM
        return AutoModelForSeq2SeqLM.from_pretrained(model_dir, **_remote_code(model_dir))

    @staticmethod
    def may_be_missing(key: str) -> bool:
        return key.endswith("embed_tokens.weight") or key == "lm_head.weight"

    # -- score -----------------------------------------------------------------------------------------------
    def score(self, hyps, refs):
        return rouge_scores(hyps, refs)

    @staticmethod
    def score_exported(settings, hyps, refs):
        return rouge_scores(hyps, refs)


TASK = Summarization


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(_seq2seq.main(Summarization, generate_name="summarize"))
