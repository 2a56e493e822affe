"""Summarization task: BART layout, the masked loss, ROUGE and sentence splitting, BART parameter counts, data
errors, and one real 2-rank R-Drop run through the `deepspeed` launcher on SAMSum (tiny BART) that feeds the resume,
summarize and average tests."""
from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, RunConfig
from engine.task import TaskOutput
from models import bart
from tasks import _seq2seq
from tasks import summarization as sm
from tests.helpers import ROOT, env, free_port, load_weights, train_in_process, world  # noqa: F401 (world: a fixture)

DATA = ROOT.parent / "shared" / "data"
SAMSUM = DATA / "samsum"
XSUM = DATA / "xsum"
needs_data = pytest.mark.skipif(not (SAMSUM / "samsum-train.csv.gz").is_file(), reason="../shared/data/samsum absent")


def _task(tmp_path=None, **kw):
    rc = RunConfig(task="summarization", output_dir=str(tmp_path or "/nonexistent"), ds_config="x")
    rc.task_cfg = sm.Config(**kw)
    return sm.Summarization(rc, None)


# ------------------------------------------------------------------------------------------------ layout and loss

def test_collate_is_barts_layout():
    """<s> x </s> for the encoder, labels <s> y </s>, decoder input = labels shifted right after </s> -- exactly what
    HF's shift_tokens_right builds from the labels with decoder_start_token_id = </s>."""
    from transformers.models.bart.modeling_bart import shift_tokens_right
    b = sm.BART_LAYOUT.collate([([10, 11, 12], [20, 21]), ([13], [22, 23, 24])])
    assert b["input_ids"].tolist() == [[0, 10, 11, 12, 2], [0, 13, 2, 1, 1]]
    assert b["labels"].tolist() == [[0, 20, 21, 2, 1], [0, 22, 23, 24, 2]]
    assert b["decoder_input_ids"].tolist() == [[2, 0, 20, 21, 1], [2, 0, 22, 23, 24]]
    hf = shift_tokens_right(b["labels"], 1, 2)
    keep = b["labels"].ne(1)             # HF shifts the last eos into a padded position, whose label is ignored
    assert torch.equal(b["decoder_input_ids"][keep], hf[keep])
    assert b["attention_mask"].tolist() == [[True] * 5, [True, True, True, False, False]]
    assert sm.BART_LAYOUT.strip([2, 0, 20, 21, 2, 1, 1]) == [20, 21]          # generated row -> content ids


def test_loss_and_units_by_hand():
    task = _task(label_smoothing=0.1)
    logits = torch.tensor([[[1.0, 0.0, 2.0], [0.5, 0.5, 0.0], [3.0, 3.0, 3.0]]])
    labels = torch.tensor([[2, 0, 1]])                  # the last position is <pad> (id 1)
    out = TaskOutput(logits, labels, labels.eq(1))
    eps, V = 0.1, 3
    expected = 0.0
    for row, y in ((logits[0, 0], 2), (logits[0, 1], 0)):
        lp = row - torch.logsumexp(row, 0)
        expected += (1 - eps - eps / (V - 1)) * -lp[y] + eps / (V - 1) * -lp.sum()
    assert task.loss(out).item() == pytest.approx(expected.item(), rel=1e-6)
    assert task.num_units({"labels": labels}) == 2
    b = TaskOutput(logits.flip(-1), labels, labels.eq(1))
    kl = 0.0
    for k in range(2):
        p, q = logits[0, k].log_softmax(0), logits[0, k].flip(0).log_softmax(0)
        kl += ((p.exp() * (p - q)).sum() + (q.exp() * (q - p)).sum()) / 2
    assert task.consistency(out, b).item() == pytest.approx(kl.item(), rel=1e-5)   # pads masked


# ------------------------------------------------------------------------------------------------ ROUGE

def test_rouge_matches_rouge_score_and_scales_by_100():
    from rouge_score import rouge_scorer
    hyps = ["The cat sat on the mat. It was happy!", "Police arrested two men on Friday."]
    refs = ["A cat was sitting on the mat. The cat was happy.", "Two men were arrested by police."]
    got = sm.rouge_scores(hyps, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    split = [("A cat was sitting on the mat.\nThe cat was happy.", "The cat sat on the mat.\nIt was happy!"),
             ("Two men were arrested by police.", "Police arrested two men on Friday.")]
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        want = 100 * sum(scorer.score(r, h)[key].fmeasure for r, h in split) / 2
        assert got[key] == pytest.approx(want, abs=1e-9)
    assert got["rougeLsum"] != got["rougeL"]             # Lsum really works per sentence
    assert sm.rouge_scores(refs, refs)["rouge2"] == pytest.approx(100.0)
    assert 0 < got["rouge2"] < got["rouge1"] < 100


def test_sentence_splitting_for_rouge_lsum():
    assert sm.split_sentences("Hi there. How are you? Fine!") == ["Hi there.", "How are you?", "Fine!"]
    assert sm.split_sentences("Line one\nLine two. Two b") == ["Line one", "Line two.", "Two b"]
    assert sm.split_sentences("Mr.Smith paid 3.5 dollars.") == ["Mr.Smith paid 3.5 dollars."]   # no space: no split
    assert sm.split_sentences("") == []


# ------------------------------------------------------------------------------------------------ models

@pytest.mark.parametrize("preset", ["bart_base", "bart_large", "bart_small", "bart_tiny"])
def test_bart_parameter_counts_match_fairseq(preset):
    from transformers import BartForConditionalGeneration
    c = bart.bart_config(preset, 50265)
    with torch.device("meta"):
        model = BartForConditionalGeneration(c)
    assert sum(p.numel() for p in model.parameters()) == bart.fairseq_num_params(preset, 50265)
    assert model.lm_head.weight is model.model.shared.weight                  # tied output projection
    if preset == "bart_large":
        assert bart.fairseq_num_params(preset, 50265) == 406_291_456          # facebook/bart-large's count
    assert (c.dropout, c.attention_dropout, c.activation_function, c.max_position_embeddings) == \
        (0.1, 0.1, "gelu", 1024)


# ------------------------------------------------------------------------------------------------ data

@needs_data
def test_samsum_and_xsum_read_with_their_columns(tmp_path):
    task = _task(tmp_path, data_dir=str(SAMSUM), source_column="dialogue")
    src, tgt = task.raw("valid")
    assert len(src) == 818 and "\n" in src[0] and tgt[0]
    task = _task(tmp_path, data_dir=str(SAMSUM), source_column="dialogue")
    src, _ = task.raw("train")
    assert len(src) == 14731                                  # 14,732 rows, one with an empty dialogue dropped
    task = _task(tmp_path, data_dir=str(XSUM))
    assert len(task.raw("train")[0]) == 800 and len(task.raw("test")[0]) == 100


def test_bad_data_is_one_line(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.jsonl").write_text(json.dumps({"document": "a b c", "summary": "a"}) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"train.jsonl line 2: not valid JSON") as e:
        _task(tmp_path, data_dir=str(d)).raw("train")
    assert "\n" not in str(e.value)
    (d / "train.jsonl").write_text(json.dumps({"text": "a b c", "summary": "a"}) + "\n")
    with pytest.raises(ConfigError, match=r"no field 'document'.*column flag"):
        _task(tmp_path, data_dir=str(d)).raw("train")
    with pytest.raises(ConfigError, match=r"no validation file"):
        _task(tmp_path, data_dir=str(d)).raw("valid")
    with gzip.open(d / "x-test.csv.gz", "wb") as f:
        f.write("document,summary\nGr\xfc\xdfe,x\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not valid UTF-8 .*re-encode"):
        _task(tmp_path, data_dir=str(d)).raw("test")
    (d / "train.csv").write_text("document,summary\nsome text,\n,only a summary\nreal text,a summary\n")
    (d / "train.jsonl").unlink()
    src, tgt = _task(tmp_path, data_dir=str(d)).raw("train")  # empty sides dropped (and counted), no crash
    assert (src, tgt) == (["real text"], ["a summary"])
    for bad, match in [(dict(model="t5"), "preset"), (dict(model="minilm2minilm", pretrained="x"), "BART preset"),
                       (dict(long_train_examples="cut"), "drop or truncate"), (dict(beam=0), "beam")]:
        with pytest.raises(ConfigError, match=match):
            sm.Config(data_dir=str(d), **bad).validate()


@needs_data
def test_long_sources_are_truncated_and_counted(tmp_path, capsys):
    task = _task(tmp_path, data_dir=str(XSUM), max_train_examples=50, vocab_size=300, max_source_positions=64,
                 max_target_positions=16, cache_dir=str(tmp_path / "bpe"))
    task.prepare()
    ds = task.build_dataset("train")
    assert len(ds) == 50 and max(len(s) for s in ds.src_ids) == 62 and max(len(t) for t in ds.tgt_ids) <= 14
    assert "truncated" in capsys.readouterr().out
    sizes = task.example_sizes(ds)
    assert max(s for s, _ in sizes) == 64                      # <s> + 62 + </s>: within the model's positions


# ------------------------------------------------------------------------------------------------ a real run

ARGS = ["--task", "summarization", "--ds_config", "ds_configs/zero2.json", "--task.data_dir", str(SAMSUM),
        "--task.source_column", "dialogue", "--task.model", "bart_tiny", "--task.vocab_size", "500",
        "--task.max_train_examples", "600", "--task.max_source_positions", "128", "--task.max_target_positions",
        "32", "--task.final_gen_examples", "16", "--task.eval_gen_examples", "8", "--task.max_len_b", "12",
        "--task.beam", "2", "--train.max_tokens", "1024", "--optim.impl", "torch", "--optim.lr", "2e-3",
        "--optim.warmup_steps", "2", "--train.max_steps", "4", "--checkpoint.every_steps", "2",
        "--eval.every_steps", "2", "--log.every_steps", "1", "--log.progress", "false", "--eval.batch_size", "8",
        "--rdrop.alpha", "0.7", "--dist.omp_threads", "1"]


def _deepspeed(args, timeout=600):
    cmd = [sys.executable, str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
           str(free_port()), "--module", "engine.train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def samsum_run(tmp_path_factory):
    if not (SAMSUM / "samsum-train.csv.gz").is_file():
        pytest.skip("../shared/data/samsum not present")
    full = tmp_path_factory.mktemp("sum") / "full"
    r = _deepspeed(ARGS + ["--output_dir", str(full)])
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return full, r.stdout + r.stderr


def test_two_rank_rdrop_run_reports_rouge(samsum_run):
    full, log = samsum_run
    records = [json.loads(line) for line in open(full / "metrics.jsonl")]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(r["consistency"] > 0 for r in train)
    assert all(r["loss"] > r["nll"] and math.isfinite(r["loss"]) for r in train)
    assert [e["gen_examples"] for e in evals] == [8, 16]       # bounded during training, final subset at the end
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "nll", "ppl"):
        assert math.isfinite(evals[-1][key]) and evals[-1][key] >= 0
    assert all(0 <= e["acc"] <= 1 for e in evals)                # teacher-forced token accuracy
    assert log.count("trained BPE") == 1 and "token batches" in log
    cfg = json.load(open(full / "config.json"))
    assert cfg["world_size"] == 2 and cfg["rdrop"]["alpha"] == 0.7 and cfg["train"]["max_tokens"] == 1024
    hyp = (full / "predictions" / "validation.hyp").read_text().splitlines()
    assert len(hyp) == 16
    assert (full / "hf_model" / "summarization.json").is_file() and (full / "checkpoints" / "best").is_dir()


@needs_data
def test_resume_equals_uninterrupted_run(world, tmp_path):
    """The run above, stopped after step 2 as a preempted job would be and resumed: the same losses and weights as
    without the stop.  In process on one rank (the 2-rank launcher resume is tests/test_engine_runs.py's)."""
    args = ARGS + ["--eval.every_steps", "0", "--task.eval_generate", "false", "--task.cache_dir",
                   str(tmp_path / "bpe")]
    full, part = tmp_path / "full", tmp_path / "part"
    train_in_process(world, args + ["--output_dir", str(full)], export=True)
    train_in_process(world, args + ["--output_dir", str(part), "--train.stop_at_step", "2"])
    train_in_process(world, args + ["--output_dir", str(part), "--resume", "auto"], export=True)
    a = [r for r in map(json.loads, open(full / "metrics.jsonl")) if r["kind"] == "train"]
    b = [r for r in map(json.loads, open(part / "metrics.jsonl")) if r["kind"] == "train"]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["consistency"] == y["consistency"]
    wa, wb = load_weights(full), load_weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_summarize_command_on_the_export(samsum_run, tmp_path):
    full, _ = samsum_run
    r = subprocess.run([sys.executable, "-m", "tasks.summarization", "summarize", "--model", str(full / "hf_model"),
                        "--input", str(SAMSUM / "samsum-test.csv.gz"), "--column", "dialogue", "--reference_column",
                        "summary", "--output", str(tmp_path / "out.txt"), "--beam", "2", "--max_len_b", "8"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    out = (tmp_path / "out.txt").read_text().splitlines()
    assert len(out) == 819
    score = json.loads([line for line in r.stderr.splitlines() if line.startswith("{")][-1])
    assert set(score) >= {"rouge1", "rouge2", "rougeL", "rougeLsum"} and score["sentences"] == 819
    # in-process through the same bundle: same output for the first lines
    bundle = _seq2seq.load_bundle(sm.Summarization, str(full / "hf_model"))
    from tasks import _text
    docs = _text.read_table(str(SAMSUM / "samsum-test.csv.gz"), ["dialogue"])["dialogue"][:5]
    assert _seq2seq.generate_lines(bundle, docs, 2, 1.0, 0.0, 8) == out[:5]
    r = subprocess.run([sys.executable, "-m", "tasks.summarization", "summarize", "--model", str(full / "hf_model"),
                        "--input", str(SAMSUM / "samsum-test.csv.gz")],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--column" in r.stderr and r.stderr.strip().count("\n") == 0


def test_average_best_checkpoints_by_rouge(samsum_run, tmp_path):
    full, _ = samsum_run
    assert _seq2seq.checkpoint_tags(str(full / "checkpoints"), best=1, metric="rougeL")[0].startswith("global_step")
    r = subprocess.run([sys.executable, "-m", "tasks.summarization", "average", "--checkpoints",
                        str(full / "checkpoints"), "--last", "2", "--output", str(tmp_path / "avg")],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    model = _seq2seq.load_bundle(sm.Summarization, str(tmp_path / "avg")).model
    assert model.lm_head.weight is model.model.shared.weight
    avg = tmp_path / "avg"                    # a complete folder too: tokenizer, decoding settings, card
    assert (avg / "generation_config.json").is_file() and (avg / "tokenizer_config.json").is_file()
    assert "global_step2" in (avg / "README.md").read_text()
    assert json.loads((avg / "export.json").read_text())["weights"] == "average"


def test_export_loads_with_auto_classes_and_decodes_like_the_tool(samsum_run):
    full, _ = samsum_run
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    d = str(full / "hf_model")
    tok, model = AutoTokenizer.from_pretrained(d), AutoModelForSeq2SeqLM.from_pretrained(d).eval()
    ids = tok("Anna: hi\nBen: hello")["input_ids"]
    assert (ids[0], ids[-1]) == (0, 2)                            # <s> ... </s>, BART's source layout
    assert "Anna" in tok.decode(ids, skip_special_tokens=True)    # byte-level BPE round trip
    from tasks import _text
    docs = _text.read_table(str(SAMSUM / "samsum-validation.csv.gz"), ["dialogue"])["dialogue"][:3]
    bundle = _seq2seq.load_bundle(sm.Summarization, d)
    for doc in docs:
        enc = tok([doc], return_tensors="pt", truncation=True)
        auto = tok.batch_decode(model.generate(**enc, max_length=14), skip_special_tokens=True)[0].strip()
        assert auto == _seq2seq.generate_lines(bundle, [doc], 2, 1.0, 0.0, 12, batch_size=1)[0]
    assert (full / "best_model" / "generation_config.json").is_file()


# ------------------------------------------------------------------------------------------------ denoising (BART)

@pytest.mark.parametrize("seed", range(12))
def test_text_infilling_masks_exactly_the_budget_in_spans(seed):
    """Each masked span becomes one <mask>, spans of length 0 insert one, the kept tokens stay in order, and exactly
    round(ratio * n) tokens are masked."""
    import numpy as np
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    ids = list(range(100, 100 + n))                      # distinct ids: where each kept token came from is known
    out = sm.text_infilling(ids, 4, 0.3, 3.0, rng)
    kept = [i for i in out if i != 4]
    assert kept == sorted(kept) and set(kept) <= set(ids)
    assert n - len(kept) == round(0.3 * n)
    prev, masks = 99, 0                                  # every gap in the kept tokens sits behind >= 1 mask
    for tok in out + [100 + n]:
        if tok == 4:
            masks += 1
            continue
        assert tok == prev + 1 or masks > 0, (prev, tok, out)
        prev, masks = tok, 0
    if round(0.3 * n):
        assert 4 in out
    short = ids[:40]                                     # a budget that rounds to 0 masks nothing
    assert sm.text_infilling(short, 4, 0.01, 3.0, rng) == short


@needs_data
def test_denoise_pairs_are_noised_documents(tmp_path):
    kw = dict(data_dir=str(SAMSUM), source_column="dialogue", target_column="summary", objective="denoise",
              max_train_examples=40, vocab_size=400, max_target_positions=64, cache_dir=str(tmp_path / "bpe"))
    tasks = []
    for seed in (1, 2):
        t = _task(tmp_path, **kw)
        t.run_cfg.seed = seed
        t.cfg.validate()
        t.prepare()
        tasks.append(t)
    a, b = tasks
    assert a.metric == "nll" and a.metric_mode == "min" and not a.cfg.eval_generate
    assert sm.Summarization.metric == "rougeL"          # the class's own (the average tool's --best)
    mask = a.tokenizers()[0].token_to_id("<mask>")
    assert mask == 4 and a.special_tokens()["mask_token"] == "<mask>"
    train = a.build_dataset("train")
    docs = [x[:62] for x in _text_ids(a, a.raw("train")[0])]
    assert train.tgt_ids == docs and train.tgt_text == a.raw("train")[0]     # targets: the documents themselves
    for src, doc in zip(train.src_ids, docs):
        assert mask in src and [i for i in src if i != mask] != doc
        assert len(doc) - len([i for i in src if i != mask]) == round(0.3 * len(doc))
    # training noise follows the run's seed; validation noise does not (its loss compares across runs)
    assert b.build_dataset("train").src_ids != train.src_ids
    assert b.build_dataset("valid").src_ids == a.build_dataset("valid").src_ids
    summ = _task(tmp_path, **{**kw, "objective": "summarize"})
    assert summ.metric == "rougeL" and summ.build_dataset("train").tgt_ids != train.tgt_ids


def _text_ids(task, texts):
    from tasks import _text
    return _text.encode(task.tokenizers()[0], texts)


@needs_data
def test_denoise_pretraining_then_summarization_from_its_export(world, tmp_path):  # noqa: F811 (fixture)
    """Stage 1 pretrains a tiny BART by text infilling and exports it; stage 2 fine-tunes it for summaries with
    --task.pretrained: the weights it starts from are the export's, and it uses the export's tokenizer."""
    common = ["--task", "summarization", "--ds_config", "ds_configs/zero2.json", "--task.data_dir", str(SAMSUM),
              "--task.source_column", "dialogue", "--task.max_train_examples", "200", "--train.max_tokens", "1024",
              "--optim.impl", "torch", "--optim.warmup_steps", "1", "--train.max_steps", "3", "--log.every_steps", "1",
              "--log.progress", "false", "--log.tensorboard", "false", "--dist.omp_threads", "1",
              "--task.max_source_positions", "128", "--task.max_target_positions", "64", "--eval.batch_size", "8",
              "--task.final_gen_examples", "4", "--task.max_len_b", "8", "--task.beam", "1"]
    pre = tmp_path / "pre"
    final = train_in_process(world, common + ["--output_dir", str(pre), "--task.objective", "denoise",
                                              "--task.model", "bart_tiny", "--task.vocab_size", "500",
                                              "--rdrop.mode", "none"], export=True)
    assert final["split"] == "valid" and math.isfinite(final["nll"]) and "rougeL" not in final
    exported = load_weights(pre)
    tok = json.loads((pre / "hf_model" / "tokenizer_config.json").read_text())
    assert tok["mask_token"] == "<mask>"

    def starts_from_export(trainer):
        sd = trainer.engine.module.state_dict()
        for k, v in exported.items():
            assert torch.equal(sd[k], v), k

    out = tmp_path / "ft"
    final = train_in_process(world, common + ["--output_dir", str(out), "--task.model", "bart_tiny",
                                              "--task.pretrained", str(pre / "hf_model"), "--rdrop.alpha", "0.7"],
                             check=starts_from_export)
    assert "rougeL" in final and final["gen_examples"] == 4
    with pytest.raises(ConfigError, match="not a bart_mini"):
        train_in_process(world, common + ["--output_dir", str(tmp_path / "bad"), "--task.model", "bart_mini",
                                          "--task.pretrained", str(pre / "hf_model")])


# ------------------------------------------------------------------------------------------------ copy mechanism

def _copy_model(vocab=300, seed=0):
    torch.manual_seed(seed)
    return bart.build_bart(bart.bart_config("bart_tiny", vocab, max_positions=64, copy=True),
                           {"zero_optimization": {"stage": 0}}).eval()


def test_copy_mixture_by_hand():
    """log p = log(g * softmax(lm_head h + bias) + (1 - g) * scatter(attention over real source positions))."""
    m = _copy_model()
    x = torch.tensor([[0, 17, 42, 17, 2, 1, 1]])                     # 17 twice, two pads
    with torch.no_grad():
        out = m(input_ids=x, attention_mask=x.ne(1), decoder_input_ids=torch.tensor([[2, 0, 17]]))
        enc = m.model.encoder(input_ids=x, attention_mask=x.ne(1)).last_hidden_state
        h = m.model(input_ids=x, attention_mask=x.ne(1), decoder_input_ids=torch.tensor([[2, 0, 17]])).last_hidden_state
    p = out.logits.exp()
    assert torch.allclose(p.sum(-1), torch.ones(1, 3), atol=1e-5)
    t = 1
    q, k = m.copy_query(h[0, t]), m.copy_key(enc[0, :5])                # the pads take no attention
    a = torch.softmax(q @ k.T / math.sqrt(q.shape[0]), -1)
    g = torch.sigmoid(m.copy_gate(torch.cat([h[0, t], a @ enc[0, :5]])))
    vocab = torch.softmax(m.lm_head(h[0, t]) + m.final_logits_bias[0], -1)
    expect = g * vocab
    for s, tok in enumerate(x[0, :5].tolist()):
        expect[tok] += (1 - g[0]) * a[s]
    assert torch.allclose(p[0, t], expect, atol=1e-6)
    with torch.no_grad():                                          # gate closed: all mass on the source's tokens
        m.copy_gate.bias.fill_(-1e4)
        p = m(input_ids=x, attention_mask=x.ne(1), decoder_input_ids=torch.tensor([[2, 0]])).logits.exp()
    assert torch.allclose(p[..., [0, 2, 17, 42]].sum(-1), torch.ones(1, 2), atol=1e-5) and p[..., 1].max() < 1e-6


def test_copy_model_generates_with_its_cache_and_loads_outside_the_repo(tmp_path):
    m = _copy_model()
    x = torch.randint(5, 300, (3, 12))
    x[2, 8:] = 1
    kw = dict(num_beams=1, do_sample=False, max_length=8, min_length=8, decoder_start_token_id=2, eos_token_id=2,
              pad_token_id=1, bos_token_id=0)
    with torch.no_grad():
        fast = m.generate(input_ids=x, attention_mask=x.ne(1), **kw)
        dec = torch.full((3, 1), 2)
        for _ in range(7):                                         # the same greedy search, recomputing everything
            lp = m(input_ids=x, attention_mask=x.ne(1), decoder_input_ids=dec, use_cache=False).logits[:, -1]
            lp[:, 2] = -1e9                                        # min_length
            dec = torch.cat([dec, lp.argmax(-1, keepdim=True)], 1)
        beams = m.generate(input_ids=x, attention_mask=x.ne(1), **{**kw, "num_beams": 3})
    assert fast.tolist() == dec.tolist()
    m.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "bart_copy.py").is_file()
    code = (f"import torch\nfrom transformers import AutoModelForSeq2SeqLM\n"
            f"m = AutoModelForSeq2SeqLM.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True).eval()\n"
            f"x = torch.tensor({x.tolist()})\n"
            f"print(m.generate(input_ids=x, attention_mask=x.ne(1), **{ {**kw, 'num_beams': 3} !r}).tolist())")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == beams.tolist()


@needs_data
def test_copy_model_trains_with_rdrop_and_its_export_summarizes(world, tmp_path):  # noqa: F811 (fixture)
    out = tmp_path / "copy"
    args = ["--task", "summarization", "--ds_config", "ds_configs/zero2.json", "--task.data_dir", str(SAMSUM),
            "--task.source_column", "dialogue", "--task.max_train_examples", "200", "--train.max_tokens", "1024",
            "--optim.impl", "torch", "--optim.warmup_steps", "1", "--train.max_steps", "3", "--log.every_steps", "1",
            "--log.progress", "false", "--log.tensorboard", "false", "--dist.omp_threads", "1",
            "--task.max_source_positions", "128", "--task.max_target_positions", "32", "--eval.batch_size", "8",
            "--task.final_gen_examples", "6", "--task.max_len_b", "8", "--task.beam", "2", "--task.model",
            "bart_tiny", "--task.vocab_size", "500", "--task.copy", "true", "--rdrop.alpha", "0.7",
            "--output_dir", str(out)]
    final = train_in_process(world, args, export=True)
    train = [json.loads(line) for line in open(out / "metrics.jsonl") if '"train"' in line]
    assert [r["step"] for r in train] == [1, 2, 3] and all(r["consistency"] > 0 for r in train)
    assert math.isfinite(final["rougeL"]) and final["gen_examples"] == 6
    cfg = json.loads((out / "hf_model" / "config.json").read_text())
    assert cfg["model_type"] == "bart_copy" and "auto_map" in cfg
    assert (out / "hf_model" / "bart_copy.py").is_file()
    with open(out / "predictions" / "validation.hyp", encoding="utf-8", newline="") as f:
        hyps = f.read().split("\n")[:-1]                                  # one per line (a hypothesis may hold \r)
    table = _text_table(SAMSUM / "samsum-validation.csv.gz")
    docs = [table[i] for i in _seq2seq.eval_subset(len(table), 6)]        # the final evaluation's seeded subset
    bundle = _seq2seq.load_bundle(sm.Summarization, str(out / "hf_model"))
    assert type(bundle.model).__name__ == "BartCopyForConditionalGeneration"
    tool = [h.replace("\n", " ") for h in _seq2seq.generate_lines(bundle, docs, 2, 1.0, 0.0, 8)]
    assert tool == hyps                                                     # the export decodes like the engine
    # the card's code, as written, in a fresh Python outside this repository
    usage = json.loads((out / "hf_model" / "export.json").read_text())["usage"].replace("{path}",
                                                                                      str(out / "hf_model"))
    code = usage.split("```python", 1)[1].split("```", 1)[0]
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(), capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "trust_remote_code=True" in code, r.stderr[-2000:]
    assert r.stdout.strip().startswith("[") and "Do you wish" not in r.stdout + r.stderr
    with pytest.raises(ConfigError, match="copy"):
        sm.Config(data_dir=str(SAMSUM), model="minilm2minilm", copy=True).validate()


def _text_table(path):
    from tasks import _text
    return _text.read_table(str(path), ["dialogue"])["dialogue"]
