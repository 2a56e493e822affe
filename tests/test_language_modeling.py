"""Language modelling: fairseq's dictionary and block cutting, context-window evaluation, perplexity against a hand
computation, fairseq parameter counts, the adaptive softmax (normalised, fairseq's formulation, chunked R-Drop
terms equal to the unchunked ones), bad data, and real 2-rank `deepspeed` R-Drop runs on WikiText-2: ZeRO-3 from a
saved initialisation, stopped and resumed (identical to the uninterrupted run), the same run under ZeRO-2 (same
losses: ZeRO-3 gathers and reduces the adaptive softmax's tied weights correctly), and the export reloaded."""
from __future__ import annotations

import json
import math
import os
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import data, fused_loss, losses, rdrop
from engine import ds_config as dsc
from engine.config import ConfigError, parse_args
from engine.task import TaskOutput
from models import transformer_lm as lm
from tasks import language_modeling as L
from tests.helpers import DATA, metrics, run, train_in_process, world  # noqa: F401 (world: a fixture)

WIKI2 = DATA / "wikitext-2"


def make_task(tmp_path, *flags, files=None):
    """A task on tiny text files (``files``: {split: text}) or on the given flags."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    args = ["--task", "language_modeling", "--output_dir", str(tmp_path / "run"), "--ds_config",
            "ds_configs/zero2.json", "--task.cache_dir", str(tmp_path / "cache")]
    for split, text in (files or {}).items():
        path = tmp_path / f"{split}.txt"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        args += [f"--task.{split}_file", str(path)]
    cfg = parse_args([*args, *flags])
    return cfg.task_class(cfg)


class FakeEval:
    """What Task.evaluate uses of engine.trainer.EvalContext, for one process."""

    def __init__(self, task, model, batch_size=3, final=False):
        self.task, self.model, self.bs, self.final = task, model, batch_size, final
        self.world = types.SimpleNamespace(world_size=1, rank=0, is_main=True)

    def dataset(self, split):
        return self.task.build_dataset(split)

    def batches(self, split):
        ds = self.dataset(split)
        specs, _ = data.eval_specs(len(ds), self.bs, 1, 0)
        for spec in specs:
            yield self.task.collate([ds[i] for i in spec.indices])

    def gather(self, local, n):
        return {k: torch.cat(v)[:n] for k, v in local.items()}


TEXT = "b a c a\n \n<unk> c a d\nd b\n"


# ------------------------------------------------------------------------------------------------ data

def test_fairseq_dictionary_stream_and_blocks(tmp_path):
    task = make_task(tmp_path, "--task.tokens_per_sample", "4", files={"train": TEXT, "valid": "a b\n"})
    task.prepare()
    v = task.vocab
    # specials, then count descending with ties alphabetical: a 3, </s> counted as special, b 2 c 2 d 2;
    # the text's literal <unk> is the <unk> entry; padded with madeupwords to a multiple of 8
    assert v.symbols == ["<s>", "<pad>", "</s>", "<unk>", "a", "b", "c", "d"]
    built = L.WordVocab.build(TEXT.splitlines())
    assert built.symbols == v.symbols and built.counts == [0, 0, 4, 1, 3, 2, 2, 2]
    assert len(L.WordVocab.build(["x y z w v"])) == 16 and L.WordVocab.build(["x"]).symbols[-1] == "madeupword0002"
    stream = task.stream("train").tolist()
    #               b  a  c  a  </s> </s> <unk> c a d </s> d  b  </s>
    assert stream == [5, 4, 6, 4, 2, 2, 3, 6, 4, 7, 2, 7, 5, 2]
    assert task.vocab.string(stream[:5]) == "b a c a </s>"
    reloaded = L.WordVocab.load(str(Path(task.folder) / "dict.txt"))
    assert reloaded.symbols == v.symbols and reloaded.counts[4:] == v.counts[4:]
    blocks = task.build_dataset("train")
    assert len(blocks) == 4 and blocks.sizes.tolist() == [4, 4, 4, 2]     # 14 tokens, the last block short
    src, tgt = blocks[0]
    assert src.tolist() == [2, 5, 4, 6] and tgt.tolist() == stream[0:4]     # fairseq: </s> before the first token
    src, tgt = blocks[1]
    assert src.tolist() == stream[3:7] and tgt.tolist() == stream[4:8]
    src, tgt = blocks[3]
    assert src.tolist() == stream[11:13] and tgt.tolist() == stream[12:14]
    assert np.array_equal(task.example_sizes(blocks), blocks.sizes)
    batch = task.collate([blocks[3], blocks[0]])
    assert batch["input_ids"].tolist() == [[7, 5, 1, 1], [2, 5, 4, 6]]       # right-padded with <pad>
    assert batch["labels"].tolist() == [[5, 2, L.IGNORE, L.IGNORE], stream[0:4]]
    assert task.num_units(batch) == 6


def fairseq_context_windows(stream, eos, new, context):
    """fairseq's TokenBlockDataset (blocks of ``new``, include_targets) + LMContextWindowDataset.collater, one
    sample per batch, written out from their sources: (input, target with None on unscored positions)."""
    out, prev = [], []
    for s in range(0, len(stream), new):
        e = min(s + new, len(stream))
        source = ([eos] + stream[0:e - 1]) if s == 0 else stream[s - 1:e - 1]
        target = stream[s:e]
        extra = len(prev) + len(source) - (new + context)
        if extra > 0:
            prev = prev[extra:]
        toks = prev + source
        out.append((toks, [None] * len(prev) + target))
        prev = toks[-context:] if context else []
    return out


@pytest.mark.parametrize("window,context", [(4, 0), (4, 3), (5, 2), (6, 5)])
def test_context_window_matches_fairseq(tmp_path, window, context):
    task = make_task(tmp_path, "--task.eval_tokens_per_sample", str(window), "--task.context_window", str(context),
                     files={"train": TEXT, "valid": TEXT})
    stream = task.stream("valid").tolist()
    ds = task.build_dataset("valid")
    want = fairseq_context_windows(stream, L.EOS, window - context, context)
    assert len(ds) == len(want)
    scored = []
    for i, (src, tgt) in enumerate(want):
        got_src, got_tgt = ds[i]
        assert got_src.tolist() == src
        assert [None if t == L.IGNORE else t for t in got_tgt.tolist()] == tgt
        scored += [t for t in tgt if t is not None]
    assert scored == stream                                     # every token scored once, in order


# ------------------------------------------------------------------------------------------------ perplexity

class Bigram(torch.nn.Module):
    """A model whose next-token distribution depends on the previous token only: log P(next | prev)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, use_cache=False):
        return types.SimpleNamespace(logits=self.table[input_ids])


@pytest.mark.parametrize("context", [0, 2, 4])
def test_perplexity_against_a_hand_computation(tmp_path, context):
    valid = "a b a c\nb b d\n\nc a\n"
    task = make_task(tmp_path, "--task.model", "tiny", "--task.eval_tokens_per_sample", "5",
                     "--task.context_window", str(context), files={"train": TEXT, "valid": valid})
    task.prepare()
    V = len(task.vocab)
    stream = task.stream("valid").tolist()
    prev = [L.EOS] + stream[:-1]
    counts = Counter(zip(prev, stream))
    # add-one bigram probabilities from the valid text itself, written as normalised log-probabilities
    table = torch.tensor([[math.log((counts[(p, w)] + 1) / (sum(counts[(p, x)] for x in range(V)) + V))
                           for w in range(V)] for p in range(V)])
    by_hand = -sum(table[p, w].item() for p, w in zip(prev, stream)) / len(stream)
    m = task.evaluate(FakeEval(task, Bigram(table)), "valid")
    assert m["tokens"] == len(stream) == 13
    assert m["loss"] == pytest.approx(by_hand, rel=1e-6)
    assert m["ppl"] == pytest.approx(math.exp(by_hand), rel=1e-6)
    assert "word_ppl" not in m                                   # word-level vocabulary: tokens are words


def test_final_evaluation_adds_test_and_subword_word_ppl(tmp_path):
    task = make_task(tmp_path, "--task.model", "tiny", "--task.tokenizer", "bpe", "--task.vocab_size", "270",
                     files={"train": TEXT * 30, "valid": "a b a c\nb d\n", "test": "c a d\n"})
    task.prepare()
    assert task.meta["tokenizer"] == "bpe" and task.vocab.eos == L.EOS
    torch.manual_seed(0)
    model = task.build_model({}).eval()
    m = task.evaluate(FakeEval(task, model, final=True), "valid")
    assert {"loss", "ppl", "word_ppl", "test_loss", "test_ppl", "test_word_ppl"} <= set(m)
    words = L.word_count(["a b a c", "b d"])                      # words + one end-of-line per line
    assert m["word_ppl"] == pytest.approx(math.exp(m["loss"] * m["tokens"] / words), rel=1e-6)


def test_pretrained_gpt2_directory_with_its_tokenizer(tmp_path):
    """--task.pretrained DIR (an HF GPT-2 directory with its tokenizer): weights and tokenizer both come from DIR."""
    from transformers import PreTrainedTokenizerFast
    tok = L.train_bpe((TEXT * 20).splitlines(), 270)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", bos_token="<s>",
                                     unk_token="<unk>")
    torch.manual_seed(0)
    src = lm.GPT2LMHeadModel(lm.gpt_config("tiny", len(hf_tok), 16))
    src.save_pretrained(tmp_path / "gpt")
    hf_tok.save_pretrained(tmp_path / "gpt")
    task = make_task(tmp_path, "--task.pretrained", str(tmp_path / "gpt"), "--task.tokens_per_sample", "8",
                     "--task.dropout", "0.2", files={"train": TEXT, "valid": TEXT})
    task.prepare()
    assert task.meta["tokenizer"] == str(tmp_path / "gpt") and task.meta["eos"] == hf_tok.eos_token_id
    first = hf_tok.encode("b a c a", add_special_tokens=False) + [hf_tok.eos_token_id]    # a line, then </s>
    assert task.stream("train").tolist()[:len(first)] == first
    model = task.build_model({})
    assert model.config.resid_pdrop == 0.2
    want = dict(src.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in model.named_parameters())


# ------------------------------------------------------------------------------------------------ models

WIKI103_VOCAB = 267744          # fairseq-preprocess on WikiText-103: 267,735 words + 3 specials, padded to x8


def test_parameter_counts_match_fairseq():
    c = lm.gpt_config("transformer_lm_gpt", WIKI103_VOCAB, 512)
    with torch.device("meta"):
        gpt = lm.GPT2LMHeadModel(c)
    # 12 x (4 (d^2 + d) + 2 LN + FFN 768x3072) + tied embedding 267,744 x 768 + 514 learned positions + final LN
    assert lm.trainable_params(gpt) == lm.fairseq_num_params_gpt("transformer_lm_gpt", WIKI103_VOCAB, 512) \
        == 291_078_144
    assert c.n_positions == 514 and gpt.lm_head.weight is gpt.transformer.wte.weight
    assert (c.n_layer, c.n_embd, c.n_inner, c.n_head, c.activation_function) == (12, 768, 3072, 12, "gelu")
    a = lm.adaptive_config("transformer_lm_wiki103", WIKI103_VOCAB, 3072)
    with torch.device("meta"):
        ada = lm.AdaptiveLM(a)
    # fairseq's README: 247M parameters for the WikiText-103 adaptive-input model
    assert lm.trainable_params(ada) == lm.fairseq_num_params_adaptive(a) == 246_933_504
    dec = ada.decoder
    assert dec.layer_norm is None and len(dec.layers) == 16 and dec.embed_scale == 32.0
    assert [band[0].weight.shape for band in dec.embed_tokens.embeddings] == \
        [(20000, 1024), (40000, 256), (207744, 64)]
    assert not [n for n, _ in ada.named_parameters() if "adaptive_softmax" in n and "class_proj" not in n]
    for preset in ("tiny", "mini", "small"):
        with torch.device("meta"):
            m = lm.GPT2LMHeadModel(lm.gpt_config(preset, 33280, 128))
        assert lm.trainable_params(m) == lm.fairseq_num_params_gpt(preset, 33280, 128), preset
    for preset in ("adaptive_tiny", "adaptive_small"):
        cfg = lm.adaptive_config(preset, 33280, 128)
        with torch.device("meta"):
            m = lm.AdaptiveLM(cfg)
        assert lm.trainable_params(m) == lm.fairseq_num_params_adaptive(cfg), preset


def tiny_adaptive(vocab=300, cutoffs=(20, 90), seed=0, **kw):
    torch.manual_seed(seed)
    return lm.AdaptiveLM(lm.adaptive_config("adaptive_tiny", vocab, 64, cutoffs=list(cutoffs), **kw))


def test_adaptive_input_and_softmax_are_fairseqs():
    model = tiny_adaptive().eval()
    emb = model.decoder.embed_tokens
    (e0, p0), (e1, p1), (e2, p2) = (emb.band_weights(i) for i in range(3))
    assert (e0.shape, e1.shape, e2.shape) == ((20, 32), (70, 8), (210, 2))      # d // 4**i per band
    assert e0[lm.FAIRSEQ_PAD].abs().sum() == 0                                   # pad row zero (band 0 only)
    ids = torch.tensor([[5, 25, 100, 299]])
    want = torch.stack([e0[5] @ p0.T, e1[5] @ p1.T, e2[10] @ p2.T, e2[209] @ p2.T])
    torch.testing.assert_close(emb(ids)[0], want)
    # fairseq's sinusoidal table: sin half then cos half, log(10000) / (d/2 - 1), the pad row zero
    pos = lm.sinusoidal(torch.tensor([[2, 3, lm.FAIRSEQ_PAD]]), 8, lm.FAIRSEQ_PAD)[0]
    freq = torch.exp(torch.arange(4.0) * -(math.log(10000) / 3))
    torch.testing.assert_close(pos[1], torch.cat([(3 * freq).sin(), (3 * freq).cos()]))
    assert pos[2].abs().sum() == 0
    sm = model.adaptive_softmax
    h = torch.randn(2, 7, 32)
    lp = sm(h)
    assert lp.shape == (2, 7, 300)
    torch.testing.assert_close(lp.logsumexp(-1), torch.zeros(2, 7), atol=1e-5, rtol=0)   # sums to 1
    # fairseq's formulation by hand: head = [band-0 words; one logit per tail]; tail 2 = project with band 2's
    # projection transposed, score with band 2's embedding; log p(w) = log p_head(tail) + log p_tail(w)
    x = h[1, 3]
    head = torch.log_softmax(torch.cat([e0 @ x, sm.class_proj @ x]), -1)
    tail2 = torch.log_softmax(e2 @ (p2.T @ x), -1)
    assert lp[1, 3, 7].item() == pytest.approx(head[7].item(), abs=1e-5)
    assert lp[1, 3, 250].item() == pytest.approx((head[21] + tail2[250 - 90]).item(), abs=1e-5)
    # the adaptive loss (target only) equals the full distribution's NLL; ignored positions give 0
    target = torch.randint(0, 300, (2, 7))
    target[0, 2] = L.IGNORE
    nll = sm(h, target=target)
    full = -lp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(nll, full.masked_fill(target < 0, 0.0), atol=1e-5, rtol=1e-5)


def _adaptive_task(tmp_path, *flags):
    task = make_task(tmp_path, "--task.model", "adaptive_tiny", "--task.adaptive_cutoffs", "2,5",
                     "--task.tokens_per_sample", "4", *flags,
                     files={"train": TEXT, "valid": TEXT})
    task.prepare()
    return task


@pytest.mark.parametrize("label_smoothing,mode", [(0.0, "rdrop"), (0.1, "rdrop"), (0.0, "duplicate"),
                                                  (0.1, "duplicate"), (0.0, "none"), (0.1, "none")])
def test_adaptive_head_equals_the_direct_computation(tmp_path, label_smoothing, mode):
    """The adaptive softmax as the engine's fused-loss head (AdaptiveTokenLoss): the default loss / rdrop_terms,
    chunked over the full distribution (or fairseq's target-only loss), equal NLL (+ KL) of the full [N, T, V]
    log-probabilities computed at once, values and gradients, padding ignored."""
    task = _adaptive_task(tmp_path, "--task.label_smoothing", str(label_smoothing))
    task.meta["vocab_size"] = WIKI103_VOCAB
    assert task.chunk_tokens(2) == 125                         # 256 MB of fp32 [2, c, V] on WikiText-103
    task.meta["vocab_size"], task.cfg.softmax_chunk_tokens = 8, 3
    torch.manual_seed(0)
    model = task.build_model({}).eval()                        # no dropout: both ways see the same distributions
    ds = task.build_dataset("train")
    batch = task.collate([ds[i] for i in range(len(ds))])
    assert batch["labels"].eq(L.IGNORE).any()                  # a short last block: padded
    b = batch if mode == "none" else rdrop.double_batch(batch)

    def engine_terms(out):
        if mode == "none":
            return task.loss(out), None
        return task.rdrop_terms(out, rdrop.CONSISTENCY[mode])

    def direct(out):
        lp = model.adaptive_softmax(out.hidden)                 # full [N, T, V] at once
        if mode == "none":
            return losses.nll_loss(lp, out.target, out.pad_mask, label_smoothing), None
        n = lp.shape[0] // 2
        t, pad = out.target[:n], out.pad_mask[:n]
        nll = sum(losses.nll_loss(x, t, pad, label_smoothing) for x in (lp[:n], lp[n:]))
        return nll, (losses.symmetric_kl(lp[:n], lp[n:], pad) if mode == "rdrop" else None)

    results = []
    for fn in (engine_terms, direct):
        model.zero_grad()
        out = task.forward(model, b)
        assert out.fused and isinstance(out.head, L.AdaptiveTokenLoss)
        nll, kl = fn(out)
        (nll + (kl if kl is not None else 0.0)).backward()
        results.append((nll.item(), None if kl is None else kl.item(),
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
    (nll, kl, got), (ref_nll, ref_kl, want) = results
    assert nll == pytest.approx(ref_nll, rel=1e-5)
    assert (kl is None) == (ref_kl is None) == (mode != "rdrop")
    if kl is not None:
        assert kl == pytest.approx(ref_kl, rel=1e-4, abs=1e-7)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    nll_rows = out.head.token_nll(out.hidden, out.target, out.pad_mask)      # evaluation: per position
    lp = model.adaptive_softmax(out.hidden)
    by_hand = -lp.gather(-1, out.target.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(out.pad_mask, 0.0)
    torch.testing.assert_close(nll_rows, by_hand.detach(), rtol=1e-5, atol=1e-6)


def test_checkpointed_chunks_replay_their_dropout_masks():
    """In training mode each chunk's dropout masks are drawn again when it is recomputed in backward: the
    gradients equal those of the same chunks kept in memory."""
    model = tiny_adaptive(adaptive_softmax_dropout=0.5).train()
    sm = model.adaptive_softmax
    h0 = torch.randn(2, 11, 32)
    t = torch.randint(0, 300, (11,))

    def pair(lp, tt):
        return losses.nll_loss(lp[0], tt) + losses.nll_loss(lp[1], tt) + losses.symmetric_kl(lp[0], lp[1])
    grads = []
    for ckpt in (True, False):
        model.zero_grad()
        h = h0.clone().requires_grad_()
        torch.manual_seed(3)
        sm(h, reduce=pair, extras=(t,), chunk_tokens=4, use_checkpoint=ckpt).backward()
        grads.append((h.grad.clone(), sm.class_proj.grad.clone(), model.decoder.embed_tokens.band_weights(2)[0].grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert grads[0][0].abs().sum() > 0


def test_gpt_rdrop_loss_ignores_padding(tmp_path):
    from engine.rdrop import rdrop_loss
    task = make_task(tmp_path, "--task.model", "tiny", "--task.tokens_per_sample", "4",
                     files={"train": TEXT, "valid": TEXT})
    torch.manual_seed(0)
    model = task.build_model({})
    ds = task.build_dataset("train")
    batch = task.collate([ds[3], ds[0]])                    # the first row is 2 tokens + 2 pads
    out = rdrop_loss(task, model.train(), batch, "rdrop", 1.0)
    assert out.copies == 2 and out.consistency > 0 and torch.isfinite(out.loss)
    out.loss.backward()
    model.eval()
    a = rdrop_loss(task, model, batch, "duplicate", 1.0).nll
    other = {**batch, "input_ids": batch["input_ids"].masked_fill(batch["labels"].eq(L.IGNORE), 6)}
    assert rdrop_loss(task, model, other, "duplicate", 1.0).nll.item() == pytest.approx(a.item(), rel=1e-6)
    logits = model(input_ids=batch["input_ids"]).logits
    by_hand = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                                ignore_index=L.IGNORE, reduction="sum")
    assert a.item() == pytest.approx(2 * by_hand.item(), rel=1e-5)      # both copies, 6 scored tokens each


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_data_gives_one_line_errors(tmp_path):
    cases = [
        ({"train": b"", "valid": b"a\n"}, "is empty"),
        ({"train": b" \n\n", "valid": b"a\n"}, "is empty"),
        ({"train": "café au lait\n".encode("latin-1"), "valid": b"a\n"}, r"is not valid UTF-8 \(line 1"),
        ({"train": b"a b\n"}, "no valid split"),
    ]
    for i, (files, match) in enumerate(cases):
        with pytest.raises(ConfigError, match=match) as e:
            make_task(tmp_path / str(i), files=files).prepare()
        assert "\n" not in str(e.value)
    task = make_task(tmp_path / "latin", "--task.encoding", "latin-1",
                     files={"train": "café au lait\n".encode("latin-1"), "valid": b"a\n"})
    task.prepare()
    assert "café" in task.vocab.symbols
    (tmp_path / "wiki").mkdir()
    (tmp_path / "wiki" / "wiki.train.tokens").write_text("a b\n")
    with pytest.raises(ConfigError, match="no valid split in .*wiki.valid.tokens"):
        make_task(tmp_path, "--task.data_dir", str(tmp_path / "wiki")).prepare()
    for flags, match in [(("--task.encoding", "klingon"), "not a known text encoding"),
                         (("--task.model", "huge"), "not a preset"),
                         (("--task.context_window", "512"), "smaller than the evaluation window"),
                         (("--task.adaptive_cutoffs", "20000,x"), "comma-separated")]:
        with pytest.raises(ConfigError, match=match):
            make_task(tmp_path / "flags", *flags, files={"train": TEXT})
    with pytest.raises(ConfigError, match="adaptive cutoffs .* at most the vocabulary size 8"):
        make_task(tmp_path / "cut", "--task.model", "adaptive_tiny", files={"train": TEXT, "valid": TEXT}
                  ).build_model({})
    # resuming a run with data that give another vocabulary is refused before training
    make_task(tmp_path / "resume", "--task.model", "tiny", files={"train": TEXT, "valid": TEXT}).build_model({})
    other = make_task(tmp_path / "resume", "--task.model", "tiny", "--resume", "auto",
                      files={"train": TEXT + "e f\n", "valid": TEXT})
    with pytest.raises(ConfigError, match="vocabulary mismatch"):
        other.build_model({})
    with pytest.raises(ConfigError, match="fd needs pre-softmax logits"):
        make_task(tmp_path / "fd", "--task.model", "adaptive_tiny", "--rdrop.mode", "fd", files={"train": TEXT})
    with pytest.raises(ConfigError, match="fused_loss true is for GPT models"):
        make_task(tmp_path / "fused", "--task.model", "adaptive_tiny", "--task.fused_loss", "true",
                  files={"train": TEXT})
    with pytest.raises(ConfigError, match="fused_loss must be auto, true or false"):
        make_task(tmp_path / "fused", "--task.fused_loss", "maybe", files={"train": TEXT})


# ------------------------------------------------------------------------------------------------ fused loss (GPT)

GPT_TEXT = TEXT * 3 + "e f g h i j k l m n o\n"       # 54 tokens: blocks of 5, the last one 4


def _gpt(tmp_path, fused="true", **flags):
    args = ["--task.model", "tiny", "--task.tokens_per_sample", "5", "--task.fused_loss", fused,
            "--task.dropout", "0.2"]
    for k, v in flags.items():
        args += [f"--task.{k}", str(v)]
    task = make_task(tmp_path, *args, files={"train": GPT_TEXT, "valid": TEXT})
    torch.manual_seed(0)
    return task, task.build_model({})


@pytest.mark.parametrize("mode", ["rdrop", "fd", "duplicate", "none"])
def test_fused_gpt_equals_unfused_through_the_task_forward(tmp_path, mode):
    """--task.fused_loss true: the task's forward gives GPT-2's final hidden states through the model's own forward
    (logits_to_keep = []) and the tied lm_head's FusedTokenLoss; loss, consistency and every gradient equal the
    unfused loss on the same model's logits with the same dropout masks, label smoothing 0.1, padded rows."""
    task, model = _gpt(tmp_path, label_smoothing=0.1)
    head = fused_loss.find(model)
    assert head is not None and head.weight is model.transformer.wte.weight        # the tied embedding
    head.chunk_size = 4                                                             # several chunks
    assert "fused_token_loss" not in "".join(model.state_dict())
    ds = task.build_dataset("train")
    batch = task.collate([ds[len(ds) - 1], ds[0], ds[1]])
    assert batch["labels"].eq(L.IGNORE).any()
    model.train()
    results = []
    for fused in (True, False):
        torch.manual_seed(7)
        b = batch if mode == "none" else rdrop.double_batch(batch)
        if fused:
            out = task.forward(model, b)
        else:
            out = TaskOutput(model(input_ids=b["input_ids"]).logits, b["labels"], b["labels"].eq(L.IGNORE))
        assert out.fused == fused
        nll, cons = (task.loss(out), None) if mode == "none" else task.rdrop_terms(out, rdrop.CONSISTENCY[mode])
        model.zero_grad()
        (nll + (5.0 * cons if cons is not None else 0.0)).backward()
        results.append((nll.detach(), None if cons is None else cons.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (fn, fc, fg), (un, uc, ug) = results
    torch.testing.assert_close(fn, un, rtol=1e-5, atol=1e-5)
    if mode in ("rdrop", "fd"):
        assert uc > 0
        torch.testing.assert_close(fc, uc, rtol=1e-4, atol=1e-6)
    assert fg.keys() == ug.keys() and len(fg) > 10
    scale = max(g.abs().max().item() for g in ug.values())
    for name in ug:
        torch.testing.assert_close(fg[name], ug[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_fused_gpt_evaluation_and_flag(tmp_path):
    """The evaluation's per-token NLL in chunks equals the unfused one; auto turns the fused loss on from
    fused_loss.FUSED_MIN_VOCAB symbols, true / false force it."""
    task, model = _gpt(tmp_path / "a")
    plain = make_task(tmp_path / "b", "--task.model", "tiny", "--task.tokens_per_sample", "5", "--task.fused_loss",
                      "false", files={"train": GPT_TEXT, "valid": TEXT})
    assert fused_loss.find(plain.build_model({})) is None
    got = task.evaluate(FakeEval(task, model.eval()), "valid")
    fused_loss.find(model).chunk_size = 2                              # several chunks per batch
    again = task.evaluate(FakeEval(task, model), "valid")
    del model._modules[fused_loss.ATTR]                                # the same weights, unfused
    want = plain.evaluate(FakeEval(plain, model), "valid")
    assert got["tokens"] == want["tokens"] == 14
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-6) and again["ppl"] == pytest.approx(want["ppl"], rel=1e-6)
    big = fused_loss.FUSED_MIN_VOCAB
    assert [fused_loss.want_fused(v, n) for v, n in [("auto", big), ("auto", big - 1), ("false", big),
                                                     ("true", 8)]] == [True, False, False, True]
    auto = make_task(tmp_path / "c", "--task.model", "tiny", files={"train": TEXT, "valid": TEXT})
    assert auto.cfg.fused_loss == "auto" and fused_loss.find(auto.build_model({})) is None    # 8 symbols


# ------------------------------------------------------------------------------------------------ batching, optimizer

def test_recipes_batch_by_tokens_and_the_adaptive_one_uses_nag(tmp_path):
    base = ["--task", "language_modeling", "--output_dir", str(tmp_path), "--ds_config", "ds_configs/zero2.json",
            "--task.data_dir", str(tmp_path)]
    want = {"wikitext103_transformer_lm_gpt": (2048, 16, 512), "wikitext103_adaptive": (3072, 3, 3072),
            "wikitext2_small": (256, 1, 128)}
    for name, (tokens, accum, block) in want.items():
        cfg = parse_args(base + ["--recipe", name])
        assert (cfg.train.max_tokens, cfg.train.grad_accum, cfg.task_cfg.tokens_per_sample) == (tokens, accum, block)
        assert cfg.optim.nesterov == (name == "wikitext103_adaptive")
    cfg = parse_args(base + ["--recipe", "wikitext103_adaptive"])
    ds = dsc.resolve(dsc.load("ds_configs/zero2.json"), cfg, 8, "zero2", on_cpu=True)
    assert ds["optimizer"] == {"type": "SGD", "params": {"lr": 1.0, "momentum": 0.99, "weight_decay": 0.0,
                                                         "nesterov": True}}
    assert parse_args(base + ["--train.micro_batch_size", "3"]).train.max_tokens == 0     # examples instead
    # blocks of 8 tokens (56 in all) packed by --train.max_tokens 16: two blocks a batch, every block once
    task = make_task(tmp_path / "t", "--task.tokens_per_sample", "8", files={"train": TEXT * 4, "valid": TEXT})
    blocks = task.build_dataset("train")
    assert blocks.sizes.tolist() == [8] * 7
    batches = data.TrainBatches(task, blocks, 1, 1, 1, 0, 1, max_tokens=16)
    assert sorted(i for b in batches.tokens.batches for i in b) == list(range(len(blocks)))
    assert max(len(b) for b in batches.tokens.batches) == 2


def test_nesterov_sgd_flag(world):
    """--optim.nesterov true: DeepSpeed's SGD block passes it to torch.optim.SGD, whose step is Nesterov's."""
    base = ["--task", "language_modeling", "--output_dir", "x", "--ds_config", "x", "--task.train_file", __file__,
            "--log.tensorboard", "false"]
    with pytest.raises(ConfigError, match="nesterov true needs --optim.name sgd"):
        parse_args(base + ["--optim.nesterov", "true"])
    with pytest.raises(ConfigError, match="momentum > 0"):
        parse_args(base + ["--optim.name", "sgd", "--optim.momentum", "0", "--optim.nesterov", "true"])
    cfg = parse_args(base + ["--optim.name", "sgd", "--optim.nesterov", "true", "--optim.lr", "0.1", "--optim.weight_decay", "0",
                             "--optim.momentum", "0.9", "--train.micro_batch_size", "1"])
    ds = dsc.resolve(dsc.load("ds_configs/zero0.json"), cfg, 1, "zero0", on_cpu=True)
    assert ds["optimizer"]["params"]["nesterov"] is True
    import deepspeed
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1, bias=False)
    w0 = lin.weight.detach().clone()
    engine, opt, _, _ = deepspeed.initialize(model=lin, model_parameters=lin.parameters(), config=ds)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["nesterov"] is True
    x, buf, w = torch.ones(1, 3), None, w0.clone()
    for _ in range(2):
        engine.backward(engine(x).sum())
        engine.step()
        g = x[0]                                                   # d/dw of w . x
        buf = g if buf is None else 0.9 * buf + g
        w = w - 0.1 * (g + 0.9 * buf)                              # Nesterov: g + momentum * buf
    torch.testing.assert_close(lin.weight.detach()[0], w[0])
    engine.destroy()


# ------------------------------------------------------------------------------------------------ export pieces

def test_word_level_tokenizer_gives_the_engines_stream(tmp_path):
    """The exported word vocabulary (WordLevel over fairseq's dictionary, whitespace split, a line break -> </s>)
    encodes a file exactly as the engine did, unknown words to <unk>, and loads with AutoTokenizer."""
    from transformers import AutoTokenizer
    from engine.export import save_fast_tokenizer
    task = make_task(tmp_path, files={"train": TEXT, "valid": "a  zz b\r\n\n c\n"})
    task.prepare()
    save_fast_tokenizer(L.word_tokenizer(task.vocab), str(tmp_path / "tok"), task.special_tokens())
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for split in ("train", "valid"):
        text = (tmp_path / f"{split}.txt").read_bytes().decode()
        assert tok(text)["input_ids"] == task.stream(split).tolist(), split
    assert tok("a zz")["input_ids"] == [4, L.UNK] and tok.eos_token_id == L.EOS and tok.pad_token_id == L.PAD
    assert tok.decode([5, 4, 6]) == "b a c"


# ------------------------------------------------------------------------------------------------ real runs

AUTO_CHECK = r"""
import contextlib, io, json, math, os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
out = {}
for path, data_dir, remote in json.loads(sys.argv[1]):
    kw = {"trust_remote_code": True} if remote else {}
    usage = json.load(open(os.path.join(path, "export.json")))["usage"].replace("{path}", path)
    blocks = [b.split("```", 1)[0] for b in usage.split("```python")[1:]]
    os.chdir(data_dir)                              # the card's snippet reads wiki.test.tokens
    ns, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        for code in blocks:                         # the card's code as written: pipeline, then perplexity
            exec(code, ns)
    tok, model = ns["tok"], ns["model"]
    prompt = " ".join(open("wiki.test.tokens", encoding="utf-8").read().split()[:6])
    ids = tok(prompt, return_tensors="pt").input_ids
    piped = ns["generate"](prompt, max_new_tokens=6, return_tensors=True)[0]["generated_token_ids"]
    out[path] = {"ppl": math.exp(ns["nll"] / len(ns["stream"])), "tokens": len(ns["stream"]),
                 "printed": printed.getvalue(), "class": type(model).__name__,
                 "pipeline_ids": piped, "generate_ids": model.generate(ids, max_new_tokens=6)[0].tolist(),
                 "whole_text": tok(open("wiki.test.tokens", encoding="utf-8").read())["input_ids"] == ns["stream"]}
print(json.dumps(out))
"""


def auto_class_check(tmp_path, exports):
    """Run the exports' own card code (pipeline + perplexity) in a fresh Python OUTSIDE this repository
    (another working directory, no PYTHONPATH): [(export dir, data dir, trust_remote_code)] -> results."""
    import subprocess
    script = tmp_path / "auto_check.py"
    script.write_text(AUTO_CHECK)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(script), json.dumps([[str(p), str(d), r] for p, d, r in exports])],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wiki_slice(tmp_path_factory):
    """The first lines of WikiText-2's splits (train 600 lines, valid / test 40): real text, read in a second."""
    if not (WIKI2 / "wiki.train.tokens").is_file():
        pytest.skip("../shared/data/wikitext-2 missing")
    root = tmp_path_factory.mktemp("wiki")
    for split, n in (("train", 600), ("valid", 40), ("test", 40)):
        with open(WIKI2 / f"wiki.{split}.tokens", encoding="utf-8") as f:
            (root / f"wiki.{split}.tokens").write_text("".join(next(f) for _ in range(n)), encoding="utf-8")
    return root


STEPS = 4


def _run_args(out, data_dir, cache, *extra):
    return ["--task", "language_modeling", "--output_dir", str(out), "--task.data_dir", str(data_dir),
            "--task.cache_dir", str(cache), "--task.tokens_per_sample", "32", "--task.context_window", "8",
            "--task.eval_tokens_per_sample", "24", "--train.max_tokens", "64", "--train.max_steps", str(STEPS),
            "--optim.impl", "torch", "--optim.lr", "3e-3", "--optim.warmup_steps", "2", "--eval.every_steps", "2",
            "--eval.batch_size", "16", "--checkpoint.every_steps", "2", "--log.every_steps", "1",
            "--log.progress", "false", "--log.tensorboard", "false", "--rdrop.alpha", "1.0", *extra]


@pytest.fixture(scope="module")
def gpt_runs(world, wiki_slice, tmp_path_factory):
    """In-process GPT (tiny) R-Drop runs on the slice from one saved initialisation (ZeRO-3 builds its weights
    partitioned), gradient accumulation 2: ZeRO-2 unfused, ZeRO-2 fused (exported), ZeRO-3 fused straight
    through, and ZeRO-3 fused stopped at step 2 then resumed."""
    root = tmp_path_factory.mktemp("gpt")
    task = make_task(root, "--task.data_dir", str(wiki_slice), "--task.cache_dir", str(root / "cache"),
                     "--task.model", "tiny", "--task.tokens_per_sample", "32")
    torch.manual_seed(0)
    model = task.build_model({})
    task.export(model, model.state_dict(), str(root / "init"))
    common = ["--task.pretrained", str(root / "init"), "--task.tokenizer", "word", "--train.grad_accum", "2",
              "--task.label_smoothing", "0.1"]
    runs = {"z2_unfused": ("zero2", "false", []), "z2_fused": ("zero2", "true", []),
            "z3": ("zero3", "true", []), "z3_part": ("zero3", "true", ["--train.stop_at_step", "2"])}
    for name, (ds, fused, extra) in runs.items():
        train_in_process(world, _run_args(root / name, wiki_slice, root / "cache", "--ds_config",
                                          f"ds_configs/{ds}.json", "--task.fused_loss", fused, *common, *extra),
                         export=name == "z2_fused")
    train_in_process(world, _run_args(root / "z3_part", wiki_slice, root / "cache", "--ds_config",
                                      "ds_configs/zero3.json", "--task.fused_loss", "true", *common,
                                      "--resume", "auto"))
    return root


def test_gpt_engine_run_fused_on_off_equal(gpt_runs):
    a, b = metrics(gpt_runs / "z2_fused"), metrics(gpt_runs / "z2_unfused")
    assert [r["step"] for r in a] == list(range(1, STEPS + 1)) and all(r["consistency"] > 0 for r in a)
    for ra, rb in zip(a, b):
        for key in ("loss", "nll", "consistency", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=2e-4, abs=1e-6), (key, ra, rb)
    ea, eb = metrics(gpt_runs / "z2_fused", "eval")[-1], metrics(gpt_runs / "z2_unfused", "eval")[-1]
    for key in ("ppl", "test_ppl"):
        assert ea[key] == pytest.approx(eb[key], rel=1e-4)


def test_gpt_zero3_resume_equals_the_uninterrupted_run_and_zero2(gpt_runs):
    a, b = metrics(gpt_runs / "z3"), metrics(gpt_runs / "z3_part")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["consistency"] == rb["consistency"], (ra, rb)
    assert metrics(gpt_runs / "z3", "eval")[-1]["test_ppl"] == metrics(gpt_runs / "z3_part", "eval")[-1]["test_ppl"]
    for ra, rb in zip(a, metrics(gpt_runs / "z2_fused")):        # ZeRO-3 takes ZeRO-2's steps
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)


@pytest.fixture(scope="module")
def adaptive_run(wiki_slice, tmp_path_factory):
    """The one launched run: 2 ranks under the `deepspeed` launcher, adaptive-input model, ZeRO-3, R-Drop."""
    root = tmp_path_factory.mktemp("adaptive")
    proc = run(_run_args(root / "z3", wiki_slice, root / "cache", "--ds_config", "ds_configs/zero3.json",
                         "--task.model", "adaptive_tiny", "--task.softmax_chunk_mb", "1"),
               nproc=2, launcher="deepspeed")
    return root / "z3", proc


def test_two_rank_zero3_adaptive_rdrop_run(adaptive_run):
    out, proc = adaptive_run
    log = proc.stdout
    vocab = json.loads((out / "hf_model" / "language_model.json").read_text())["vocab_size"]
    n = lm.fairseq_num_params_adaptive(lm.adaptive_config("adaptive_tiny", vocab, 32))
    assert "rank 1/2" in log and f"{n:,} parameters (fairseq's count" in log
    train, ev = metrics(out), metrics(out, "eval")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["consistency"] > 0 and r["loss"] > r["nll"] for r in train)
    assert [r["step"] for r in ev] == [2, 4] and ev[-1]["ppl"] < ev[0]["ppl"]          # it learns
    assert ev[-1]["ppl"] == pytest.approx(math.exp(ev[-1]["loss"])) and "test_ppl" in ev[-1]
    state = torch.load(next((out / "checkpoints" / "best").glob("*model_states.pt")), weights_only=False)
    assert state["best"] == pytest.approx(min(r["ppl"] for r in ev))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["ds_config_resolved"]["zero_optimization"]["stage"] == 3 and cfg["world_size"] == 2


def test_exports_load_with_auto_classes_and_reproduce_the_test_perplexity(gpt_runs, adaptive_run, wiki_slice,
                                                                           tmp_path):
    """Both exports are complete HF folders: in a fresh Python outside this repository the card's own code --
    transformers.pipeline("text-generation") and the perplexity over the test split with the run's windows through
    AutoTokenizer + AutoModelForCausalLM (the adaptive model through trust_remote_code and the adaptive_lm.py saved
    in the folder) -- reproduces the engine's final test perplexity, and the pipeline's greedy output is
    model.generate's."""
    gpt, ada = gpt_runs / "z2_fused" / "hf_model", adaptive_run[0] / "hf_model"
    for d, files in ((gpt, ()), (ada, ("adaptive_lm.py",))):
        names = {p.name for p in d.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json", "README.md", "export.json", *files} <= names, names
        m = json.loads((d / "export.json").read_text())
        assert m["pipeline_tag"] == "text-generation" and "AutoModelForCausalLM" in m["usage"]
        assert "pipeline_tag: text-generation" in (d / "README.md").read_text()
    assert json.loads((ada / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "adaptive_lm.AdaptiveLMConfig", "AutoModelForCausalLM": "adaptive_lm.AdaptiveLM"}
    got = auto_class_check(tmp_path, [(gpt, wiki_slice, False), (ada, wiki_slice, True)])
    for d, run_dir, cls in ((gpt, gpt_runs / "z2_fused", "GPT2LMHeadModel"), (ada, adaptive_run[0], "AdaptiveLM")):
        r, final = got[str(d)], metrics(run_dir, "eval")[-1]
        assert r["class"] == cls and r["whole_text"]
        assert r["tokens"] == final["test_tokens"]
        print(f"{cls}: engine test ppl {final['test_ppl']:.6f}, Auto classes {r['ppl']:.6f} "
              f"(relative difference {abs(r['ppl'] / final['test_ppl'] - 1):.1e})")
        assert r["ppl"] == pytest.approx(final["test_ppl"], rel=1e-4), (r["ppl"], final["test_ppl"])
        assert "perplexity" in r["printed"]
        assert r["pipeline_ids"] == r["generate_ids"] and len(r["generate_ids"]) > 6


def test_adaptive_activation_checkpointing_replays_rdrop_masks():
    """--train.activation_checkpointing on the adaptive model: its decoder layers recompute in backward with the
    forward's dropout masks (the two R-Drop copies stay distinct), so loss and gradients are unchanged."""
    from engine.trainer import enable_activation_checkpointing
    model = tiny_adaptive().train()
    ids = torch.randint(4, 300, (2, 9)).repeat(2, 1)
    results = []
    for ckpt in (False, True):
        if ckpt:
            enable_activation_checkpointing(model)
        model.zero_grad()
        torch.manual_seed(5)
        h = model(input_ids=ids, features_only=True).last_hidden_state
        h.pow(2).sum().backward()
        results.append((h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (h0, g0), (h1, g1) = results
    assert not torch.equal(h0[:2], h0[2:])                          # the copies got different masks
    torch.testing.assert_close(h0, h1)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], msg=n)
