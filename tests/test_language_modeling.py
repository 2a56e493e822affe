"""Language modelling: fairseq's dictionary and block cutting, context-window evaluation, perplexity against a hand
computation, fairseq parameter counts, the adaptive softmax (normalised, fairseq's formulation, chunked R-Drop
terms equal to the unchunked ones), bad data, and real 2-rank `deepspeed` R-Drop runs on WikiText-2: ZeRO-3 from a
saved initialisation, stopped and resumed (identical to the uninterrupted run), the same run under ZeRO-2 (same
losses: ZeRO-3 gathers and reduces the adaptive softmax's tied weights correctly), and the export reloaded."""
from __future__ import annotations

import json
import math
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import data, losses
from engine.config import ConfigError, parse_args
from models import transformer_lm as lm
from tasks import language_modeling as L
from tests.helpers import DATA, load_weights, metrics, run

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
    task = make_task(tmp_path, "--task.model", "adaptive_tiny", "--task.adaptive_cutoffs", "2,5", *flags,
                     files={"train": TEXT, "valid": TEXT})
    task.prepare()
    return task


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_chunked_full_distribution_rdrop_terms_equal_the_direct_computation(tmp_path, label_smoothing):
    task = _adaptive_task(tmp_path, "--task.label_smoothing", str(label_smoothing))
    task.meta["vocab_size"] = WIKI103_VOCAB
    assert task.chunk_tokens(2) == 125                         # 256 MB of fp32 [2, c, V] on WikiText-103
    task.meta["vocab_size"], task.cfg.softmax_chunk_tokens = 8, 3
    torch.manual_seed(0)
    model = task.build_model({}).eval()                        # no dropout: both ways see the same distributions
    ds = task.build_dataset("train")
    batch = task.collate([ds[i] for i in range(len(ds))])
    doubled = {k: torch.cat([v, v]) for k, v in batch.items()}

    def direct():
        out = task.forward(model, doubled)
        lp = out.softmax(out.hidden)                           # full [N, T, V] at once
        n = lp.shape[0] // 2
        t, pad = out.target[:n], out.pad_mask[:n]
        nll = sum(losses.nll_loss(x, t, pad, label_smoothing) for x in (lp[:n], lp[n:]))
        return nll, losses.symmetric_kl(lp[:n], lp[n:], pad)

    model.zero_grad()
    out = task.forward(model, doubled)
    nll, kl = task.rdrop_terms(out)
    (nll + kl).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref_nll, ref_kl = direct()
    (ref_nll + ref_kl).backward()
    assert nll.item() == pytest.approx(ref_nll.item(), rel=1e-5)
    assert kl.item() == pytest.approx(ref_kl.item(), rel=1e-4, abs=1e-7)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


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
        ({"train": "café au lait\n".encode("latin-1"), "valid": b"a\n"}, r"is not utf-8 text \(byte 0xe9"),
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


# ------------------------------------------------------------------------------------------------ real runs

STEPS = 6


def _args(out, init, cache, ds="zero3", *extra):
    return ["--task", "language_modeling", "--output_dir", str(out), "--ds_config", f"ds_configs/{ds}.json",
            "--task.data_dir", str(WIKI2), "--task.cache_dir", str(cache), "--task.pretrained", str(init),
            "--task.tokenizer", "word",                  # = the init's dict.txt; reuses the fixture's cache
            "--task.tokens_per_sample", "32", "--task.context_window", "8", "--task.eval_tokens_per_sample", "24",
            "--task.max_eval_tokens", "600", "--task.softmax_chunk_mb", "1", "--train.micro_batch_size", "2",
            "--train.max_steps", str(STEPS), "--optim.impl", "torch", "--optim.lr", "3e-3",
            "--optim.warmup_steps", "2", "--eval.every_steps", "3", "--eval.batch_size", "8",
            "--checkpoint.every_steps", "3", "--log.every_steps", "1", "--log.progress", "false",
            "--rdrop.alpha", "1.0", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A saved adaptive_tiny initialisation (WikiText-2 vocabulary), then 2-rank R-Drop runs from it: ZeRO-3
    straight through, ZeRO-3 stopped at step 3 and resumed, ZeRO-2 straight through."""
    if not (WIKI2 / "wiki.train.tokens").is_file():
        pytest.skip("../shared/data/wikitext-2 missing")
    root = tmp_path_factory.mktemp("lm")
    cache = root / "cache"
    task = make_task(root, "--task.data_dir", str(WIKI2), "--task.cache_dir", str(cache), "--task.model",
                     "adaptive_tiny", "--task.tokens_per_sample", "32")
    torch.manual_seed(0)
    model = task.build_model({})
    init = root / "init"
    task.export(model, model.state_dict(), str(init))
    out = {"init": init, "cache": cache, "task": task}
    out["z3"] = run(_args(root / "z3", init, cache), nproc=2, launcher="deepspeed")
    first = run(_args(root / "part", init, cache, "zero3", "--train.stop_at_step", "3"), nproc=2,
                launcher="deepspeed")
    out["resumed"] = (first, run(_args(root / "part", init, cache, "zero3", "--resume", "auto"), nproc=2,
                                 launcher="deepspeed"))
    out["z2"] = run(_args(root / "z2", init, cache, "zero2"), nproc=2, launcher="deepspeed")
    out["dirs"] = {k: root / k for k in ("z3", "part", "z2")}
    return out


def test_two_rank_zero3_rdrop_run(runs):
    out = runs["dirs"]["z3"]
    log = runs["z3"].stdout
    assert "rank 1/2" in log and "model " in log and "93,456 parameters (fairseq's count" in log
    train, ev = metrics(out), metrics(out, "eval")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["consistency"] > 0 and r["loss"] > r["nll"] for r in train)
    assert [r["step"] for r in ev] == [3, 6] and all(r["tokens"] == 600 for r in ev)
    assert ev[-1]["ppl"] == pytest.approx(math.exp(ev[-1]["loss"]))
    assert ev[-1]["ppl"] < ev[0]["ppl"]                                 # it learns
    assert "test_ppl" in ev[-1] and "test_ppl" not in ev[0]
    state = torch.load(next((out / "checkpoints" / "best").glob("*model_states.pt")), weights_only=False)
    assert state["best"] == pytest.approx(min(r["ppl"] for r in ev))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["ds_config_resolved"]["zero_optimization"]["stage"] == 3 and cfg["world_size"] == 2


def test_resume_equals_the_uninterrupted_run(runs):
    first, second = runs["resumed"]
    assert "stopped at step 3" in first.stdout and "resumed from" in second.stdout
    a, b = metrics(runs["dirs"]["z3"]), metrics(runs["dirs"]["part"])
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["consistency"] == rb["consistency"], (ra, rb)
    assert metrics(runs["dirs"]["z3"], "eval")[-1]["ppl"] == metrics(runs["dirs"]["part"], "eval")[-1]["ppl"]
    wa, wb = load_weights(runs["dirs"]["z3"]), load_weights(runs["dirs"]["part"])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_zero3_trains_like_zero2(runs):
    """Same initialisation, data and dropout masks: ZeRO-3 (tied adaptive weights gathered as external
    parameters of the adaptive softmax, chunks recomputed in backward) and ZeRO-2 take the same steps."""
    a, b = metrics(runs["dirs"]["z3"]), metrics(runs["dirs"]["z2"])
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4)
    assert [r["consistency"] for r in a] == pytest.approx([r["consistency"] for r in b], rel=1e-3)
    wa, wb = load_weights(runs["dirs"]["z3"]), load_weights(runs["dirs"]["z2"])
    for k in wa:
        # the key bias shifts every score of a query equally, so softmax cancels it: its gradient is rounding
        # noise, which Adam scales up to lr-sized steps that differ between the two reduction orders
        if not k.endswith("k_proj.bias"):
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_export_reloads_and_scores_like_the_run(runs, tmp_path):
    out = runs["dirs"]["z3"] / "hf_model"
    model, vocab, info = L.load_exported(str(out))
    assert isinstance(model, lm.AdaptiveLM) and info["adaptive"] and len(vocab) == runs["task"].meta["vocab_size"]
    assert (out / "dict.txt").read_text() == (Path(runs["task"].folder) / "dict.txt").read_text()
    task = make_task(tmp_path, *_args(runs["dirs"]["z3"], out, runs["cache"])[6:])
    m = task.evaluate(FakeEval(task, model.eval(), batch_size=8), "valid")
    assert m["ppl"] == pytest.approx(metrics(runs["dirs"]["z3"], "eval")[-1]["ppl"], rel=1e-5)
