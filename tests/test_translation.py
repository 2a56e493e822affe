"""Translation task: BPE, token batching, the masked loss, fairseq parameter counts, BLEU, errors, and one real
2-rank R-Drop run through the `deepspeed` launcher on Multi30k (tiny model), whose export is then used by the
translate / average commands."""
from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError
from engine.task import TaskOutput
from engine import data
from models import transformer_mt as mt
from tasks import _seq2seq, _text
from tasks import translation as tr
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "multi30k"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

needs_data = pytest.mark.skipif(not (DATA / "train.de.gz").is_file(), reason="../shared/data/multi30k not present")


def _lines(split, lang, n):
    with gzip.open(DATA / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


def _cfg(**kw):
    c = tr.Config(data_dir=str(DATA), **kw)
    return c


# ------------------------------------------------------------------------------------------------ BPE

@needs_data
def test_bpe_round_trip_on_multi30k():
    src, tgt = _lines("train", "de", 2000), _lines("train", "en", 2000)
    tok = tr.train_bpe(src + tgt, 1000)
    assert [tok.token_to_id(s) for s in tr.SPECIALS] == [0, 1, 2, 3]        # fairseq's dictionary order
    assert 900 <= tok.get_vocab_size() <= 1000
    held_out = _lines("val", "de", 200) + _lines("val", "en", 200)
    encs = tok.encode_batch(held_out)
    no_unk = [(line, e) for line, e in zip(held_out, encs) if tr.UNK_ID not in e.ids]
    assert len(no_unk) >= 0.9 * len(held_out)
    for line, e in no_unk:
        assert tok.decode(e.ids) == line.strip()                            # BPE removed = the raw sentence
    assert sum(len(e.ids) for e in encs) > sum(len(line.split()) for line in held_out)   # subwords were split


def _task_for(tmp_path, **kw):
    from engine.config import RunConfig
    rc = RunConfig(task="translation", output_dir=str(tmp_path / "run"), ds_config="x")
    rc.task_cfg = _cfg(cache_dir=str(tmp_path / "cache"), **kw)
    return tr.Translation(rc, None)


@needs_data
def test_bpe_cache_is_keyed_by_data_and_settings(tmp_path):
    def prepared(**kw):
        task = _task_for(tmp_path, **kw)
        task.prepare()                      # rank 0's once-per-run step: trains or finds the cached BPE
        s, t = task.tokenizers()
        return s, t, task.tok_folder, task.tok_key
    _, _, f1, k1 = prepared(vocab_size=300, max_train_examples=300)
    mtime = os.path.getmtime(os.path.join(f1, "tokenizer.json"))
    _, _, f1b, _ = prepared(vocab_size=300, max_train_examples=300)          # cached: not retrained
    assert f1b == f1 and os.path.getmtime(os.path.join(f1, "tokenizer.json")) == mtime
    _, _, f2, k2 = prepared(vocab_size=400, max_train_examples=300)
    _, _, f3, k3 = prepared(vocab_size=300, max_train_examples=299)
    assert len({k1, k2, k3}) == 3
    s, t, f4, _ = prepared(vocab_size=300, max_train_examples=300, joint_vocab=False, share_all_embeddings=False)
    assert sorted(p for p in os.listdir(f4) if p.startswith("tokenizer")) == ["tokenizer.de.json", "tokenizer.en.json"]
    assert s.get_vocab() != t.get_vocab()
    # a rank that cannot see rank 0's cache is told so in one line
    with pytest.raises(ConfigError, match="not complete on this rank"):
        _task_for(tmp_path, vocab_size=500, max_train_examples=300).tokenizers()


# ------------------------------------------------------------------------------------------------ batching

@needs_data
def test_token_batches_never_exceed_max_tokens():
    src, tgt = _lines("train", "de", 1500), _lines("train", "en", 1500)
    tok = tr.train_bpe(src + tgt, 800)
    ds = _seq2seq.PairSplit(_text.encode(tok, src), _text.encode(tok, tgt), src, tgt)
    sizes = _task().example_sizes(ds)
    assert sizes[0] == (len(ds.src_ids[0]) + 1, len(ds.tgt_ids[0]) + 1)        # </s> counted
    tb = data.TokenBatches(sizes, 300, seed=3)
    batches = tb.epoch(0)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))    # every pair exactly once
    for b in batches:
        batch = tr.LAYOUT.collate([ds[i] for i in b])
        assert batch["input_ids"].numel() <= 300 and batch["labels"].numel() <= 300   # padding included
        assert batch["decoder_input_ids"].shape == batch["labels"].shape
    counts = [len(b) for b in batches]
    assert max(counts) > 10 * min(counts) or len(set(counts)) > 3           # length-bucketed, not fixed-size
    assert 0 <= tb.pad_ratio < 0.2                                          # sorted by length: little padding
    again = tb.epoch(1)
    assert sorted(map(tuple, again)) == sorted(map(tuple, batches)) and again != batches   # reshuffled per epoch
    assert data.TokenBatches(sizes, 300, seed=3).epoch(0) == batches         # deterministic


def test_collate_layout_is_fairseqs():
    b = tr.LAYOUT.collate([([10, 11, 12], [20, 21]), ([13], [22, 23, 24])])
    assert b["input_ids"].tolist() == [[10, 11, 12, 2], [13, 2, 1, 1]]
    assert b["decoder_input_ids"].tolist() == [[2, 20, 21, 1], [2, 22, 23, 24]]
    assert b["labels"].tolist() == [[20, 21, 2, 1], [22, 23, 24, 2]]
    assert b["attention_mask"].tolist() == [[True] * 4, [True, True, False, False]]


# ------------------------------------------------------------------------------------------------ loss

def _task():
    from engine.config import RunConfig
    rc = RunConfig(task="translation", output_dir="/nonexistent", ds_config="x")
    rc.task_cfg = tr.Config(label_smoothing=0.1)
    return tr.Translation(rc, None)


def test_label_smoothed_loss_masks_pads_by_hand():
    task = _task()
    V, eps = 4, 0.1
    # one sentence, 3 target positions, the last is padding
    logits = torch.tensor([[[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 3.0], [9.0, -9.0, 5.0, 0.0]]])
    labels = torch.tensor([[0, 3, tr.PAD_ID]])
    out = TaskOutput(logits, labels, labels.eq(tr.PAD_ID))
    # by hand: lprobs of row 0 = [2,0,0,0] - log(e^2 + 3); row 1 = [0,1,0,3] - log(2 + e + e^3)
    z0, z1 = math.log(math.e ** 2 + 3), math.log(2 + math.e + math.e ** 3)
    nll = [z0 - 2.0, z1 - 3.0]
    smooth = [4 * z0 - 2.0, 4 * z1 - 4.0]                # -sum_v lprob_v
    eps_i = eps / (V - 1)
    expected = sum((1 - eps - eps_i) * n + eps_i * s for n, s in zip(nll, smooth))
    assert task.loss(out).item() == pytest.approx(expected, rel=1e-6)
    assert task.num_units({"labels": labels}) == 2
    # changing logits at the pad position changes nothing, in the loss or in the consistency
    other = logits.clone()
    other[0, 2] = torch.tensor([-4.0, 7.0, 1.0, 2.0])
    assert task.loss(TaskOutput(other, labels, labels.eq(tr.PAD_ID))).item() == pytest.approx(expected, rel=1e-6)
    a = TaskOutput(logits, labels, labels.eq(tr.PAD_ID))
    b = TaskOutput(logits + torch.tensor([0.0, 0.0, 0.0, 0.5]) * torch.tensor([[[1.0], [0.0], [1.0]]]), labels,
                   labels.eq(tr.PAD_ID))
    b_pad_changed = TaskOutput(b.logits.clone(), labels, labels.eq(tr.PAD_ID))
    b_pad_changed.logits[0, 2] = 50.0 * torch.randn(4)
    assert task.consistency(a, b).item() > 0
    assert task.consistency(a, b).item() == pytest.approx(task.consistency(a, b_pad_changed).item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------ model

@pytest.mark.parametrize("preset,vs,vt,share_all,share_dec", [
    ("transformer_iwslt_de_en", 10000, 10000, True, True),
    ("transformer_iwslt_de_en", 8848, 6632, False, True),
    ("transformer_iwslt_de_en", 8848, 6632, False, False),
    ("transformer_vaswani_wmt_en_de_big", 32000, 32000, True, True),
    ("tiny", 300, 200, False, False),
])
def test_parameter_count_matches_fairseq_formula(preset, vs, vt, share_all, share_dec):
    c = mt.make_config(preset, vs, vt, share_all_embeddings=share_all, share_decoder_input_output_embed=share_dec)
    with torch.device("meta"):
        model = mt.TransformerMT(c)
    mt.freeze_positions(model)
    assert mt.trainable_params(model) == mt.fairseq_num_params(preset, vs, vt, share_all, share_dec)
    enc, dec = model.model.encoder, model.model.decoder
    assert (enc.embed_tokens.weight is dec.embed_tokens.weight) == share_all
    assert (dec.output_projection.weight is dec.embed_tokens.weight) == (share_all or share_dec)
    # post-norm, fairseq style: no layer norm outside the layers
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(".layers." in n for n in norms)
    assert len(norms) == 2 * c.encoder_layers + 3 * c.decoder_layers


def test_presets_match_the_paper():
    p = mt.PRESETS["transformer_iwslt_de_en"]
    assert (p["encoder_layers"], p["d_model"], p["encoder_ffn_dim"], p["encoder_attention_heads"], p["dropout"]) == \
        (6, 512, 1024, 4, 0.3)
    p = mt.PRESETS["transformer_vaswani_wmt_en_de_big"]
    assert (p["d_model"], p["encoder_ffn_dim"], p["encoder_attention_heads"], p["dropout"], p["attention_dropout"],
            p["activation_dropout"]) == (1024, 4096, 16, 0.1, 0.1, 0.1)


def test_fairseq_sinusoidal_positions_and_embedding_scale():
    torch.manual_seed(0)
    c = mt.make_config("tiny", 50, 50, share_all_embeddings=True)
    model = mt.build(c, {"zero_optimization": {"stage": 0}}).eval()
    enc = model.model.encoder
    x = torch.tensor([[5, 6, 7, tr.EOS_ID], [5, 6, tr.EOS_ID, tr.PAD_ID]])
    pos = enc.embed_positions(x)
    d, half = 32, 16
    freq = torch.exp(torch.arange(half).float() * -(math.log(10000) / (half - 1)))
    for t in range(3):                                       # fairseq: positions start at padding_idx + 1 = 2
        ang = (t + 2) * freq
        assert torch.allclose(pos[1, t], torch.cat([ang.sin(), ang.cos()]), atol=1e-5)
    assert pos[1, 3].abs().sum() == 0                        # pad gets the zero vector
    assert model.model.encoder.embed_scale == pytest.approx(math.sqrt(d))
    w = enc.embed_tokens.weight
    assert w[tr.PAD_ID].abs().sum() == 0 and w.std().item() == pytest.approx(d ** -0.5, rel=0.15)   # fairseq init


# ------------------------------------------------------------------------------------------------ BLEU

def test_bleu_matches_sacrebleus_documented_example():
    refs = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
            ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    scores = tr.bleu_scores(hyps, refs)
    assert round(scores["bleu"], 2) == 48.53                 # sacreBLEU README: BLEU = 48.53 (13a, 2 refs)
    assert tr.bleu_scores(refs[0], refs[0])["bleu"] == pytest.approx(100.0)
    assert tr.bleu_scores(refs[0], refs[0])["bleu_tok"] == pytest.approx(100.0)


def test_tokenized_bleu_equals_moses_multi_bleu():
    """bleu_tok is the number fairseq reports: Moses tokenizer.perl, then multi-bleu.perl.  The expected values come
    from mosesdecoder's own scripts on these lines: `tokenizer.perl -l en < X > X.tok` for both files, then
    `multi-bleu.perl ref.tok < hyp.tok` -> BLEU = 49.71, 80.8/58.6/43.5/29.6 (BP=1.000, ratio=1.040)."""
    hyps = ["The dog bit the man.", "It wasn't surprising, was it?", "The man had just bitten him.",
            'A 10-year-old boy plays "soccer" on the grass.', "Two women, one in red, walk down the street & talk.",
            "He said: it's the dog's bone!", "A group of people are standing in front of an igloo.",
            "The cat sat on the mat (quietly)."]
    refs = ["The dog bit the man.", "It was not unexpected, was it?", "The man bit him first.",
            'A ten-year-old boy is playing "soccer" on grass.',
            "Two women, one wearing red, walk along the street & chat.", "He said: it's the dog's own bone!",
            "A group of people standing in front of an igloo.", "The cat sat quietly on the mat."]
    assert tr.moses_tokenize(hyps[1:2], "en") == ["It wasn &apos;t surprising , was it ?"]   # tokenizer.perl's
    assert round(tr.bleu_scores(hyps, refs)["bleu_tok"], 2) == 49.71
    assert round(tr.bleu_scores(hyps, refs)["bleu"], 2) != 49.71        # the detokenized score is another number


def test_compound_splitting_rule():
    assert tr.compound_split("das 10-jährige Kind , Ost-West") == \
        "das 10 ##AT##-##AT## jährige Kind , Ost ##AT##-##AT## West"
    assert tr.compound_split("a - b") == "a - b"
    hyp, ref = ["ein Ost-West Abkommen wurde heute in der Stadt unterzeichnet ."], \
        ["ein Nord-West Abkommen wurde heute in der Stadt unterzeichnet ."]
    plain = tr.bleu_scores(hyp, ref)["bleu_tok"]
    split = tr.bleu_scores(hyp, ref, split_compounds=True)["bleu_tok"]
    assert split > plain                                     # the shared "West" now matches


def test_final_evaluation_size_whole_split_unless_a_smoke_run():
    """-1 (the default): the whole split (0) at the end of a real run, the intermediate subset at the end of a run
    shorter than SMOKE_STEPS; an explicit count (0 included) always wins."""
    S = _seq2seq.SMOKE_STEPS
    auto = _cfg(eval_gen_examples=256)
    assert auto.final_gen_examples == -1
    assert [_seq2seq.final_gen_count(auto, s) for s in (1, 4, S - 1, S, 20000)] == [256, 256, 256, 0, 0]
    assert _seq2seq.final_gen_count(_cfg(final_gen_examples=0), 4) == 0
    assert _seq2seq.final_gen_count(_cfg(final_gen_examples=24), 20000) == 24
    assert _seq2seq.final_gen_count(_cfg(eval_gen_examples=0), 4) == 0   # an unbounded subset is the whole split


# ------------------------------------------------------------------------------------------------ errors

def test_data_errors_are_one_line(tmp_path):
    (tmp_path / "train.de").write_text("a\nb\nc\n")
    (tmp_path / "train.en").write_text("x\ny\n")
    with pytest.raises(ConfigError) as e:
        tr.read_parallel(str(tmp_path), "train", "de", "en")
    msg = str(e.value)
    assert "train.de" in msg and "train.en" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="missing .*val.de"):
        tr.read_parallel(str(tmp_path), "val", "de", "en")
    for bad, match in [(dict(beam=0), "beam"), (dict(joint_vocab=False), "joint"), (dict(model="huge"), "preset"),
                       (dict(final_gen_examples=-2), "final_gen_examples")]:
        with pytest.raises(ConfigError, match=match):
            _cfg(**bad).validate()


def test_misaligned_files_through_the_cli(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with gzip.open(data / "train.de.gz", "wt") as f:
        f.write("ein Hund\nzwei Hunde\n")
    (data / "train.en").write_text("a dog\n")
    r = subprocess.run([sys.executable, "-m", "engine.train", "--task", "translation", "--output_dir",
                        str(tmp_path / "run"), "--ds_config", "ds_configs/zero2.json", "--task.data_dir", str(data),
                        "--task.model", "tiny", "--optim.impl", "torch", "--train.max_steps", "1"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "train.de.gz" in err[0] and "train.en" in err[0]


# ------------------------------------------------------------------------------------------------ a real run

@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    if not (DATA / "train.de.gz").is_file():
        pytest.skip("../shared/data/multi30k not present")
    out = tmp_path_factory.mktemp("mt") / "run"
    cmd = [sys.executable, str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "engine.train",
           "--task", "translation", "--output_dir", str(out), "--ds_config", "ds_configs/zero2.json",
           "--task.data_dir", str(DATA), "--task.source_lang", "de", "--task.target_lang", "en",
           "--task.model", "tiny", "--task.vocab_size", "600", "--task.max_train_examples", "1200",
           "--train.max_tokens", "600", "--task.eval_gen_examples", "24", "--task.beam", "2",
           "--optim.impl", "torch", "--optim.lr", "2e-3", "--optim.warmup_steps", "2", "--train.max_steps", "4",
           "--checkpoint.every_steps", "2", "--log.every_steps", "1", "--log.progress", "false",
           "--eval.batch_size", "8", "--rdrop.alpha", "5", "--dist.omp_threads", "1"]
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return out, r.stdout + r.stderr


def test_two_rank_rdrop_run(two_rank_run):
    out, log = two_rank_run
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in records if r["kind"] == "train"]
    ev = [r for r in records if r["kind"] == "eval"][-1]
    assert len(train) == 4 and all(r["consistency"] > 0 and math.isfinite(r["loss"]) for r in train)
    assert all(r["loss"] > r["nll"] for r in train)                         # nll of 2 copies / units + alpha * KL
    assert all(0 <= r["pad_ratio"] < 0.5 for r in train)                    # Task.batch_stats, summed over ranks
    cfg = json.load(open(out / "config.json"))
    assert cfg["world_size"] == 2 and cfg["rdrop"]["mode"] == "rdrop"
    assert (cfg["optim"]["name"], cfg["optim"]["beta2"], cfg["optim"]["eps"]) == ("adamw", 0.98, 1e-9)
    assert ev["gen_examples"] == 24 and ev["bleu"] >= 0 and math.isfinite(ev["nll"])
    # a 4-step run is a smoke run: its final evaluation took the bounded subset (final_gen_examples -1) and said so
    assert "generates 24 of 1014 valid examples: a run of 4 steps" in log and "--task.final_gen_examples 0" in log
    assert "padding ratio" in log and log.count("trained BPE") == 1         # once, by rank 0 (Task.prepare)
    hyp_file = out / "predictions" / "val.hyp"                                # written at the final evaluation
    assert hyp_file.is_file() and len(hyp_file.read_text().splitlines()) == 24
    assert (out / "hf_model" / "tokenizer.json").is_file() and (out / "hf_model" / "translation.json").is_file()
    assert not list(DATA.glob("*.json")) and not (DATA / "bpe").exists()    # the shared data stays read-only


def test_translate_command_produces_output(two_rank_run, tmp_path):
    out, _ = two_rank_run
    src = _lines("test_2016_flickr", "de", 6)
    (tmp_path / "in.de").write_text("\n".join(src) + "\n")
    (tmp_path / "ref.en").write_text("\n".join(_lines("test_2016_flickr", "en", 6)) + "\n")
    r = subprocess.run([sys.executable, "-m", "tasks.translation", "translate", "--model", str(out / "hf_model"),
                        "--input", str(tmp_path / "in.de"), "--output", str(tmp_path / "hyp.en"), "--beam", "3",
                        "--reference", str(tmp_path / "ref.en")],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    hyps = (tmp_path / "hyp.en").read_text().splitlines()
    assert len(hyps) == 6 and all(h.strip() for h in hyps)
    score = json.loads([line for line in r.stderr.splitlines() if line.startswith("{")][-1])
    assert score["sentences"] == 6 and 0 <= score["bleu"] <= 100
    # in-process: the same model and batching reproduce the command's output (output order = input order even
    # though batches are length-sorted; the length limit a * longest source + b is per batch, as in fairseq)
    bundle = tr.load_bundle(str(out / "hf_model"))
    assert _seq2seq.generate_lines(bundle, src, 3, 1.0, 1.2, 10, batch_size=64) == hyps
    rev = _seq2seq.generate_lines(bundle, src[::-1], 3, 1.0, 1.2, 10, batch_size=64)
    assert rev[::-1] == hyps
    # beam 0: one line, exit 2
    r = subprocess.run([sys.executable, "-m", "tasks.translation", "translate", "--model", str(out / "hf_model"),
                        "--input", str(tmp_path / "in.de"), "--beam", "0"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--beam" in r.stderr


def test_vocabulary_mismatch_is_one_line(two_rank_run, tmp_path):
    out, _ = two_rank_run
    bad = tmp_path / "bad"
    shutil.copytree(out / "hf_model", bad)
    other = tr.train_bpe(_lines("train", "en", 300), 200)
    other.save(str(bad / "tokenizer.json"))
    with pytest.raises(ConfigError, match="vocabulary mismatch") as e:
        tr.load_bundle(str(bad))
    assert "\n" not in str(e.value)
    # resuming the run with other BPE settings is refused before any training
    r = subprocess.run([sys.executable, "-m", "engine.train", "--task", "translation", "--output_dir", str(out),
                        "--ds_config", "ds_configs/zero2.json", "--task.data_dir", str(DATA), "--task.model", "tiny",
                        "--task.vocab_size", "500", "--task.max_train_examples", "1200", "--optim.impl", "torch",
                        "--train.max_steps", "6", "--resume", "auto"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "vocabulary mismatch" in err[0]


def test_average_checkpoints(two_rank_run, tmp_path):
    out, _ = two_rank_run
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    root = str(out / "checkpoints")
    assert _seq2seq.checkpoint_tags(root, last=2) == ["global_step2", "global_step4"]
    r = subprocess.run([sys.executable, "-m", "tasks.translation", "average", "--checkpoints", root, "--last", "2",
                        "--output", str(tmp_path / "avg")], cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a = get_fp32_state_dict_from_zero_checkpoint(root, tag="global_step2")
    b = get_fp32_state_dict_from_zero_checkpoint(root, tag="global_step4")
    model = tr.load_bundle(str(tmp_path / "avg")).model
    sd = model.state_dict()
    key = "model.encoder.layers.0.fc1.weight"
    assert not torch.equal(a[key], b[key])
    assert torch.allclose(sd[key], (a[key] + b[key]) / 2, atol=1e-6)
    emb = "model.decoder.embed_tokens.weight"
    src_key = emb if emb in a else "model.encoder.embed_tokens.weight"
    assert torch.allclose(sd[emb], (a[src_key] + b[src_key]) / 2, atol=1e-6)
    assert model.model.decoder.output_projection.weight is model.model.decoder.embed_tokens.weight


def test_export_loads_with_auto_classes_and_decodes_like_the_tool(two_rank_run):
    """One documented line, no repository code: AutoTokenizer + AutoModelForSeq2SeqLM.  Per sentence with the
    run's cap (a * source length + b), the outputs equal the translate tool's (= the engine's decoding)."""
    out, _ = two_rank_run
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig
    d = str(out / "hf_model")
    tok, model = AutoTokenizer.from_pretrained(d), AutoModelForSeq2SeqLM.from_pretrained(d).eval()
    gen = GenerationConfig.from_pretrained(d)
    assert (gen.num_beams, gen.decoder_start_token_id, gen.eos_token_id) == (2, tr.EOS_ID, tr.EOS_ID)
    assert tok("ein Hund")["input_ids"][-1] == tr.EOS_ID and tok.pad_token_id == tr.PAD_ID
    for name in ("README.md", "export.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / "hf_model" / name).is_file()
    src = _lines("test_2016_flickr", "de", 4)
    bundle = tr.load_bundle(d)
    for s in src:
        enc = tok([s], return_tensors="pt")
        ids = model.generate(**enc, max_length=int(1.2 * enc["input_ids"].shape[1] + 10) + 2)
        assert tok.batch_decode(ids, skip_special_tokens=True)[0].strip() == \
            _seq2seq.generate_lines(bundle, [s], 2, 1.0, 1.2, 10, batch_size=1)[0]
    # the final metric is the score of the hypotheses file the run wrote
    ev = [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval"' in line][-1]
    hyps = (out / "predictions" / "val.hyp").read_text().splitlines()
    idx = _seq2seq.eval_subset(1014, 24)
    refs = [r.strip() for r in _lines("val", "en", 1014)]
    assert tr.bleu_scores(hyps, [refs[i] for i in idx])["bleu"] == pytest.approx(ev["bleu"], abs=1e-9)
