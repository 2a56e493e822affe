"""The sequence-to-sequence core that translation and summarization subclass (fairseq's split: the data layer owns
text reading, BPE, token batching and generation; a task is glue).

The base owns: ``prepare`` (BPE training, rank 0 first), ``build_dataset`` (encode, drop empty pairs, drop or
truncate long ones), ``example_sizes`` (token batching through ``--train.max_tokens``), ``collate`` (the model's
token layout), ``forward``, ``num_units`` (non-pad target tokens), ``batch_stats`` (padding ratio), ``evaluate``
(per-token loss / nll / ppl / token accuracy, then generation and the task's score), ``export`` (weights +
tokenizer + decoding settings) and the command-line tools (``generate`` for a file of inputs, ``average`` for checkpoints).

The loss: by default (``--task.fused_loss auto``) a target vocabulary of at least fused_loss.FUSED_MIN_VOCAB
symbols uses the fused, chunked R-Drop token loss (engine/fused_loss.py): ``build_model`` attaches it over the
model's output projection (``setup_fused_loss``), ``forward`` asks the model (through the DeepSpeed engine) for the
decoder's final hidden states instead of logits (``features_only=True``), and the engine's default loss /
rdrop_terms compute NLL + symmetric KL chunk by chunk, never holding [2 x tokens, V] logits; the evaluation loss
pass computes per-token NLL in chunks too.  ``true`` / ``false`` force it on or off; values, gradients and whole
runs are equal either way (tests/test_seq2seq_fused.py).

A subclass supplies: ``read_split`` (raw source and target texts), ``tokenizer_recipe`` / ``train_tokenizers`` /
``load_tokenizers``, ``layout`` (special ids), ``build_model`` / ``load_exported``, ``fused_head`` (the output
projection for the fused loss, or None when the model has no hidden-states path), ``score`` (BLEU, ROUGE) and its
``metric``.

Evaluation cost is bounded: intermediate evaluations generate for a fixed, seeded subset of
``--task.eval_gen_examples`` examples (default 256) and the final evaluation for ``--task.final_gen_examples``
(default -1 = auto: the whole split, except that a smoke run, one that ends before ``SMOKE_STEPS`` optimizer steps,
generates the intermediate subset and says so: its model cannot write yet, so beam search would run to the maximum
length on every sentence of the split for a meaningless score; 0 = always the whole split); each rank generates its share in batches sorted by source length (little padding,
similar output lengths), and the hypotheses come back in dataset order.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass

import torch

from engine import fused_loss, losses
from engine.config import ConfigError
from engine.task import Task, TaskConfig, TaskOutput
from tasks import _text


FUSED_SETTINGS = ("auto", "true", "false", "on", "off")


@dataclass
class Seq2SeqConfig(TaskConfig):
    """Settings every sequence-to-sequence task has (``--task.FIELD``); subclasses add their own and may change
    the defaults."""
    model: str = ""
    data_dir: str = ""                  # local files (the subclass says which layout)
    dataset: str = ""                   # a Hugging Face dataset name when data_dir is not set
    dataset_config: str = ""            # its config ("" = the task's default for that dataset)
    train_split: str = "train"
    valid_split: str = "valid"
    test_split: str = "test"
    max_train_examples: int = 0         # use only the first N training examples (0 = all)
    vocab_size: int = 10000             # BPE symbols when the tokenizer is trained for the run
    cache_dir: str = ""                 # where trained tokenizers are cached; "" = OUTPUT_DIR/bpe
    max_source_positions: int = 1024    # longest source in tokens, specials included
    max_target_positions: int = 1024
    long_train_examples: str = "drop"   # drop | truncate: training pairs longer than the positions above
    dropout: float = -1.0               # -1 = the model preset's
    attention_dropout: float = -1.0
    activation_dropout: float = -1.0
    label_smoothing: float = 0.1
    fused_loss: str = "auto"            # auto | true | false: the chunked fused token loss (engine/fused_loss.py);
    #                                     auto = fused when the target vocabulary >= fused_loss.FUSED_MIN_VOCAB
    beam: int = 5
    lenpen: float = 1.0
    max_len_a: float = 1.2              # generate up to a * (longest source in the batch) + b tokens
    max_len_b: int = 10
    min_len: int = 1                    # shortest output in tokens (fairseq's --min-len)
    no_repeat_ngram_size: int = 0
    eval_generate: bool = True          # beam search + the task's score at every evaluation
    eval_gen_examples: int = 256        # intermediate evaluations: a fixed seeded subset of N examples (0 = all)
    final_gen_examples: int = -1        # the final evaluation: N examples (0 = the whole split; -1 = auto: the whole
    #                                     split, or eval_gen_examples for a run of fewer than SMOKE_STEPS steps)

    def validate(self) -> None:
        if not self.data_dir and not self.dataset:
            raise ConfigError("no data: pass --task.data_dir DIR or --task.dataset NAME")
        if self.data_dir and not os.path.isdir(self.data_dir):
            raise ConfigError(f"--task.data_dir {self.data_dir} does not exist: pass the folder holding the "
                              "split files")
        if self.vocab_size < 64:
            raise ConfigError(f"--task.vocab_size {self.vocab_size} is too small: use >= 64")
        if self.beam < 1:
            raise ConfigError(f"--task.beam must be >= 1, got {self.beam}")
        if self.max_source_positions < 4 or self.max_target_positions < 4:
            raise ConfigError("--task.max_source_positions and --task.max_target_positions must be >= 4")
        if self.long_train_examples not in ("drop", "truncate"):
            raise ConfigError(f"--task.long_train_examples must be drop or truncate, got "
                              f"{self.long_train_examples!r}")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            v = getattr(self, name)
            if v != -1.0 and not 0 <= v < 1:
                raise ConfigError(f"--task.{name} must be in [0, 1) (or -1 for the preset's), got {v}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--task.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if str(self.fused_loss).lower() not in FUSED_SETTINGS:
            raise ConfigError(f"--task.fused_loss must be auto, true or false, got {self.fused_loss!r}")
        for name in ("eval_gen_examples", "max_train_examples", "min_len", "no_repeat_ngram_size", "max_len_b"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--task.{name} must be >= 0, got {getattr(self, name)}")
        if self.final_gen_examples < -1:
            raise ConfigError(f"--task.final_gen_examples must be >= 0 (0 = the whole split) or -1 (auto), got "
                              f"{self.final_gen_examples}")


@dataclass(frozen=True)
class Layout:
    """Where the special tokens go (ids of the task's tokenizer).

    source         = [bos]? x eos           (bos when ``src_bos``)
    labels         = [bos]? y eos           (bos when ``tgt_bos``)
    decoder input  = decoder_start, labels[:-1]   (the labels shifted right: fairseq's prev_output_tokens,
                                                   HF's shift_tokens_right)
    fairseq translation: no bos, decoder_start = eos.  BART: bos on both sides, decoder_start = eos.
    """
    pad: int
    eos: int
    bos: int
    decoder_start: int
    src_bos: bool = False
    tgt_bos: bool = False

    def source(self, ids) -> list[int]:
        return ([self.bos] if self.src_bos else []) + list(ids) + [self.eos]

    def labels(self, ids) -> list[int]:
        return ([self.bos] if self.tgt_bos else []) + list(ids) + [self.eos]

    @property
    def src_extra(self) -> int:
        return 1 + self.src_bos

    @property
    def tgt_extra(self) -> int:
        return 1 + self.tgt_bos

    def collate(self, samples) -> dict[str, torch.Tensor]:
        srcs = [self.source(s) for s, _ in samples]
        labs = [self.labels(t) for _, t in samples]
        n, S, T = len(samples), max(map(len, srcs)), max(map(len, labs))
        src = torch.full((n, S), self.pad, dtype=torch.long)
        dec = torch.full((n, T), self.pad, dtype=torch.long)
        lab = torch.full((n, T), self.pad, dtype=torch.long)
        for k, (s, y) in enumerate(zip(srcs, labs)):
            src[k, :len(s)] = torch.tensor(s)
            lab[k, :len(y)] = torch.tensor(y)
            dec[k, :len(y)] = torch.tensor([self.decoder_start] + y[:-1])
        return {"input_ids": src, "attention_mask": src.ne(self.pad), "decoder_input_ids": dec, "labels": lab}

    def strip(self, row: list[int]) -> list[int]:
        """Generated ids -> content ids: drop the decoder start, bos and padding, cut at the first eos."""
        ids = [i for i in row[1:] if i not in (self.pad, self.bos)]
        return ids[:ids.index(self.eos)] if self.eos in ids else ids


class PairSplit:
    """Encoded pairs (content ids, no specials) and their raw text."""

    def __init__(self, src_ids, tgt_ids, src_text, tgt_text):
        self.src_ids, self.tgt_ids, self.src_text, self.tgt_text = src_ids, tgt_ids, src_text, tgt_text

    def __len__(self):
        return len(self.src_ids)

    def __getitem__(self, i):
        return self.src_ids[i], self.tgt_ids[i]


def generation_kwargs(c: Seq2SeqConfig, layout: Layout, src_len: int, beam: int | None = None,
                      lenpen: float | None = None) -> dict:
    """HF generate settings for fairseq's decoding flags.  HF's lengths count the decoder start token, hence the
    +1 (and +1 for eos in the maximum, as fairseq allows a * src + b tokens and then eos)."""
    beam = c.beam if beam is None else beam
    if beam < 1:
        raise ConfigError(f"beam must be >= 1, got {beam}: pass --beam 5 (or --task.beam 5)")
    return dict(num_beams=beam, length_penalty=c.lenpen if lenpen is None else lenpen, early_stopping=beam > 1,
                do_sample=False, max_length=max(1, int(c.max_len_a * src_len + c.max_len_b)) + 2,
                min_length=c.min_len + 1 if c.min_len else 0, no_repeat_ngram_size=c.no_repeat_ngram_size,
                decoder_start_token_id=layout.decoder_start, eos_token_id=layout.eos, pad_token_id=layout.pad,
                bos_token_id=layout.bos, forced_bos_token_id=None, forced_eos_token_id=None,
                num_return_sequences=1)


SMOKE_STEPS = 100   # a run shorter than this is a smoke run: its final evaluation generates the bounded subset


def final_gen_count(c: Seq2SeqConfig, step: int) -> int:
    """How many examples the final evaluation generates for (0 = all): ``final_gen_examples`` when set (>= 0),
    else the whole split, or for a smoke run (fewer than SMOKE_STEPS steps) the intermediate evaluations' subset."""
    if c.final_gen_examples >= 0:
        return c.final_gen_examples
    return c.eval_gen_examples if step < SMOKE_STEPS else 0


def eval_subset(n: int, k: int) -> list[int]:
    """A fixed (seeded) subset of k of n example indices, in order; all of them when k is 0 or >= n."""
    if not k or k >= n:
        return list(range(n))
    return sorted(random.Random(12345).sample(range(n), k))


class Seq2SeqTask(Task):
    Config = Seq2SeqConfig
    metric_mode = "max"
    default_eval_split = "valid"
    name = "seq2seq"                      # log prefix and the exported settings file (NAME.json)

    def __init__(self, run_cfg, world=None):
        super().__init__(run_cfg, world)
        self._splits: dict = {}
        self._raw: dict = {}
        self.src_tok = self.tgt_tok = None
        self.tok_folder = self.tok_key = None

    def _log(self, msg: str) -> None:
        if self.is_main:
            print(f"[{self.name}] {msg}", flush=True)

    # -- what a subclass supplies ----------------------------------------------------------------------------
    def read_split(self, split_name: str) -> tuple[list[str], list[str]]:
        """Raw (source texts, target texts) of a split, line-aligned."""
        raise NotImplementedError

    def tokenizer_recipe(self) -> dict | None:
        """Settings of a tokenizer trained for the run (part of its cache key), or None when the tokenizer comes
        ready-made (a pretrained model's): then ``load_tokenizers(None)`` loads it."""
        raise NotImplementedError

    def tokenizer_files(self) -> list[str]:
        return ["tokenizer.json"]

    def train_tokenizers(self, src_texts: list[str], tgt_texts: list[str]) -> dict:
        """{file name: tokenizers.Tokenizer} trained on the training split."""
        raise NotImplementedError

    def load_tokenizers(self, folder: str | None):
        """(source tokenizer, target tokenizer) as ``tokenizers.Tokenizer`` objects."""
        raise NotImplementedError

    @property
    def layout(self) -> Layout:
        raise NotImplementedError

    def score(self, hyps: list[str], refs: list[str]) -> dict[str, float]:
        raise NotImplementedError

    @classmethod
    def load_exported(cls, model_dir: str):
        """The model class's from_pretrained on an export folder (no DeepSpeed)."""
        raise NotImplementedError

    # -- data ----------------------------------------------------------------------------------------------
    def split_name(self, split: str) -> str:
        c = self.cfg
        return {"train": c.train_split, "valid": c.valid_split, "test": c.test_split}.get(split, split)

    def raw(self, split: str) -> tuple[list[str], list[str]]:
        name = self.split_name(split)
        if name not in self._raw:
            s, t = self.read_split(name)
            if split == "train" and self.cfg.max_train_examples:
                s, t = s[:self.cfg.max_train_examples], t[:self.cfg.max_train_examples]
            keep = [i for i in range(len(s)) if s[i].strip() and t[i].strip()]
            if len(keep) < len(s):
                self._log(f"{name}: dropped {len(s) - len(keep)} of {len(s)} pairs with an empty side")
            self._raw[name] = ([s[i].strip() for i in keep], [t[i].strip() for i in keep])
        return self._raw[name]

    def _train_texts(self) -> tuple[list[str], list[str]]:
        s, t = self.raw("train")
        if not s:
            raise ConfigError(f"the {self.split_name('train')} split has no usable pairs: point the task at data "
                              "with examples")
        return s, t

    def _cache_root(self) -> str:
        return self.cfg.cache_dir or os.path.join(self.run_cfg.output_dir, "bpe")

    def _key(self) -> str | None:
        recipe = self.tokenizer_recipe()
        return None if recipe is None else _text.content_key(list(self._train_texts()), recipe)

    def prepare(self) -> None:
        """Rank 0 first: train and cache the BPE (once per data + settings); the other ranks then load it."""
        recipe = self.tokenizer_recipe()
        if recipe is None or not self.is_main:
            return
        s, t = self._train_texts()
        _text.cached_tokenizers(self._cache_root(), self._key(), self.tokenizer_files(),
                                lambda: self.train_tokenizers(s, t), {**recipe, "train_pairs": len(s)},
                                log=self._log)

    def tokenizers(self):
        if self.src_tok is None:
            key = self._key()
            folder = None if key is None else os.path.join(self._cache_root(), f"bpe-{key}")
            if folder is not None and not os.path.isfile(os.path.join(folder, "done")):
                raise ConfigError(f"tokenizer cache {folder} is not complete on this rank: put --task.cache_dir "
                                  "on a file system every rank sees")
            self.src_tok, self.tgt_tok = self.load_tokenizers(folder)
            self.tok_folder, self.tok_key = folder, key
        return self.src_tok, self.tgt_tok

    def vocab_sizes(self) -> tuple[int, int]:
        s, t = self.tokenizers()
        return s.get_vocab_size(), t.get_vocab_size()

    def build_dataset(self, split: str) -> PairSplit:
        name = self.split_name(split)
        if name in self._splits:
            return self._splits[name]
        c, lay = self.cfg, self.layout
        src_tok, tgt_tok = self.tokenizers()
        s_text, t_text = self.raw(split)
        s_ids, t_ids = _text.encode(src_tok, s_text), _text.encode(tgt_tok, t_text)
        s_ids, t_ids, s_text, t_text = self.make_pairs(split, s_ids, t_ids, s_text, t_text)
        ms, mt = c.max_source_positions - lay.src_extra, c.max_target_positions - lay.tgt_extra
        long = [i for i in range(len(s_ids)) if len(s_ids[i]) > ms or len(t_ids[i]) > mt]
        if split == "train" and c.long_train_examples == "drop":
            drop = set(long)
            keep = [i for i in range(len(s_ids)) if i not in drop]
            if drop:
                self._log(f"{name}: dropped {len(drop)} of {len(s_ids)} pairs longer than "
                          "--task.max_source_positions / --task.max_target_positions")
            s_ids, t_ids = [s_ids[i] for i in keep], [t_ids[i] for i in keep]
            s_text, t_text = [s_text[i] for i in keep], [t_text[i] for i in keep]
        elif long:
            self._log(f"{name}: truncated {len(long)} of {len(s_ids)} pairs to --task.max_source_positions "
                      f"{c.max_source_positions} / --task.max_target_positions {c.max_target_positions}")
            s_ids, t_ids = [x[:ms] for x in s_ids], [x[:mt] for x in t_ids]
        ds = PairSplit(s_ids, t_ids, s_text, t_text)
        if len(ds) == 0:
            raise ConfigError(f"no pairs left in {name} after filtering: raise --task.max_*_positions")
        self._log(f"{name}: {len(ds)} pairs")
        self._splits[name] = ds
        return ds

    def make_pairs(self, split: str, s_ids, t_ids, s_text, t_text):
        """The encoded (source, target) pairs a split trains or evaluates on, before the length filter: as read by
        default; a subclass may derive other pairs from them (summarization's denoising objective)."""
        return s_ids, t_ids, s_text, t_text

    def example_sizes(self, dataset: PairSplit):
        """(source, target) lengths with their special tokens: fairseq's size columns for token batching."""
        lay = self.layout
        return [(len(s) + lay.src_extra, len(t) + lay.tgt_extra) for s, t in zip(dataset.src_ids, dataset.tgt_ids)]

    def check_resume_vocab(self) -> None:
        """A resumed run must use the vocabulary its checkpoint was trained with (DIR/vocab.json records it)."""
        path = os.path.join(self.run_cfg.output_dir, "vocab.json")
        vs, vt = self.vocab_sizes()
        mine = {"bpe_key": self.tok_key, "src_vocab_size": vs, "tgt_vocab_size": vt}
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            if {k: saved.get(k) for k in mine} != mine:
                raise ConfigError(f"vocabulary mismatch: the checkpoint in {self.run_cfg.output_dir} was trained with "
                                  f"{saved.get('src_vocab_size')}/{saved.get('tgt_vocab_size')} BPE symbols (key "
                                  f"{saved.get('bpe_key')}) but these data/settings give {vs}/{vt} (key "
                                  f"{self.tok_key}): resume with the same data and tokenizer settings or use a new "
                                  "--output_dir")
        elif self.is_main:
            os.makedirs(self.run_cfg.output_dir, exist_ok=True)
            with open(path, "w") as f:
                json.dump(mine, f, indent=2)

    # -- the fused loss --------------------------------------------------------------------------------------
    def fused_head(self, model) -> dict | None:
        """``fused_loss.attach`` arguments for ``model`` (head=, extra_bias=), or None when the model has no way to
        return its final hidden states through its forward (then the loss stays unfused)."""
        return None

    def fused_wanted(self, vocab_size: int) -> bool:
        """What ``--task.fused_loss`` asks for with this target vocabulary (auto: >= FUSED_MIN_VOCAB)."""
        return fused_loss.want_fused(str(self.cfg.fused_loss), vocab_size)

    def setup_fused_loss(self, model, vocab_size: int):
        """Attach the fused token loss to ``model`` when ``--task.fused_loss`` asks for it (call in build_model,
        before deepspeed.initialize).  Returns the FusedTokenLoss or None."""
        if not self.fused_wanted(vocab_size):
            return None
        spec = self.fused_head(model)
        if spec is None:
            if str(self.cfg.fused_loss).lower() in ("true", "on"):
                raise ConfigError(f"--task.fused_loss true but --task.model {self.cfg.model} has no hidden-states "
                                  "path for it: use --task.fused_loss auto or false")
            self._log(f"fused loss: not available for --task.model {self.cfg.model}, unfused")
            return None
        head = fused_loss.attach(model, **spec)
        self._log(f"fused loss: on (target vocabulary {vocab_size}, chunks of "
                  f"{fused_loss.default_chunk_size(vocab_size)} tokens per copy; --task.fused_loss false turns it off)")
        return head

    # -- batches and the loss --------------------------------------------------------------------------------
    def collate(self, samples, generator=None):
        return self.layout.collate(samples)

    def forward(self, model, batch):
        """Logits, or (fused loss attached) the decoder's final hidden states + the fused head.  ``model`` is the
        DeepSpeed engine (or the bare model): the fused path goes through its forward too (engine/fused_loss.py
        says why)."""
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      decoder_input_ids=batch["decoder_input_ids"], use_cache=False)
        target = batch["labels"]
        pad = target.eq(self.layout.pad)
        head = fused_loss.find(model)
        if head is not None:
            hidden = model(**inputs, features_only=True).last_hidden_state
            return TaskOutput(None, target, pad, hidden=hidden, head=head)
        return TaskOutput(logits=model(**inputs).logits, target=target, pad_mask=pad)

    def num_units(self, batch):
        return int(batch["labels"].ne(self.layout.pad).sum())

    def batch_stats(self, batch):
        """Padding ratio of the training batches (source and target positions), logged as Train/pad_ratio."""
        pad = int(batch["input_ids"].eq(self.layout.pad).sum()) + int(batch["labels"].eq(self.layout.pad).sum())
        total = batch["input_ids"].numel() + batch["labels"].numel()
        return {"pad_ratio": (pad, total)}

    # -- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, ctx, split: str) -> dict[str, float]:
        ds = ctx.dataset(split)
        local: dict[str, list] = {"loss": [], "nll": [], "correct": [], "tokens": []}
        with torch.no_grad():
            for batch in ctx.batches(split):
                out = self.forward(ctx.model, batch)
                target, pad = out.target, out.pad_mask
                if out.fused:            # per-token NLL (smoothed and plain) in chunks: no [tokens, V] logits
                    rows, hit = out.head.token_nll(out.hidden, target, pad, [self.label_smoothing, 0.0], hits=True)
                    rows = rows.sum(-1)
                    loss, nll = rows[0], rows[1]
                else:
                    loss = torch.stack([losses.nll_loss(out.logits[k], target[k], pad[k], self.label_smoothing)
                                        for k in range(target.shape[0])])
                    nll = torch.stack([losses.nll_loss(out.logits[k], target[k], pad[k], 0.0)
                                       for k in range(target.shape[0])])
                    hit = out.logits.argmax(-1).eq(target) & ~pad
                # per example sums, so gather() can drop shard padding
                local["loss"].append(loss.float().cpu())
                local["nll"].append(nll.float().cpu())
                local["correct"].append(hit.sum(1).float().cpu())
                local["tokens"].append((~pad).sum(1).float().cpu())
        r = ctx.gather(local, len(ds))
        tokens = float(r["tokens"].sum())
        nll = float(r["nll"].sum()) / tokens
        # acc: teacher-forced token accuracy (argmax = reference token), fairseq's --report-accuracy: with the
        # loss it tells a model with worse top choices from one that is only less confident
        metrics = {"loss": float(r["loss"].sum()) / tokens, "nll": nll, "ppl": math.exp(min(nll, 50.0)),
                   "acc": float(r["correct"].sum()) / tokens}
        if self.cfg.eval_generate:
            k = final_gen_count(self.cfg, ctx.step) if ctx.final else self.cfg.eval_gen_examples
            if ctx.final and self.cfg.final_gen_examples < 0 and 0 < k < len(ds):
                self._log(f"final evaluation generates {k} of {len(ds)} {split} examples: a run of {ctx.step} steps "
                          f"(< {SMOKE_STEPS}) is a smoke run; pass --task.final_gen_examples 0 for the whole split")
            metrics.update(self.generate_and_score(ctx, split, eval_subset(len(ds), k)))
        return metrics

    def generate_split(self, ctx, ds: PairSplit, indices: list[int]) -> dict[int, str]:
        """Hypotheses for ``indices`` of ``ds``: this rank's share in source-length-sorted batches, gathered."""
        mine = ctx.shard(indices)
        order = sorted(range(len(mine)), key=lambda j: len(ds.src_ids[mine[j]]))
        _, tgt_tok = self.tokenizers()
        hyps: dict[int, str] = {}
        for start in range(0, len(order), ctx.batch_size):
            idx = [mine[j] for j in order[start:start + ctx.batch_size]]
            batch = self.layout.collate([(ds.src_ids[i], []) for i in idx])
            ids = ctx.generate(input_ids=batch["input_ids"].to(ctx.device),
                               attention_mask=batch["attention_mask"].to(ctx.device),
                               **generation_kwargs(self.cfg, self.layout, int(batch["attention_mask"].sum(1).max())))
            for i, row in zip(idx, ids.tolist()):
                hyps[i] = _text.decode(tgt_tok, self.layout.strip(row))
        return ctx.gather_objects(hyps)

    def generate_and_score(self, ctx, split: str, indices: list[int]) -> dict[str, float]:
        ds = ctx.dataset(split)
        hyps = self.generate_split(ctx, ds, indices)
        out = self.score([hyps[i] for i in indices], [ds.tgt_text[i] for i in indices])
        out["gen_examples"] = float(len(indices))
        out["empty_hyps"] = float(sum(1 for i in indices if not hyps[i]))
        if ctx.final and ctx.world.is_main:
            path = os.path.join(ctx.output_dir, "predictions", f"{self.split_name(split)}.hyp")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(hyps[i].replace("\n", " ") + "\n" for i in indices)
        return out

    # -- export ----------------------------------------------------------------------------------------------
    pipeline_tag = "text2text-generation"

    def special_tokens(self) -> dict[str, str]:
        """The tokenizer's special tokens by role, for the exported PreTrainedTokenizerFast."""
        tok, lay = self.tokenizers()[0], self.layout
        names = {"pad_token": lay.pad, "eos_token": lay.eos, "bos_token": lay.bos}
        out = {k: tok.id_to_token(i) for k, i in names.items()}
        for key, names in (("unk_token", ("<unk>", "[UNK]")), ("mask_token", ("<mask>", "[MASK]"))):
            hit = next((u for u in names if tok.token_to_id(u) is not None), None)
            if hit is not None:
                out[key] = hit
        return out

    def source_template(self) -> str:
        """The exported tokenizer's post-processing: the layout's source specials around the text."""
        sp, lay = self.special_tokens(), self.layout
        return (f"{sp['bos_token']} " if lay.src_bos else "") + f"$A {sp['eos_token']}"

    def generation_config(self):
        """HF GenerationConfig with the run's decoding settings.  fairseq caps the output at a * (source length)
        + b per batch; a saved config holds one cap, so it takes a * max_source_positions + b, bounded by the
        target positions (a trained model stops at </s> long before)."""
        from transformers import GenerationConfig
        c, lay = self.cfg, self.layout
        cap = min(int(c.max_len_a * c.max_source_positions + c.max_len_b), c.max_target_positions - 1)
        # early_stopping only means something to beam search (transformers refuses to save it with one beam)
        return GenerationConfig(num_beams=c.beam, length_penalty=c.lenpen, early_stopping=c.beam > 1,
                                do_sample=False,
                                max_length=max(1, cap) + 2, min_length=c.min_len + 1 if c.min_len else 0,
                                no_repeat_ngram_size=c.no_repeat_ngram_size,
                                decoder_start_token_id=lay.decoder_start, bos_token_id=lay.bos, eos_token_id=lay.eos,
                                pad_token_id=lay.pad, forced_bos_token_id=None, forced_eos_token_id=None)

    def export(self, model, state_dict, out_dir):
        """Weights + config, the tokenizer as a PreTrainedTokenizerFast (the layout's specials added on encode,
        model_max_length = the source positions), generation_config.json with the run's decoding, and NAME.json
        for the translate / summarize tools.  With separate vocabularies the target tokenizer goes to
        ``target_tokenizer/`` (the pipelines need one joint tokenizer; the tools read both)."""
        from engine.export import save_fast_tokenizer
        super().export(model, state_dict, out_dir)
        src_tok, tgt_tok = self.tokenizers()
        files = self.tokenizer_files()
        sp = self.special_tokens()
        save_fast_tokenizer(src_tok, out_dir, sp, model_max_length=self.cfg.max_source_positions,
                            template=self.source_template())
        if len(files) > 1:
            src_tok.save(os.path.join(out_dir, files[0]))
            tgt_tok.save(os.path.join(out_dir, files[1]))
            save_fast_tokenizer(tgt_tok, os.path.join(out_dir, "target_tokenizer"), sp,
                                model_max_length=self.cfg.max_target_positions)
        self.generation_config().save_pretrained(out_dir)
        with open(os.path.join(out_dir, f"{self.name}.json"), "w") as f:
            json.dump({"task": self.name, **self.export_settings()}, f, indent=2)

    def exports_code(self) -> bool:
        """True when the exported model's code travels with it (config.json auto_map): loading it then needs
        ``trust_remote_code=True``, which the card's code and the pipeline arguments pass."""
        return False

    def export_info(self) -> dict:
        c = self.cfg
        source = f"files in {c.data_dir}" if c.data_dir else f"hub dataset {c.dataset}"
        joint = len(self.tokenizer_files()) == 1
        remote = ", trust_remote_code=True" if self.exports_code() else ""
        usage = f"""```python
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{{path}}"{remote})
model = AutoModelForSeq2SeqLM.from_pretrained("{{path}}"{remote})
batch = tok(["{self.example_input}"], return_tensors="pt", padding=True, truncation=True)
print(tok.batch_decode(model.generate(**batch), skip_special_tokens=True))
```

(transformers 5 removed the translation / summarization pipelines; the Auto classes above are the one-line way.)
The decoding settings of the run (beam {c.beam}, length penalty {c.lenpen}, no-repeat n-gram {c.no_repeat_ngram_size},
minimum length {c.min_len}) are in generation_config.json; the run capped outputs at {c.max_len_a} x source
length + {c.max_len_b} tokens per batch, which `model.generate(..., max_length=...)` reproduces per batch; the
saved config holds one cap for all inputs.  Over a file: `python -m tasks.{self.name} {self.tool_name} --model
{{path}} --input FILE` (this repository)."""
        if not joint:
            usage += "\nThis model has separate source and target vocabularies: decode outputs with " \
                     "`AutoTokenizer.from_pretrained(path, subfolder='target_tokenizer')`."
        if remote:
            usage += "\nThe model's code is in this folder (config.json auto_map), hence `trust_remote_code=True`."
        return {"pipeline_tag": self.pipeline_tag,
                "pipeline_kwargs": {"truncation": True, **({"trust_remote_code": True} if remote else {})},
                "inputs": {"kind": "text"}, "data": f"{source}" + (f", first {c.max_train_examples} training "
                                                                    f"examples" if c.max_train_examples else ""),
                "usage": usage}

    example_input = "..."
    tool_name = "generate"

    def export_settings(self) -> dict:
        """What the command-line tools need beside the weights: the decoding settings and the layout."""
        c, lay = self.cfg, self.layout
        return {"beam": c.beam, "lenpen": c.lenpen, "max_len_a": c.max_len_a, "max_len_b": c.max_len_b,
                "min_len": c.min_len, "no_repeat_ngram_size": c.no_repeat_ngram_size,
                "max_source_positions": c.max_source_positions, "tokenizer_files": self.tokenizer_files(),
                "layout": {"pad": lay.pad, "eos": lay.eos, "bos": lay.bos, "decoder_start": lay.decoder_start,
                           "src_bos": lay.src_bos, "tgt_bos": lay.tgt_bos}}


# ---------------------------------------------------------------------------------------------------- tools

@dataclass
class Bundle:
    """An exported model with what decoding needs."""
    model: torch.nn.Module
    src_tok: object
    tgt_tok: object
    settings: dict
    layout: Layout


def load_bundle(task_cls, model_dir: str) -> Bundle:
    meta_path = os.path.join(model_dir, f"{task_cls.name}.json")
    if not os.path.isfile(meta_path) or not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ConfigError(f"{model_dir} is not an exported {task_cls.name} model (no {task_cls.name}.json / "
                          "config.json): pass DIR/hf_model of a finished run or an `average` output")
    with open(meta_path) as f:
        meta = json.load(f)
    files = meta["tokenizer_files"]
    src_tok = _text.load_tokenizer(os.path.join(model_dir, files[0]))
    tgt_tok = _text.load_tokenizer(os.path.join(model_dir, files[-1])) if len(files) > 1 else src_tok
    model = task_cls.load_exported(model_dir)
    vs, vt = src_tok.get_vocab_size(), tgt_tok.get_vocab_size()
    emb_in = model.get_input_embeddings().weight.shape[0]
    emb_out = model.get_output_embeddings().weight.shape[0]
    if (emb_in, emb_out) != (vs, vt):
        raise ConfigError(f"vocabulary mismatch: the model in {model_dir} has {emb_in}/{emb_out} embeddings but its "
                          f"tokenizer has {vs}/{vt} symbols: use the tokenizer exported with the checkpoint")
    model.eval()
    return Bundle(model, src_tok, tgt_tok, meta, Layout(**meta["layout"]))


def generate_lines(bundle: Bundle, lines: list[str], beam: int, lenpen: float, max_len_a: float, max_len_b: int,
                   batch_size: int = 64, min_len: int | None = None, no_repeat_ngram_size: int | None = None) -> list[str]:
    """Decode ``lines`` in source-length-sorted batches; the output is in input order (empty input -> '')."""
    m, lay = bundle.settings, bundle.layout
    c = Seq2SeqConfig(beam=beam, lenpen=lenpen, max_len_a=max_len_a, max_len_b=max_len_b,
                      min_len=m.get("min_len", 1) if min_len is None else min_len,
                      no_repeat_ngram_size=m.get("no_repeat_ngram_size", 0) if no_repeat_ngram_size is None
                      else no_repeat_ngram_size)
    limit = m.get("max_source_positions", 1024) - lay.src_extra
    ids = [x[:limit] for x in _text.encode(bundle.src_tok, [line.strip() for line in lines])]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [""] * len(ids)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = lay.collate([(ids[i], []) for i in idx])
            gen = bundle.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        **generation_kwargs(c, lay, int(batch["attention_mask"].sum(1).max())))
            for i, row in zip(idx, gen.tolist()):
                out[i] = _text.decode(bundle.tgt_tok, lay.strip(row)) if lines[i].strip() else ""
    return out


def checkpoint_tags(root: str, last: int = 0, best: int = 0, metric: str = "bleu") -> list[str]:
    """The newest ``last`` global_stepN tags, or the ``best`` ones by the eval ``metric`` in ROOT/../metrics.jsonl."""
    if not os.path.isdir(root):
        raise ConfigError(f"--checkpoints {root} does not exist: pass DIR/checkpoints of a run")
    steps = sorted(int(d[len("global_step"):]) for d in os.listdir(root)
                   if d.startswith("global_step") and d[len("global_step"):].isdigit())
    if not steps:
        raise ConfigError(f"no global_stepN checkpoints in {root}: save some with --checkpoint.every_steps N")
    if last:
        return [f"global_step{s}" for s in steps[-last:]]
    metrics_path = os.path.join(os.path.dirname(os.path.abspath(root)), "metrics.jsonl")
    scores = {}
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                r = json.loads(line)
                if r.get("kind") == "eval" and metric in r and r["step"] in steps:
                    scores[r["step"]] = r[metric]
    if not scores:
        raise ConfigError(f"no eval {metric} for the checkpoints in {root} in {metrics_path}: use --last N, or "
                          "evaluate when saving (--eval.every_steps = --checkpoint.every_steps)")
    ranked = sorted(scores, key=lambda s: -scores[s])[:best]
    return [f"global_step{s}" for s in sorted(ranked)]


def average_state_dicts(state_dicts: list[dict]) -> dict:
    """fairseq scripts/average_checkpoints.py: the element-wise mean of fp32 weights (accumulated in float64)."""
    keys = list(state_dicts[0])
    for sd in state_dicts[1:]:
        if list(sd) != keys:
            raise ConfigError("checkpoints to average have different parameters: average checkpoints of one run")
    return {k: (sum(sd[k].double() for sd in state_dicts) / len(state_dicts)).float() for k in keys}


def _generate_cmd(task_cls, args) -> int:
    if args.beam is not None and args.beam < 1:
        raise ConfigError(f"--beam must be >= 1, got {args.beam}: pass --beam 5")
    if not os.path.isfile(args.input):
        raise ConfigError(f"--input {args.input} does not exist: pass a text file (one input a line) or a "
                          "jsonl / csv / tsv file with --column")
    refs = None
    if _text.table_format(args.input):          # jsonl / csv / tsv: one column holds the inputs
        if not args.column:
            raise ConfigError(f"--input {args.input} is a table: pass --column NAME (the inputs' column)")
        cols = [args.column] + ([args.reference_column] if args.reference_column else [])
        table = _text.read_table(args.input, cols)
        lines, refs = table[args.column], table.get(args.reference_column)
    else:
        lines = _text.read_lines(args.input)
    bundle = load_bundle(task_cls, args.model)
    m = bundle.settings
    pick = lambda flag, key: m[key] if getattr(args, flag) is None else getattr(args, flag)  # noqa: E731
    beam = pick("beam", "beam")
    hyps = generate_lines(bundle, lines, beam, pick("lenpen", "lenpen"), pick("max_len_a", "max_len_a"),
                          pick("max_len_b", "max_len_b"), args.batch_size, pick("min_len", "min_len"),
                          pick("no_repeat_ngram_size", "no_repeat_ngram_size"))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.writelines(h.replace("\n", " ") + "\n" for h in hyps)
    else:
        sys.stdout.writelines(h.replace("\n", " ") + "\n" for h in hyps)
    if args.reference:
        refs = _text.read_lines(args.reference)
    if refs is not None:
        if len(refs) != len(hyps):
            raise ConfigError(f"misaligned files: {args.input} has {len(hyps)} lines but {args.reference} has "
                              f"{len(refs)}: give line-aligned files")
        scores = task_cls.score_exported(m, hyps, refs)
        print(json.dumps({**{k: round(v, 2) for k, v in scores.items()}, "sentences": len(hyps), "beam": beam,
                          "lenpen": pick("lenpen", "lenpen")}), file=sys.stderr, flush=True)
    return 0


def _average_cmd(task_cls, args) -> int:
    if bool(args.last) == bool(args.best) or min(args.last, args.best) < 0:
        raise ConfigError("pass exactly one of --last N or --best N (N >= 1)")
    from engine.checkpoint import fp32_state_dict   # DeepSpeed's zero_to_fp32, loading with weights_only=True
    root = args.checkpoints
    tags = checkpoint_tags(root, args.last, args.best, task_cls.metric)
    template = args.model or os.path.join(os.path.dirname(os.path.abspath(root)), "hf_model")
    if not os.path.isfile(os.path.join(template, f"{task_cls.name}.json")):
        raise ConfigError(f"no exported model at {template} to take the config and tokenizer from: pass --model DIR")
    avg = average_state_dicts([fp32_state_dict(root, t) for t in tags])
    model = task_cls.load_exported(template)
    missing, unexpected = model.load_state_dict(avg, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) | set(getattr(model, "_tied_weights_keys", []) or [])
    bad = [k for k in missing if k not in tied and not task_cls.may_be_missing(k)]
    if unexpected or bad:
        raise ConfigError(f"checkpoint parameters do not match the model in {template} (missing {bad[:3]}, "
                          f"unexpected {unexpected[:3]}): pass the --model exported by the same run")
    model.tie_weights()
    os.makedirs(args.output, exist_ok=True)
    model.save_pretrained(args.output)
    from engine.export import CARD, copy_assets
    copy_assets(template, args.output)           # tokenizer, generation config, NAME.json, export.json
    sub = os.path.join(template, "target_tokenizer")
    if os.path.isdir(sub):
        shutil.copytree(sub, os.path.join(args.output, "target_tokenizer"), dirs_exist_ok=True)
    with open(os.path.join(args.output, "averaged.json"), "w") as f:
        json.dump({"checkpoints": root, "tags": tags}, f, indent=2)
    manifest = os.path.join(args.output, "export.json")
    if os.path.isfile(manifest):                  # the template's facts, marked as an average of other weights
        with open(manifest) as f:
            m = json.load(f)
        m.update(weights="average", averaged_tags=tags, step=None, metrics={})
        with open(manifest, "w") as f:
            json.dump(m, f, indent=2)
    with open(os.path.join(args.output, CARD), "w", encoding="utf-8") as f:
        f.write(f"# Checkpoint average ({task_cls.name}, R-Drop on DeepSpeed)\n\nThe element-wise mean of the fp32 "
                f"weights of {', '.join(tags)} in {root} (fairseq's average_checkpoints).  Tokenizer, decoding "
                "settings and the training run's description are those of the export in "
                f"{template}; its card follows.\n\n")
        card = os.path.join(template, CARD)
        if os.path.isfile(card):
            f.write(open(card, encoding="utf-8").read().replace(template, args.output))
    print(f"averaged {len(tags)} checkpoints ({', '.join(tags)}) -> {args.output}", flush=True)
    return 0


def main(task_cls, argv=None, generate_name: str = "generate") -> int:
    """``python -m tasks.<task> {generate_name}|average ...``: decode a file with an export, or average
    checkpoints into one (no DeepSpeed engine needed)."""
    import argparse
    p = argparse.ArgumentParser(prog=f"python -m tasks.{task_cls.name}")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser(generate_name, help=f"{generate_name} a file with an exported model (DIR/hf_model)")
    t.add_argument("--model", required=True)
    t.add_argument("--input", required=True, help="a text file (one input a line) or a jsonl / csv / tsv table")
    t.add_argument("--column", default="", help="the inputs' column of a table --input")
    t.add_argument("--reference_column", default="", help="a table --input's reference column: print the score")
    t.add_argument("--output", default="")
    t.add_argument("--reference", default="", help="reference file: print the task's score to stderr")
    for flag, typ in (("beam", int), ("lenpen", float), ("max_len_a", float), ("max_len_b", int), ("min_len", int),
                      ("no_repeat_ngram_size", int)):
        t.add_argument(f"--{flag}", type=typ, default=None, help="default: the run's setting")
    t.add_argument("--batch_size", type=int, default=64)
    a = sub.add_parser("average", help="average the fp32 weights of DeepSpeed checkpoints (fairseq-style)")
    a.add_argument("--checkpoints", required=True, help="DIR/checkpoints")
    a.add_argument("--last", type=int, default=0)
    a.add_argument("--best", type=int, default=0)
    a.add_argument("--model", default="", help="exported model for config + tokenizer (default DIR/hf_model)")
    a.add_argument("--output", required=True)
    args = p.parse_args(argv)
    try:
        return _generate_cmd(task_cls, args) if args.cmd == generate_name else _average_cmd(task_cls, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
