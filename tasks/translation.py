"""Machine translation (appendix A.1): fairseq-equivalent transformer, joint BPE, token-level R-Drop, beam search, BLEU.

Data, by ``--task.data_dir`` / ``--task.dataset``:
  --task.data_dir DIR   parallel text files DIR/{split}.{lang} or DIR/{split}.{lang}.gz, one sentence a line, raw
                        (untokenized) text; split names from --task.train_split / valid_split / test_split
                        (../shared/data/multi30k: train, val, test_2016_flickr)
  --task.dataset NAME   a Hugging Face dataset with a ``translation`` column (iwslt2017, wmt14; needs the hub once)
Pairs with an empty side are dropped from every split; training pairs longer than --task.max_source_positions /
--task.max_target_positions BPE tokens (</s> included) are dropped, evaluation pairs are truncated; counts printed.

BPE (the ``tokenizers`` library): one joint dictionary over both languages (--task.joint_vocab true, the paper) or one
per language; ~--task.vocab_size symbols, fairseq's special ids (<s> 0, <pad> 1, </s> 2, <unk> 3).  Text is split on
spaces (kept as the ``▁`` marker, so decoding restores the raw text) and punctuation, then BPE merges.  Trained once
and cached under --task.cache_dir (default DIR/bpe) in a folder named by a hash of the training text and the
settings, so changing either retrains; the data dir is only read.

Batches: by tokens like fairseq -- examples sorted by (target, source) length with random tie-break, grouped so that
sentences x longest (source and target, </s> included) <= --task.max_tokens, the batch order shuffled every epoch.

Loss: label-smoothed NLL (0.1) over non-pad target tokens; num_units = non-pad target tokens of one copy; the
consistency is the engine's per-token symmetric KL with pads masked -- fairseq's R-Drop criterion (alpha 5).

Evaluation (valid split): loss / nll / ppl per target token from one ordinary pass, then beam search with HF
``generate`` (--task.beam, --task.lenpen, max length a * source length + b) and
  bleu      sacreBLEU on detokenized text (--task.bleu_tokenize, default 13a: Multi30k is raw text),
  bleu_tok  "tokenized BLEU" (multi-bleu.perl's role): hypothesis and reference tokenized with sacreBLEU's 13a
            tokenizer, optionally compound-split (--task.compound_split, fairseq's compound_split_bleu.sh rule
            ``(\\S)-(\\S)`` -> ``\\1 ##AT##-##AT## \\2``, the WMT14 En-De convention), scored with tokenize='none'.
            Moses' tokenizer is not a dependency; 13a is close to it, but this is not byte-identical to multi-bleu.

Commands (no DeepSpeed needed):
  python -m tasks.translation translate --model DIR/hf_model --input FILE [--output FILE] [--reference FILE]
  python -m tasks.translation average --checkpoints DIR/checkpoints (--last N | --best N) --output DIR/avg
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import random
import re
import sys
from dataclasses import dataclass

import torch

from engine.config import ConfigError
from engine.task import Task, TaskConfig, TaskOutput

BOS, PAD, EOS, UNK = "<s>", "<pad>", "</s>", "<unk>"
SPECIALS = [BOS, PAD, EOS, UNK]          # fairseq's dictionary order: ids 0, 1, 2, 3
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
BPE_VERSION = 1                          # bump when the tokenizer recipe changes (part of the cache key)
HUB_CONFIGS = {"iwslt2017": "iwslt2017-{src}-{tgt}", "wmt14": "{a}-{b}"}


@dataclass
class Config(TaskConfig):
    model: str = "transformer_iwslt_de_en"   # models.transformer_mt.PRESETS: tiny | mini | small |
    #                                          transformer_iwslt_de_en | transformer_vaswani_wmt_en_de_big
    data_dir: str = ""                  # DIR/{split}.{lang}[.gz]
    dataset: str = ""                   # hub dataset (iwslt2017 | wmt14) when data_dir is not set
    source_lang: str = "de"
    target_lang: str = "en"
    train_split: str = "train"
    valid_split: str = "val"
    test_split: str = "test_2016_flickr"
    max_train_examples: int = 0         # use only the first N training pairs (0 = all)
    vocab_size: int = 10000             # BPE symbols (about 10k IWSLT, 32k WMT)
    joint_vocab: bool = True            # one BPE dictionary over both languages
    share_all_embeddings: bool = True   # encoder input = decoder input = output embedding (needs joint_vocab)
    share_decoder_input_output_embed: bool = True
    cache_dir: str = ""                 # where BPE models are cached; "" = OUTPUT_DIR/bpe
    max_source_positions: int = 1024
    max_target_positions: int = 1024
    max_tokens: int = 4096              # tokens per micro-batch (source and target each, padding included)
    dropout: float = -1.0               # -1 = the preset's
    attention_dropout: float = -1.0
    activation_dropout: float = -1.0
    label_smoothing: float = 0.1
    beam: int = 5
    lenpen: float = 1.0
    max_len_a: float = 1.2
    max_len_b: int = 10
    eval_bleu: bool = True              # beam search + BLEU at every evaluation
    eval_bleu_max_examples: int = 0     # generate for only the first N examples of the split (0 = all)
    bleu_tokenize: str = "13a"          # sacreBLEU tokenizer for the detokenized score
    compound_split: bool = False        # ##AT## compound splitting for bleu_tok (WMT14 En-De)

    def validate(self) -> None:
        from models.transformer_mt import PRESETS
        if self.model not in PRESETS:
            raise ConfigError(f"--task.model {self.model!r} is not a preset: choose one of {', '.join(PRESETS)}")
        if not self.data_dir and not self.dataset:
            raise ConfigError("no data: pass --task.data_dir DIR (files {split}.{lang}[.gz]) or --task.dataset NAME")
        if self.data_dir and not os.path.isdir(self.data_dir):
            raise ConfigError(f"--task.data_dir {self.data_dir} does not exist: pass the folder holding "
                              f"{{split}}.{self.source_lang}[.gz] and {{split}}.{self.target_lang}[.gz]")
        if self.source_lang == self.target_lang:
            raise ConfigError("--task.source_lang and --task.target_lang are the same: pass two languages")
        if self.share_all_embeddings and not self.joint_vocab:
            raise ConfigError("--task.share_all_embeddings needs one joint dictionary: set --task.joint_vocab true "
                              "or --task.share_all_embeddings false")
        if self.vocab_size < 64:
            raise ConfigError(f"--task.vocab_size {self.vocab_size} is too small: use >= 64 (about 10000 for IWSLT)")
        if self.beam < 1:
            raise ConfigError(f"--task.beam must be >= 1, got {self.beam}")
        if self.max_tokens < 8 or self.max_source_positions < 2 or self.max_target_positions < 2:
            raise ConfigError("--task.max_tokens must be >= 8 and --task.max_*_positions >= 2")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            v = getattr(self, name)
            if v != -1.0 and not 0 <= v < 1:
                raise ConfigError(f"--task.{name} must be in [0, 1) (or -1 for the preset's), got {v}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--task.label_smoothing must be in [0, 1), got {self.label_smoothing}")


# ------------------------------------------------------------------------------------------------ raw text

def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def read_lines(path: str) -> list[str]:
    with _open_text(path) as f:
        return [line.rstrip("\n").rstrip("\r") for line in f]


def find_file(data_dir: str, split: str, lang: str) -> str:
    for name in (f"{split}.{lang}", f"{split}.{lang}.gz"):
        p = os.path.join(data_dir, name)
        if os.path.isfile(p):
            return p
    raise ConfigError(f"missing {os.path.join(data_dir, f'{split}.{lang}')}[.gz]: check --task.data_dir and the "
                      f"split names (--task.train_split/valid_split/test_split) and languages")


def read_parallel(data_dir: str, split: str, src: str, tgt: str) -> tuple[list[str], list[str]]:
    sp, tp = find_file(data_dir, split, src), find_file(data_dir, split, tgt)
    s, t = read_lines(sp), read_lines(tp)
    if len(s) != len(t):
        raise ConfigError(f"misaligned parallel files: {sp} has {len(s)} lines but {tp} has {len(t)}: "
                          "give line-aligned files")
    return s, t


def read_hub(name: str, split: str, src: str, tgt: str) -> tuple[list[str], list[str]]:
    try:
        import datasets
        a, b = sorted((src, tgt))
        config = HUB_CONFIGS.get(name, "{src}-{tgt}").format(src=src, tgt=tgt, a=a, b=b)
        hub_split = {"val": "validation", "valid": "validation"}.get(split, split)
        try:
            ds = datasets.load_dataset(name, config, split=hub_split)
        except Exception:
            if name != "iwslt2017":
                raise
            ds = datasets.load_dataset(name, f"iwslt2017-{tgt}-{src}", split=hub_split)
    except Exception as e:  # offline, unknown name or split
        raise ConfigError(f"could not load dataset {name!r} split {split!r} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else ''}): go online once, or use --task.data_dir")
    pairs = ds["translation"]
    return [p[src] for p in pairs], [p[tgt] for p in pairs]


# ------------------------------------------------------------------------------------------------ BPE

def train_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
                                                 pre_tokenizers.Punctuation(behavior="isolated")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, "special token ids must follow fairseq's dictionary"
    return tok


def bpe_key(src_texts: list[str], tgt_texts: list[str], cfg: Config) -> str:
    h = hashlib.sha256()
    for part in (src_texts, tgt_texts):
        for line in part:
            h.update(line.encode("utf-8"))
            h.update(b"\n")
        h.update(b"\0")
    h.update(json.dumps({"v": BPE_VERSION, "vocab": cfg.vocab_size, "joint": cfg.joint_vocab,
                         "langs": [cfg.source_lang, cfg.target_lang]}).encode())
    return h.hexdigest()[:16]


def tokenizer_files(joint: bool, src: str, tgt: str) -> dict[str, str]:
    return {"src": "tokenizer.json", "tgt": "tokenizer.json"} if joint else \
        {"src": f"tokenizer.{src}.json", "tgt": f"tokenizer.{tgt}.json"}


def load_tokenizers(folder: str, joint: bool, src: str, tgt: str):
    from tokenizers import Tokenizer
    files = tokenizer_files(joint, src, tgt)
    s = Tokenizer.from_file(os.path.join(folder, files["src"]))
    t = s if joint else Tokenizer.from_file(os.path.join(folder, files["tgt"]))
    return s, t


def prepare_bpe(src_texts, tgt_texts, cfg: Config, cache_root: str, is_main: bool):
    """(source tokenizer, target tokenizer, cache folder): trained by rank 0 once, loaded by every rank."""
    key = bpe_key(src_texts, tgt_texts, cfg)
    folder = os.path.join(cache_root, f"bpe-{key}")
    files = tokenizer_files(cfg.joint_vocab, cfg.source_lang, cfg.target_lang)
    done = os.path.join(folder, "done")
    if is_main and not os.path.isfile(done):
        os.makedirs(folder, exist_ok=True)
        if cfg.joint_vocab:
            toks = {"src": train_bpe(list(src_texts) + list(tgt_texts), cfg.vocab_size)}
            toks["tgt"] = toks["src"]
        else:
            toks = {"src": train_bpe(src_texts, cfg.vocab_size), "tgt": train_bpe(tgt_texts, cfg.vocab_size)}
        for side in ("src", "tgt"):
            tmp = os.path.join(folder, files[side] + f".tmp{os.getpid()}")
            toks[side].save(tmp)
            os.replace(tmp, os.path.join(folder, files[side]))
        with open(os.path.join(folder, "settings.json"), "w") as f:
            json.dump({"key": key, "vocab_size": cfg.vocab_size, "joint_vocab": cfg.joint_vocab,
                       "source_lang": cfg.source_lang, "target_lang": cfg.target_lang,
                       "train_pairs": len(src_texts)}, f, indent=2)
        open(done, "w").close()
        print(f"[translation] trained BPE ({cfg.vocab_size} symbols, {'joint' if cfg.joint_vocab else 'separate'})"
              f" -> {folder}", flush=True)
    from engine import distributed as dist_utils
    dist_utils.barrier()
    if not os.path.isfile(done):
        raise ConfigError(f"BPE cache {folder} is not visible on this rank: put --task.cache_dir on a shared "
                          "filesystem")
    s, t = load_tokenizers(folder, cfg.joint_vocab, cfg.source_lang, cfg.target_lang)
    return s, t, folder, key


def encode(tok, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts)]


# ------------------------------------------------------------------------------------------------ datasets

class TranslationSplit:
    """Encoded pairs (token ids without </s>) and the raw text; training splits also batch by tokens."""

    def __init__(self, src_ids, tgt_ids, src_text, tgt_text, max_tokens: int = 0):
        self.src_ids, self.tgt_ids, self.src_text, self.tgt_text = src_ids, tgt_ids, src_text, tgt_text
        self.max_tokens = max_tokens
        self._batches: list[list[int]] | None = None
        self._epoch_cache: tuple = (None, None)
        self.pad_ratio = float("nan")

    def __len__(self):
        return len(self.src_ids)

    def __getitem__(self, i):
        return self.src_ids[i], self.tgt_ids[i]

    def lengths(self, i: int) -> tuple[int, int]:
        return len(self.src_ids[i]) + 1, len(self.tgt_ids[i]) + 1      # </s> on the source, </s>/BOS on the target

    def make_batches(self, seed: int) -> list[list[int]]:
        """fairseq's ordered_indices + batch_by_size: random tie-break, sort by (tgt, src) length, greedy fill."""
        if self._batches is not None:
            return self._batches
        n = len(self)
        rng = random.Random(seed)
        order = list(range(n))
        rng.shuffle(order)
        lens = [self.lengths(i) for i in range(n)]
        order.sort(key=lambda i: (lens[i][1], lens[i][0]))
        batches, cur, ms, mt = [], [], 0, 0
        for i in order:
            s, t = lens[i]
            ns, nt = max(ms, s), max(mt, t)
            if cur and (len(cur) + 1) * max(ns, nt) > self.max_tokens:
                batches.append(cur)
                cur, ns, nt = [], s, t
            cur.append(i)
            ms, mt = ns, nt
        if cur:
            batches.append(cur)
        real = padded = 0
        for b in batches:
            s = [lens[i][0] for i in b]
            t = [lens[i][1] for i in b]
            real += sum(s) + sum(t)
            padded += len(b) * (max(s) + max(t))
        self.pad_ratio = 1.0 - real / max(padded, 1)
        self._batches = batches
        return batches

    def batch_indices(self, epoch: int, seed: int) -> list[list[int]]:
        if self._epoch_cache[0] != (epoch, seed):
            batches = list(self.make_batches(seed))
            random.Random(seed * 100_003 + epoch).shuffle(batches)
            self._epoch_cache = ((epoch, seed), batches)
        return self._epoch_cache[1]


def collate_pairs(samples) -> dict[str, torch.Tensor]:
    """input_ids = src </s>; decoder_input_ids = </s> tgt (fairseq's prev_output_tokens); labels = tgt </s>."""
    n = len(samples)
    S = max(len(s) for s, _ in samples) + 1
    T = max(len(t) for _, t in samples) + 1
    src = torch.full((n, S), PAD_ID, dtype=torch.long)
    dec = torch.full((n, T), PAD_ID, dtype=torch.long)
    lab = torch.full((n, T), PAD_ID, dtype=torch.long)
    for k, (s, t) in enumerate(samples):
        src[k, :len(s) + 1] = torch.tensor(list(s) + [EOS_ID])
        dec[k, :len(t) + 1] = torch.tensor([EOS_ID] + list(t))
        lab[k, :len(t) + 1] = torch.tensor(list(t) + [EOS_ID])
    return {"input_ids": src, "attention_mask": src.ne(PAD_ID), "decoder_input_ids": dec, "labels": lab}


# ------------------------------------------------------------------------------------------------ BLEU

_COMPOUND = re.compile(r"(\S)-(\S)")


def compound_split(line: str) -> str:
    """fairseq's compound_split_bleu.sh: perl -ple 's{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g'."""
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", line)


def bleu_scores(hyps: list[str], refs, tokenize: str = "13a", split_compounds: bool = False) -> dict:
    """{'bleu': sacreBLEU on detokenized text, 'bleu_tok': tokenized BLEU (13a-tokenized, tokenize='none')}.

    ``refs``: one reference per hypothesis (list of str) or several reference streams (list of lists of str).
    """
    import sacrebleu
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    streams = [refs] if refs and isinstance(refs[0], str) else list(refs)
    detok = sacrebleu.corpus_bleu(hyps, streams, tokenize=tokenize)
    tok = Tokenizer13a()
    th = [tok(h) for h in hyps]
    tr = [[tok(r) for r in stream] for stream in streams]
    if split_compounds:
        th = [compound_split(x) for x in th]
        tr = [[compound_split(x) for x in stream] for stream in tr]
    tokenized = sacrebleu.corpus_bleu(th, tr, tokenize="none", force=True)
    return {"bleu": float(detok.score), "bleu_tok": float(tokenized.score)}


# ------------------------------------------------------------------------------------------------ generation

def gen_kwargs(beam: int, lenpen: float, max_len_a: float, max_len_b: int, src_len: int) -> dict:
    if beam < 1:
        raise ConfigError(f"beam must be >= 1, got {beam}: pass --beam 5 (or --task.beam 5)")
    return dict(num_beams=beam, length_penalty=lenpen, early_stopping=True, do_sample=False,
                # fairseq: up to a * (longest source) + b tokens, then </s>; HF counts the start token too
                max_length=max(1, int(max_len_a * src_len + max_len_b)) + 2, min_length=0,
                decoder_start_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                forced_eos_token_id=None, num_return_sequences=1, no_repeat_ngram_size=0)


@torch.no_grad()
def generate_ids(model, input_ids, attention_mask, beam, lenpen, a, b, synced_gpus=False) -> list[list[int]]:
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, synced_gpus=synced_gpus,
                         **gen_kwargs(beam, lenpen, a, b, int(attention_mask.sum(1).max())))
    seqs = []
    for row in out.tolist():
        ids = [i for i in row[1:] if i not in (PAD_ID, BOS_ID)]      # drop the </s> start token and padding
        if EOS_ID in ids:
            ids = ids[:ids.index(EOS_ID)]
        seqs.append(ids)
    return seqs


def detok(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------------------------ the task

class Translation(Task):
    Config = Config
    metric = "bleu"
    metric_mode = "max"
    default_eval_split = "valid"

    @classmethod
    def default_overrides(cls):
        # Appendix A.1 / fairseq's IWSLT recipe: Adam (0.9, 0.98), eps 1e-9, lr 5e-4 inverse_sqrt, 4k warmup,
        # weight decay 1e-4 on every parameter, clip off, alpha 5 (fairseq's reduction = the engine's).
        # fairseq's "adam" decays weights decoupled (its docstring: "corresponds to the AdamW variant"): adamw here.
        return {"optim.name": "adamw", "optim.lr": 5e-4, "optim.beta1": 0.9, "optim.beta2": 0.98, "optim.eps": 1e-9,
                "optim.weight_decay": 1e-4, "optim.schedule": "inverse_sqrt", "optim.warmup_steps": 4000,
                "optim.warmup_init_lr": 1e-7, "optim.clip_grad": 0.0, "rdrop.alpha": 5.0,
                "train.micro_batch_size": 1, "eval.batch_size": 64}

    @classmethod
    def recipes(cls):
        iwslt = {"task.model": "transformer_iwslt_de_en", "task.vocab_size": 10000, "task.joint_vocab": True,
                 "task.share_all_embeddings": True, "task.max_tokens": 4096, "task.beam": 5, "task.lenpen": 1.0,
                 "task.compound_split": False, "optim.lr": 5e-4, "optim.warmup_steps": 4000,
                 "optim.weight_decay": 1e-4, "rdrop.alpha": 5.0, "train.max_steps": 300000}
        wmt = {"task.model": "transformer_vaswani_wmt_en_de_big", "task.vocab_size": 32000, "task.joint_vocab": True,
               "task.share_all_embeddings": True, "task.max_tokens": 4096, "task.beam": 4, "task.lenpen": 0.6,
               "task.compound_split": True, "task.source_lang": "en", "task.target_lang": "de",
               "optim.lr": 1e-3, "optim.warmup_steps": 6000, "optim.weight_decay": 0.0, "rdrop.alpha": 5.0,
               "train.grad_accum": 16, "train.max_steps": 300000}
        return {"iwslt14_de_en": iwslt, "wmt14_en_de_big": wmt}

    def __init__(self, run_cfg, world=None):
        super().__init__(run_cfg, world)
        self._splits: dict = {}
        self._raw: dict = {}
        self.src_tok = self.tgt_tok = None
        self.bpe_folder = self.bpe_key_ = None

    @property
    def is_main(self) -> bool:
        return self.world is None or self.world.is_main

    def _log(self, msg: str) -> None:
        if self.is_main:
            print(f"[translation] {msg}", flush=True)

    # -- data --------------------------------------------------------------------------------------------
    def split_name(self, split: str) -> str:
        c = self.cfg
        return {"train": c.train_split, "valid": c.valid_split, "test": c.test_split}.get(split, split)

    def raw(self, split: str) -> tuple[list[str], list[str]]:
        c = self.cfg
        name = self.split_name(split)
        if name not in self._raw:
            if c.data_dir:
                s, t = read_parallel(c.data_dir, name, c.source_lang, c.target_lang)
            else:
                s, t = read_hub(c.dataset, name, c.source_lang, c.target_lang)
            if split == "train" and c.max_train_examples:
                s, t = s[:c.max_train_examples], t[:c.max_train_examples]
            keep = [i for i in range(len(s)) if s[i].strip() and t[i].strip()]
            if len(keep) < len(s):
                self._log(f"{name}: dropped {len(s) - len(keep)} of {len(s)} pairs with an empty side")
            self._raw[name] = ([s[i].strip() for i in keep], [t[i].strip() for i in keep])
        return self._raw[name]

    def tokenizers(self):
        if self.src_tok is None:
            s, t = self.raw("train")
            if not s:
                raise ConfigError(f"the {self.split_name('train')} split is empty: point the task at data with pairs")
            root = self.cfg.cache_dir or os.path.join(self.run_cfg.output_dir, "bpe")
            self.src_tok, self.tgt_tok, self.bpe_folder, self.bpe_key_ = prepare_bpe(s, t, self.cfg, root,
                                                                                     self.is_main)
        return self.src_tok, self.tgt_tok

    def vocab_sizes(self) -> tuple[int, int]:
        s, t = self.tokenizers()
        return s.get_vocab_size(), t.get_vocab_size()

    def build_dataset(self, split: str) -> TranslationSplit:
        name = self.split_name(split)
        if name in self._splits:
            return self._splits[name]
        c = self.cfg
        src_tok, tgt_tok = self.tokenizers()
        s_text, t_text = self.raw(split)
        s_ids, t_ids = encode(src_tok, s_text), encode(tgt_tok, t_text)
        ms, mt = c.max_source_positions - 1, c.max_target_positions - 1       # room for </s>
        if split == "train":
            limit = c.max_tokens - 1
            keep = [i for i in range(len(s_ids)) if len(s_ids[i]) <= min(ms, limit) and len(t_ids[i]) <= min(mt, limit)]
            if len(keep) < len(s_ids):
                self._log(f"{name}: dropped {len(s_ids) - len(keep)} of {len(s_ids)} pairs longer than "
                          f"--task.max_source_positions/max_target_positions/max_tokens")
            pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
            ds = TranslationSplit(pick(s_ids), pick(t_ids), pick(s_text), pick(t_text), c.max_tokens)
            if len(ds) == 0:
                raise ConfigError(f"no training pairs left in {name} after filtering: raise --task.max_tokens or "
                                  "--task.max_*_positions")
            ds.make_batches(self.run_cfg.seed)
            self._log(f"{name}: {len(ds)} pairs, {len(ds._batches)} batches of <= {c.max_tokens} tokens, "
                      f"padding ratio {ds.pad_ratio:.3f}")
        else:
            cut = sum(len(x) > ms for x in s_ids) + sum(len(x) > mt for x in t_ids)
            if cut:
                self._log(f"{name}: truncated {cut} sentences to --task.max_source_positions/max_target_positions")
            ds = TranslationSplit([x[:ms] for x in s_ids], [x[:mt] for x in t_ids], s_text, t_text)
            self._log(f"{name}: {len(ds)} pairs")
        self._splits[name] = ds
        return ds

    # -- model -------------------------------------------------------------------------------------------
    def model_config(self):
        from models.transformer_mt import make_config
        c = self.cfg
        vs, vt = self.vocab_sizes()
        opt = lambda v: None if v == -1.0 else v  # noqa: E731
        return make_config(c.model, vs, vt, share_all_embeddings=c.share_all_embeddings,
                           share_decoder_input_output_embed=c.share_decoder_input_output_embed,
                           max_positions=max(c.max_source_positions, c.max_target_positions),
                           dropout=opt(c.dropout), attention_dropout=opt(c.attention_dropout),
                           activation_dropout=opt(c.activation_dropout), langs=(c.source_lang, c.target_lang))

    def _check_resume_vocab(self) -> None:
        """A resumed run must use the vocabulary its checkpoint was trained with (DIR/vocab.json records it)."""
        path = os.path.join(self.run_cfg.output_dir, "vocab.json")
        mine = {"bpe_key": self.bpe_key_, "src_vocab_size": self.vocab_sizes()[0],
                "tgt_vocab_size": self.vocab_sizes()[1], "joint_vocab": self.cfg.joint_vocab}
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            if saved != mine:
                raise ConfigError(f"vocabulary mismatch: the checkpoint in {self.run_cfg.output_dir} was trained with "
                                  f"{saved['src_vocab_size']}/{saved['tgt_vocab_size']} BPE symbols (key "
                                  f"{saved['bpe_key']}) but these data/settings give {mine['src_vocab_size']}/"
                                  f"{mine['tgt_vocab_size']} (key {mine['bpe_key']}): resume with the same "
                                  "--task.data_dir/vocab_size/joint_vocab/max_train_examples or use a new --output_dir")
        elif self.is_main:
            os.makedirs(self.run_cfg.output_dir, exist_ok=True)
            with open(path, "w") as f:
                json.dump(mine, f, indent=2)

    def build_model(self, ds_config: dict):
        from models.transformer_mt import build, fairseq_num_params, trainable_params
        self.tokenizers()
        self._check_resume_vocab()
        config = self.model_config()
        model = build(config, ds_config)
        vs, vt = self.vocab_sizes()
        n = fairseq_num_params(self.cfg.model, vs, vt, config.share_all_embeddings,
                               config.share_decoder_input_output_embed)
        self._log(f"model {self.cfg.model}: vocab {vs}/{vt}, {n:,} parameters (fairseq count; "
                  f"{trainable_params(model):,} in this process, ZeRO-3 shows a shard)")
        return model

    # -- batches and the loss ------------------------------------------------------------------------------
    def collate(self, samples, generator=None):
        return collate_pairs(samples)

    def forward(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=batch["decoder_input_ids"], use_cache=False)
        target = batch["labels"]
        return TaskOutput(logits=out.logits, target=target, pad_mask=target.eq(PAD_ID))

    def num_units(self, batch):
        return int(batch["labels"].ne(PAD_ID).sum())

    def batch_stats(self, batch):
        """Padding ratio of the training batches (source and target positions), logged as Train/pad_ratio."""
        pad = int(batch["input_ids"].eq(PAD_ID).sum()) + int(batch["labels"].eq(PAD_ID).sum())
        total = batch["input_ids"].numel() + batch["labels"].numel()
        return {"pad_ratio": (pad, total)}

    # -- evaluation --------------------------------------------------------------------------------------
    def evaluate(self, ctx, split: str) -> dict[str, float]:
        from engine import losses
        ds = ctx.dataset(split)
        local: dict[str, list] = {"loss": [], "nll": [], "tokens": []}
        with torch.no_grad():
            for batch in ctx.batches(split):
                out = self.forward(ctx.model, batch)
                logits, target, pad = out.logits, out.target, out.pad_mask
                for k in range(logits.shape[0]):         # per example sums, so gather() can drop shard padding
                    ls = losses.nll_loss(logits[k], target[k], pad[k], self.label_smoothing)
                    local["loss"].append(ls.view(1).cpu())
                    local["nll"].append(losses.nll_loss(logits[k], target[k], pad[k], 0.0).view(1).cpu())
                    local["tokens"].append((~pad[k]).sum().float().view(1).cpu())
        r = ctx.gather(local, len(ds))
        tokens = float(r["tokens"].sum())
        nll = float(r["nll"].sum()) / tokens
        metrics = {"loss": float(r["loss"].sum()) / tokens, "nll": nll, "ppl": math.exp(min(nll, 50.0))}
        train = ctx.dataset("train")
        metrics["train_pad_ratio"] = float(getattr(train, "pad_ratio", float("nan")))
        if self.cfg.eval_bleu:
            metrics.update(self.bleu(ctx, split))
        return metrics

    def bleu(self, ctx, split: str) -> dict[str, float]:
        """Beam search over ``split`` sharded over ranks; every rank runs the same number of generate calls."""
        c = self.cfg
        ds = ctx.dataset(split)
        n = min(len(ds), c.eval_bleu_max_examples) if c.eval_bleu_max_examples else len(ds)
        W, rank = ctx.world.world_size, ctx.world.rank
        padded = -(-n // W) * W
        mine = [i % n for i in range(rank, padded, W)]
        bs = self.run_cfg.eval.batch_size
        module = ctx.model.module if hasattr(ctx.model, "module") else ctx.model
        from engine.ds_config import zero_stage
        synced = W > 1 and zero_stage(getattr(ctx.trainer, "ds", {}) or {}) == 3
        _, tgt_tok = self.tokenizers()
        hyps: dict[int, str] = {}
        for start in range(0, len(mine), bs):
            idx = mine[start:start + bs]
            batch = collate_pairs([ds[i] for i in idx])
            ids = generate_ids(module, batch["input_ids"].to(ctx.device), batch["attention_mask"].to(ctx.device),
                               c.beam, c.lenpen, c.max_len_a, c.max_len_b, synced_gpus=synced)
            for i, seq in zip(idx, ids):
                hyps[i] = detok(tgt_tok, seq)
        if W > 1:
            parts = [None] * W
            torch.distributed.all_gather_object(parts, hyps)
            for p in parts:
                hyps.update(p)
        order = list(range(n))
        out = bleu_scores([hyps[i] for i in order], [ds.tgt_text[i] for i in order], c.bleu_tokenize,
                          c.compound_split)
        out["gen_examples"] = float(n)
        out["empty_hyps"] = float(sum(1 for i in order if not hyps[i]))
        return out

    # -- export ------------------------------------------------------------------------------------------
    def export(self, model, state_dict, out_dir):
        super().export(model, state_dict, out_dir)
        save_tokenizer_bundle(out_dir, self.src_tok, self.tgt_tok, self.cfg)


def save_tokenizer_bundle(out_dir: str, src_tok, tgt_tok, cfg: Config) -> None:
    os.makedirs(out_dir, exist_ok=True)
    files = tokenizer_files(cfg.joint_vocab, cfg.source_lang, cfg.target_lang)
    src_tok.save(os.path.join(out_dir, files["src"]))
    if not cfg.joint_vocab:
        tgt_tok.save(os.path.join(out_dir, files["tgt"]))
    with open(os.path.join(out_dir, "translation.json"), "w") as f:
        json.dump({"source_lang": cfg.source_lang, "target_lang": cfg.target_lang, "joint_vocab": cfg.joint_vocab,
                   "beam": cfg.beam, "lenpen": cfg.lenpen, "max_len_a": cfg.max_len_a, "max_len_b": cfg.max_len_b,
                   "bleu_tokenize": cfg.bleu_tokenize, "compound_split": cfg.compound_split}, f, indent=2)


TASK = Translation


# ------------------------------------------------------------------------------------------------ commands

def load_bundle(model_dir: str):
    """(model, src tokenizer, tgt tokenizer, settings) from an exported DIR/hf_model; errors are ConfigError."""
    from models.transformer_mt import TransformerMT, freeze_positions
    meta_path = os.path.join(model_dir, "translation.json")
    if not os.path.isfile(meta_path) or not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ConfigError(f"{model_dir} is not an exported translation model (no translation.json/config.json): "
                          "pass DIR/hf_model of a finished run or an `average` output")
    with open(meta_path) as f:
        meta = json.load(f)
    src_tok, tgt_tok = load_tokenizers(model_dir, meta["joint_vocab"], meta["source_lang"], meta["target_lang"])
    model = TransformerMT.from_pretrained(model_dir)
    freeze_positions(model)
    vs, vt = src_tok.get_vocab_size(), tgt_tok.get_vocab_size()
    if (model.config.src_vocab_size, model.config.tgt_vocab_size) != (vs, vt):
        raise ConfigError(f"vocabulary mismatch: the model in {model_dir} has {model.config.src_vocab_size}/"
                          f"{model.config.tgt_vocab_size} embeddings but its tokenizer has {vs}/{vt} symbols: use the "
                          "tokenizer exported with the checkpoint")
    model.eval()
    return model, src_tok, tgt_tok, meta


def translate_lines(model, src_tok, tgt_tok, lines, beam, lenpen, a, b, batch_size=64,
                    max_source_positions: int = 1024) -> list[str]:
    ids = [x[:max_source_positions - 1] for x in encode(src_tok, [l.strip() for l in lines])]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))       # length-sorted batches, output in input order
    out = [""] * len(ids)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate_pairs([(ids[i], []) for i in idx])
        for i, seq in zip(idx, generate_ids(model, batch["input_ids"], batch["attention_mask"], beam, lenpen, a, b)):
            out[i] = detok(tgt_tok, seq) if lines[i].strip() else ""
    return out


def _translate_cmd(args) -> int:
    if args.beam < 1:
        raise ConfigError(f"--beam must be >= 1, got {args.beam}: pass --beam 5")
    if not os.path.isfile(args.input):
        raise ConfigError(f"--input {args.input} does not exist: pass a text file, one source sentence a line")
    model, src_tok, tgt_tok, meta = load_bundle(args.model)
    lenpen = meta["lenpen"] if args.lenpen is None else args.lenpen
    lines = read_lines(args.input)
    hyps = translate_lines(model, src_tok, tgt_tok, lines, args.beam, lenpen, args.max_len_a, args.max_len_b,
                           args.batch_size)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.writelines(h + "\n" for h in hyps)
    else:
        sys.stdout.writelines(h + "\n" for h in hyps)
    if args.reference:
        refs = read_lines(args.reference)
        if len(refs) != len(hyps):
            raise ConfigError(f"misaligned files: {args.input} has {len(hyps)} lines but {args.reference} has "
                              f"{len(refs)}: give line-aligned files")
        scores = bleu_scores(hyps, refs, meta.get("bleu_tokenize", "13a"), meta.get("compound_split", False))
        print(json.dumps({"bleu": round(scores["bleu"], 2), "bleu_tok": round(scores["bleu_tok"], 2),
                          "sentences": len(hyps), "beam": args.beam, "lenpen": lenpen}), file=sys.stderr, flush=True)
    return 0


def checkpoint_tags(root: str, last: int = 0, best: int = 0) -> list[str]:
    """The newest ``last`` global_stepN tags, or the ``best`` ones by the eval metric in ROOT/../metrics.jsonl."""
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
                if r.get("kind") == "eval" and "bleu" in r and r["step"] in steps:
                    scores[r["step"]] = r["bleu"]
    if not scores:
        raise ConfigError(f"no eval BLEU for the checkpoints in {root} in {metrics_path}: use --last N, or evaluate "
                          "when saving (--eval.every_steps = --checkpoint.every_steps)")
    ranked = sorted(scores, key=lambda s: -scores[s])[:best]
    return [f"global_step{s}" for s in sorted(ranked)]


def average_state_dicts(state_dicts: list[dict]) -> dict:
    """fairseq scripts/average_checkpoints.py: the element-wise mean of fp32 weights (accumulated in float64)."""
    keys = list(state_dicts[0])
    for sd in state_dicts[1:]:
        if list(sd) != keys:
            raise ConfigError("checkpoints to average have different parameters: average checkpoints of one run")
    return {k: (sum(sd[k].double() for sd in state_dicts) / len(state_dicts)).float() for k in keys}


def _average_cmd(args) -> int:
    if bool(args.last) == bool(args.best) or min(args.last, args.best) < 0:
        raise ConfigError("pass exactly one of --last N or --best N (N >= 1)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from models.transformer_mt import TransformerMT
    root = args.checkpoints
    tags = checkpoint_tags(root, args.last, args.best)
    template = args.model or os.path.join(os.path.dirname(os.path.abspath(root)), "hf_model")
    if not os.path.isfile(os.path.join(template, "translation.json")):
        raise ConfigError(f"no exported model at {template} to take the config and tokenizer from: pass --model DIR")
    sds = [get_fp32_state_dict_from_zero_checkpoint(root, tag=t) for t in tags]
    avg = average_state_dicts(sds)
    model = TransformerMT.from_pretrained(template)
    missing, unexpected = model.load_state_dict(avg, strict=False)
    bad = [k for k in missing if "embed_positions" not in k and "output_projection" not in k
           and not k.startswith("model.decoder.embed_tokens") and not k.startswith("model.encoder.embed_tokens")]
    if unexpected or bad:
        raise ConfigError(f"checkpoint parameters do not match the model in {template} (missing {bad[:3]}, "
                          f"unexpected {unexpected[:3]}): pass the --model exported by the same run")
    model.tie_weights()
    os.makedirs(args.output, exist_ok=True)
    model.save_pretrained(args.output)
    import shutil
    for name in os.listdir(template):
        if name.startswith("tokenizer") or name == "translation.json":
            shutil.copy(os.path.join(template, name), os.path.join(args.output, name))
    with open(os.path.join(args.output, "averaged.json"), "w") as f:
        json.dump({"checkpoints": root, "tags": tags}, f, indent=2)
    print(f"averaged {len(tags)} checkpoints ({', '.join(tags)}) -> {args.output}", flush=True)
    return 0


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m tasks.translation")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("translate", help="translate a file with an exported model (DIR/hf_model)")
    t.add_argument("--model", required=True)
    t.add_argument("--input", required=True)
    t.add_argument("--output", default="")
    t.add_argument("--reference", default="", help="reference file: print BLEU to stderr")
    t.add_argument("--beam", type=int, default=5)
    t.add_argument("--lenpen", type=float, default=None, help="default: the model's training setting")
    t.add_argument("--max_len_a", type=float, default=1.2)
    t.add_argument("--max_len_b", type=int, default=10)
    t.add_argument("--batch_size", type=int, default=64)
    a = sub.add_parser("average", help="average the fp32 weights of DeepSpeed checkpoints (fairseq-style)")
    a.add_argument("--checkpoints", required=True, help="DIR/checkpoints")
    a.add_argument("--last", type=int, default=0)
    a.add_argument("--best", type=int, default=0)
    a.add_argument("--model", default="", help="exported model for config + tokenizer (default DIR/hf_model)")
    a.add_argument("--output", required=True)
    args = p.parse_args(argv)
    try:
        return _translate_cmd(args) if args.cmd == "translate" else _average_cmd(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
