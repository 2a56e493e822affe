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

Batches: by tokens (the engine's --train.max_tokens, default 4096 here) like fairseq: examples sorted by (source,
target) length with a random tie-break, grouped so that sentences x longest (</s> included) <= max_tokens, the
batch order shuffled every epoch (engine/data.py).

Loss: label-smoothed NLL (0.1) over non-pad target tokens; num_units = non-pad target tokens of one copy; the
consistency is the engine's per-token symmetric KL with pads masked -- fairseq's R-Drop criterion (alpha 5).
Target vocabularies of >= 8192 symbols (the WMT recipe's 32k) use the fused chunked loss by default
(``--task.fused_loss auto|true|false``, tasks/_seq2seq.py): the same values, no [tokens, V] logits.

Evaluation (valid split): loss / nll / ppl per target token from one ordinary pass, then beam search with HF
``generate`` (--task.beam, --task.lenpen, max length a * source length + b; a seeded subset of
--task.eval_gen_examples during training, the whole split at the end of all but a smoke run: tasks/_seq2seq.py) and
  bleu      sacreBLEU on detokenized text (--task.bleu_tokenize, default 13a: Multi30k is raw text),
  bleu_tok  tokenized BLEU, the number fairseq reports: hypothesis and reference tokenized with Moses'
            tokenizer.perl (sacremoses, the target language, default escaping), optionally compound-split
            (--task.compound_split, fairseq's compound_split_bleu.sh rule ``(\\S)-(\\S)`` ->
            ``\\1 ##AT##-##AT## \\2``, the WMT14 En-De convention), scored like multi-bleu.perl (tested equal).

Commands (no DeepSpeed needed):
  python -m tasks.translation translate --model DIR/hf_model --input FILE [--output FILE] [--reference FILE]
                                       [--beam N --lenpen X --max_len_a A --max_len_b B]
  python -m tasks.translation average --checkpoints DIR/checkpoints (--last N | --best N) --output DIR/avg
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

from engine.config import ConfigError
from tasks import _seq2seq, _text
from tasks._seq2seq import Layout, Seq2SeqConfig, Seq2SeqTask

BOS, PAD, EOS, UNK = "<s>", "<pad>", "</s>", "<unk>"
SPECIALS = [BOS, PAD, EOS, UNK]          # fairseq's dictionary order: ids 0, 1, 2, 3
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
LAYOUT = Layout(pad=PAD_ID, eos=EOS_ID, bos=BOS_ID, decoder_start=EOS_ID)   # src </s>; </s> tgt -> tgt </s>
HUB_CONFIGS = {"iwslt2017": "iwslt2017-{src}-{tgt}", "wmt14": "{a}-{b}"}


@dataclass
class Config(Seq2SeqConfig):
    model: str = "transformer_iwslt_de_en"   # models.transformer_mt.PRESETS: tiny | mini | small |
    #                                          transformer_iwslt_de_en | transformer_vaswani_wmt_en_de_big
    source_lang: str = "de"
    target_lang: str = "en"
    valid_split: str = "val"
    test_split: str = "test_2016_flickr"
    joint_vocab: bool = True            # one BPE dictionary over both languages
    share_all_embeddings: bool = True   # encoder input = decoder input = output embedding (needs joint_vocab)
    share_decoder_input_output_embed: bool = True
    bleu_tokenize: str = "13a"          # sacreBLEU tokenizer for the detokenized score
    compound_split: bool = False        # ##AT## compound splitting for bleu_tok (WMT14 En-De)

    def validate(self) -> None:
        from models.transformer_mt import PRESETS
        if self.model not in PRESETS:
            raise ConfigError(f"--task.model {self.model!r} is not a preset: choose one of {', '.join(PRESETS)}")
        if self.data_dir and not os.path.isdir(self.data_dir):
            raise ConfigError(f"--task.data_dir {self.data_dir} does not exist: pass the folder holding "
                              f"{{split}}.{self.source_lang}[.gz] and {{split}}.{self.target_lang}[.gz]")
        super().validate()
        if self.source_lang == self.target_lang:
            raise ConfigError("--task.source_lang and --task.target_lang are the same: pass two languages")
        if self.share_all_embeddings and not self.joint_vocab:
            raise ConfigError("--task.share_all_embeddings needs one joint dictionary: set --task.joint_vocab true "
                              "or --task.share_all_embeddings false")


# ------------------------------------------------------------------------------------------------ raw text

def read_parallel(data_dir: str, split: str, src: str, tgt: str) -> tuple[list[str], list[str]]:
    paths = []
    for lang in (src, tgt):
        p = _text.find_file(data_dir, [f"{split}.{lang}"], ["", ".gz"])
        if p is None:
            raise ConfigError(f"missing {os.path.join(data_dir, f'{split}.{lang}')}[.gz]: check --task.data_dir and "
                              "the split names (--task.train_split/valid_split/test_split) and languages")
        paths.append(p)
    s, t = _text.read_lines(paths[0]), _text.read_lines(paths[1])
    if len(s) != len(t):
        raise ConfigError(f"misaligned parallel files: {paths[0]} has {len(s)} lines but {paths[1]} has {len(t)}: "
                          "give line-aligned files")
    return s, t


def read_hub(name: str, config: str, split: str, src: str, tgt: str) -> tuple[list[str], list[str]]:
    a, b = sorted((src, tgt))
    config = config or HUB_CONFIGS.get(name, "{src}-{tgt}").format(src=src, tgt=tgt, a=a, b=b)
    hub_split = {"val": "validation", "valid": "validation"}.get(split, split)
    pairs = _text.load_hub(name, config, hub_split)["translation"]
    return [p[src] for p in pairs], [p[tgt] for p in pairs]


def train_bpe(texts: list[str], vocab_size: int):
    """fairseq-style BPE dictionary: <s> <pad> </s> <unk> first, raw text restored by decoding."""
    return _text.train_bpe(texts, vocab_size, SPECIALS, kind="metaspace", unk=UNK)


# ------------------------------------------------------------------------------------------------ BLEU

_COMPOUND = re.compile(r"(\S)-(\S)")


def compound_split(line: str) -> str:
    """fairseq's compound_split_bleu.sh: perl -ple 's{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g'."""
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", line)


def moses_tokenize(lines: list[str], lang: str) -> list[str]:
    """Moses' tokenizer.perl -l LANG (default escaping), through sacremoses."""
    from sacremoses import MosesTokenizer
    tok = MosesTokenizer(lang=lang)
    return [tok.tokenize(line, return_str=True) for line in lines]


def bleu_scores(hyps: list[str], refs, tokenize: str = "13a", split_compounds: bool = False,
                lang: str = "en") -> dict:
    """{'bleu': sacreBLEU on detokenized text, 'bleu_tok': multi-bleu.perl on Moses-tokenized text}.

    ``refs``: one reference per hypothesis (list of str) or several reference streams (list of lists of str).
    multi-bleu.perl is corpus BLEU without smoothing on whitespace tokens: sacreBLEU with tokenize='none'.
    """
    import sacrebleu
    streams = [refs] if refs and isinstance(refs[0], str) else list(refs)
    detok = sacrebleu.corpus_bleu(hyps, streams, tokenize=tokenize)
    th = moses_tokenize(hyps, lang)
    tr = [moses_tokenize(stream, lang) for stream in streams]
    if split_compounds:
        th = [compound_split(x) for x in th]
        tr = [[compound_split(x) for x in stream] for stream in tr]
    tokenized = sacrebleu.corpus_bleu(th, tr, tokenize="none", force=True, smooth_method="none")
    return {"bleu": float(detok.score), "bleu_tok": float(tokenized.score)}


# ------------------------------------------------------------------------------------------------ the task

class Translation(Seq2SeqTask):
    Config = Config
    metric = "bleu"
    name = "translation"
    pipeline_tag = "translation"
    tool_name = "translate"
    example_input = "Ein Mann fährt mit dem Fahrrad."

    @classmethod
    def default_overrides(cls):
        # Appendix A.1 / fairseq's IWSLT recipe: Adam (0.9, 0.98), eps 1e-9, lr 5e-4 inverse_sqrt, 4k warmup,
        # weight decay 1e-4 on every parameter, clip off, alpha 5 (fairseq's reduction = the engine's), 4096
        # tokens per batch.  fairseq's "adam" decays weights decoupled ("corresponds to the AdamW variant").
        return {"optim.name": "adamw", "optim.lr": 5e-4, "optim.beta1": 0.9, "optim.beta2": 0.98, "optim.eps": 1e-9,
                "optim.weight_decay": 1e-4, "optim.schedule": "inverse_sqrt", "optim.warmup_steps": 4000,
                "optim.warmup_init_lr": 1e-7, "optim.clip_grad": 0.0, "rdrop.alpha": 5.0,
                "train.max_tokens": 4096, "eval.batch_size": 64}

    @classmethod
    def recipes(cls):
        iwslt = {"task.model": "transformer_iwslt_de_en", "task.vocab_size": 10000, "task.joint_vocab": True,
                 "task.share_all_embeddings": True, "train.max_tokens": 4096, "task.beam": 5, "task.lenpen": 1.0,
                 "task.compound_split": False, "optim.lr": 5e-4, "optim.warmup_steps": 4000,
                 "optim.weight_decay": 1e-4, "rdrop.alpha": 5.0, "train.max_steps": 300000}
        wmt = {"task.model": "transformer_vaswani_wmt_en_de_big", "task.vocab_size": 32000, "task.joint_vocab": True,
               "task.share_all_embeddings": True, "train.max_tokens": 4096, "task.beam": 4, "task.lenpen": 0.6,
               "task.compound_split": True, "task.source_lang": "en", "task.target_lang": "de",
               "optim.lr": 1e-3, "optim.warmup_steps": 6000, "optim.weight_decay": 0.0, "rdrop.alpha": 5.0,
               "train.grad_accum": 16, "train.max_steps": 300000}
        return {"iwslt14_de_en": iwslt, "wmt14_en_de_big": wmt}

    # -- data and tokenizers ----------------------------------------------------------------------------------
    def read_split(self, split_name):
        c = self.cfg
        if c.data_dir:
            return read_parallel(c.data_dir, split_name, c.source_lang, c.target_lang)
        return read_hub(c.dataset, c.dataset_config, split_name, c.source_lang, c.target_lang)

    def tokenizer_recipe(self):
        c = self.cfg
        return {"vocab_size": c.vocab_size, "joint": c.joint_vocab, "langs": [c.source_lang, c.target_lang]}

    def tokenizer_files(self):
        c = self.cfg
        return ["tokenizer.json"] if c.joint_vocab else [f"tokenizer.{c.source_lang}.json",
                                                         f"tokenizer.{c.target_lang}.json"]

    def train_tokenizers(self, src_texts, tgt_texts):
        files, size = self.tokenizer_files(), self.cfg.vocab_size
        if self.cfg.joint_vocab:
            return {files[0]: train_bpe(list(src_texts) + list(tgt_texts), size)}
        return {files[0]: train_bpe(src_texts, size), files[1]: train_bpe(tgt_texts, size)}

    def load_tokenizers(self, folder):
        files = [os.path.join(folder, f) for f in self.tokenizer_files()]
        s = _text.load_tokenizer(files[0])
        return s, (_text.load_tokenizer(files[1]) if len(files) > 1 else s)

    @property
    def layout(self):
        return LAYOUT

    # -- model -----------------------------------------------------------------------------------------------
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

    def build_model(self, ds_config: dict):
        from models.transformer_mt import build, fairseq_num_params, trainable_params
        self.check_resume_vocab()
        config = self.model_config()
        model = build(config, ds_config)
        vs, vt = self.vocab_sizes()
        n = fairseq_num_params(self.cfg.model, vs, vt, config.share_all_embeddings,
                               config.share_decoder_input_output_embed)
        self._log(f"model {self.cfg.model}: vocab {vs}/{vt}, {n:,} parameters (fairseq count; "
                  f"{trainable_params(model):,} in this process, ZeRO-3 shows a shard)")
        self.setup_fused_loss(model, vt)
        return model

    def fused_head(self, model):
        # FSMT's get_output_embeddings() is the decoder's input embedding: the projection is its own module
        return {"head": model.output_projection()}

    @classmethod
    def load_exported(cls, model_dir):
        from models.transformer_mt import TransformerMT, freeze_positions
        model = TransformerMT.from_pretrained(model_dir)
        freeze_positions(model)
        return model

    @staticmethod
    def may_be_missing(key: str) -> bool:
        """State-dict keys a checkpoint may lack: the frozen sinusoidal tables and tied embedding copies."""
        return "embed_positions" in key or "output_projection" in key or ".embed_tokens." in key

    # -- score -----------------------------------------------------------------------------------------------
    def score(self, hyps, refs):
        c = self.cfg
        return bleu_scores(hyps, refs, c.bleu_tokenize, c.compound_split, c.target_lang)

    def export_settings(self):
        c = self.cfg
        return {**super().export_settings(), "source_lang": c.source_lang, "target_lang": c.target_lang,
                "joint_vocab": c.joint_vocab, "bleu_tokenize": c.bleu_tokenize, "compound_split": c.compound_split}

    @staticmethod
    def score_exported(settings: dict, hyps, refs):
        return bleu_scores(hyps, refs, settings.get("bleu_tokenize", "13a"), settings.get("compound_split", False),
                           settings.get("target_lang", "en"))


TASK = Translation


def load_bundle(model_dir: str) -> _seq2seq.Bundle:
    """An exported translation model (DIR/hf_model or an `average` output) with its tokenizers and settings."""
    return _seq2seq.load_bundle(Translation, model_dir)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(_seq2seq.main(Translation, generate_name="translate"))
