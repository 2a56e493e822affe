"""The fused token loss wired into the seq2seq tasks (translation on FSMT, summarization on BART), and activation
checkpointing with R-Drop:

- through each task's real forward (tiny presets, padded batches, label smoothing 0.1, dropout on): the fused R-Drop
  loss, its consistency term and every parameter gradient equal the unfused loss computed from the same model's
  logits with the same dropout masks; the evaluation loss pass too;
- ``--task.fused_loss auto`` switches at fused_loss.FUSED_MIN_VOCAB, true/false force it;
- short in-process engine runs (ZeRO-3, gradient accumulation 2, R-Drop) with the fused loss off, on, and on with
  ``--train.activation_checkpointing``: equal per-step losses, consistency and eval loss to float tolerance;
- activation checkpointing keeps the two R-Drop copies' masks distinct (consistency > 0) and the recomputation
  replays them (equal loss and gradients with and without it).
"""
from __future__ import annotations

import json

import pytest
import torch

from engine import fused_loss, rdrop
from engine.config import ConfigError, RunConfig
from engine.task import TaskOutput
from engine.trainer import enable_activation_checkpointing
from models import bart, transformer_mt as mt
from tasks import summarization as sm
from tasks import translation as tr
from tests.helpers import DATA, train_in_process, world  # noqa: F401 (world: a fixture)

MULTI30K, SAMSUM = DATA / "multi30k", DATA / "samsum"
V = 97                 # any vocabulary works fused; the forced flag is what these tests use


def close(a, b, rtol=1e-5, atol=1e-5, msg=None):
    """Equal to float tolerance, the absolute part relative to the reference's largest element."""
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol * max(1.0, b.abs().max().item()), msg=msg)


def _task(cls, cfg_cls, **kw):
    rc = RunConfig(task=cls.name, output_dir="/nonexistent", ds_config="x")
    rc.task_cfg = cfg_cls(label_smoothing=0.1, **kw)
    return cls(rc, None)


def _translation(fused="true"):
    task = _task(tr.Translation, tr.Config, fused_loss=fused)
    model = mt.build(mt.make_config("tiny", V, V, share_all_embeddings=False, share_decoder_input_output_embed=False,
                                    dropout=0.2), {})
    return task, model


def _summarization(fused="true"):
    task = _task(sm.Summarization, sm.Config, model="bart_tiny", fused_loss=fused)
    model = bart.build_bart(bart.bart_config("bart_tiny", V, dropout=0.2, attention_dropout=0.1), {})
    with torch.no_grad():                # BART's logits bias is zeros after init: make it count
        model.final_logits_bias.normal_()
    return task, model


def _batch(layout, seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    lo = 4
    pairs = [(torch.randint(lo, V, (int(torch.randint(3, 11, (1,), generator=g)),), generator=g).tolist(),
              torch.randint(lo, V, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist())
             for _ in range(n)]
    b = layout.collate(pairs)
    assert b["labels"].eq(layout.pad).any()                 # padded rows
    return b


def _unfused_output(task, model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                decoder_input_ids=batch["decoder_input_ids"], use_cache=False)
    return TaskOutput(out.logits, batch["labels"], batch["labels"].eq(task.layout.pad))


@pytest.mark.parametrize("make", [_translation, _summarization], ids=["translation", "summarization"])
@pytest.mark.parametrize("mode", ["rdrop", "fd", "duplicate", "none"])
def test_fused_equals_unfused_through_the_task_forward(make, mode):
    task, model = make()
    head = task.setup_fused_loss(model, V)
    assert head is not None and fused_loss.find(model) is head
    assert "fused_token_loss" not in "".join(model.state_dict())      # exports unchanged
    model.train()
    batch = _batch(task.layout)
    results = []
    for fused in (True, False):
        torch.manual_seed(7)                                          # the same dropout masks on both sides
        b = batch if mode == "none" else rdrop.double_batch(batch)
        out = task.forward(model, b) if fused else _unfused_output(task, model, b)
        assert out.fused == fused
        if mode == "none":
            nll, cons = task.loss(out), None
        else:
            nll, cons = task.rdrop_terms(out, rdrop.CONSISTENCY[mode])
        total = nll + (5.0 * cons if cons is not None else 0.0)
        model.zero_grad()
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((nll.detach(), None if cons is None else cons.detach(), grads))
    (fn, fc, fg), (un, uc, ug) = results
    torch.testing.assert_close(fn, un, rtol=1e-5, atol=1e-5)
    if mode in ("rdrop", "fd"):
        assert uc > 0                                                 # dropout made the copies differ
        torch.testing.assert_close(fc, uc, rtol=1e-4, atol=1e-6)
    assert fg.keys() == ug.keys() and len(fg) > 10
    scale = max(g.abs().max().item() for g in ug.values())   # k_proj.bias's true gradient is 0: float noise there
    for name in ug:
        torch.testing.assert_close(fg[name], ug[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("make", [_translation, _summarization], ids=["translation", "summarization"])
def test_fused_evaluation_loss_pass_equals_unfused(make):
    """tasks/_seq2seq.py's evaluate: per-example smoothed loss and plain NLL from chunks, no logits."""
    from engine import losses
    task, model = make()
    task.setup_fused_loss(model, V)
    model.eval()
    batch = _batch(task.layout, seed=3)
    with torch.no_grad():
        out = task.forward(model, batch)
        ref = _unfused_output(task, model, batch)
        rows, hits = out.head.token_nll(out.hidden, out.target, out.pad_mask, [0.1, 0.0], hits=True)
        rows = rows.sum(-1)
        # token accuracy: the same argmax matches as the full logits', never at padding
        want_hits = ref.logits.argmax(-1).eq(ref.target) & ~ref.pad_mask
        assert torch.equal(hits, want_hits) and ref.pad_mask.any()
        # and not vacuously (an untrained model may hit nothing): a target that IS the argmax is hit everywhere
        # but at padding
        top = torch.where(ref.pad_mask, ref.target, ref.logits.argmax(-1))
        _, all_hits = out.head.token_nll(out.hidden, top, out.pad_mask, [0.1, 0.0], hits=True)
        assert torch.equal(all_hits, ~ref.pad_mask)
        for k in range(batch["labels"].shape[0]):
            want = [losses.nll_loss(ref.logits[k], ref.target[k], ref.pad_mask[k], eps) for eps in (0.1, 0.0)]
            torch.testing.assert_close(rows[:, k], torch.stack(want), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.scores(), ref.logits, rtol=1e-5, atol=1e-5)


def test_fused_flag_auto_threshold_and_overrides():
    big, small = fused_loss.FUSED_MIN_VOCAB, fused_loss.FUSED_MIN_VOCAB - 1
    for cls, cfg in ((tr.Translation, tr.Config), (sm.Summarization, sm.Config)):
        auto = _task(cls, cfg)
        assert auto.cfg.fused_loss == "auto" and auto.fused_wanted(big) and not auto.fused_wanted(small)
        assert not _task(cls, cfg, fused_loss="false").fused_wanted(10 ** 6)
        assert _task(cls, cfg, fused_loss="true").fused_wanted(100)
    # auto on a real model: a tiny vocabulary stays unfused, a >= 8192 one is fused
    task, model = _translation("auto")
    assert task.setup_fused_loss(model, V) is None and fused_loss.find(model) is None
    task = _task(sm.Summarization, sm.Config, model="bart_tiny")
    model = bart.build_bart(bart.bart_config("bart_tiny", big), {})
    assert task.setup_fused_loss(model, big) is not None
    with pytest.raises(ConfigError, match="--task.fused_loss must be auto, true or false"):
        tr.Config(data_dir=str(MULTI30K), fused_loss="maybe").validate()


def test_minilm2minilm_stays_unfused_and_refuses_forced_fusion():
    task = _task(sm.Summarization, sm.Config, model="minilm2minilm")
    assert task.fused_head(object()) is None
    task._log = lambda msg: None
    assert task.setup_fused_loss(object(), 30522) is None
    forced = _task(sm.Summarization, sm.Config, model="minilm2minilm", fused_loss="true")
    with pytest.raises(ConfigError, match="no hidden-states path"):
        forced.setup_fused_loss(object(), 30522)


def test_models_use_sdpa_attention_where_supported():
    _, b = _summarization()
    assert b.config._attn_implementation == "sdpa"
    _, f = _translation()
    assert f.config._attn_implementation == "eager"       # FSMT has its own attention code only


# -- activation checkpointing with R-Drop -------------------------------------------------------------------
@pytest.mark.parametrize("make", [_translation, _summarization], ids=["translation", "summarization"])
def test_activation_checkpointing_keeps_and_replays_rdrop_masks(make):
    """The same seed with and without checkpointing: the two copies' masks differ (consistency > 0) and the
    recomputation in backward replays the forward's masks (equal loss and gradients; a recomputation with fresh
    masks would give different gradients)."""
    task, model = make()
    task.setup_fused_loss(model, V)
    batch = rdrop.double_batch(_batch(task.layout, seed=5))
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    results = []
    for ckpt in (False, True):
        if ckpt:
            enable_activation_checkpointing(model)
            assert layers and all(m.gradient_checkpointing for m in layers)
        model.train()
        torch.manual_seed(11)
        nll, cons = task.rdrop_terms(task.forward(model, batch), "kl")
        model.zero_grad()
        (nll + 5.0 * cons).backward()
        results.append((nll.item(), cons.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None}))
    (n0, c0, g0), (n1, c1, g1) = results
    assert c0 > 1e-4 and c1 == pytest.approx(c0, rel=1e-6) and n1 == pytest.approx(n0, rel=1e-6)
    for name in g0:
        close(g1[name], g0[name], msg=name)


def test_activation_checkpointing_flag_refuses_a_model_without_support():
    with pytest.raises(ConfigError, match="does not support activation checkpointing"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


# -- short engine runs, in process -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The first rows of Multi30k and SAMSum (train 400 / 200, validation 48): the runs' data, read fast."""
    import csv
    import gzip
    from tasks import _text
    if not (MULTI30K / "train.de.gz").is_file() or not (SAMSUM / "samsum-train.csv.gz").is_file():
        pytest.skip("../shared/data/multi30k or samsum not present")
    root = tmp_path_factory.mktemp("data")
    (root / "mt").mkdir()
    for split, n in (("train", 400), ("val", 48)):
        for lang in ("de", "en"):
            with gzip.open(MULTI30K / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
                lines = [next(f) for _ in range(n)]
            (root / "mt" / f"{split}.{lang}").write_text("".join(lines), encoding="utf-8")
    (root / "sum").mkdir()
    for split, n in (("train", 200), ("validation", 48)):
        t = _text.read_table(str(SAMSUM / f"samsum-{split}.csv.gz"), ["dialogue", "summary"])
        with open(root / "sum" / f"samsum-{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["dialogue", "summary"])
            w.writerows(zip(t["dialogue"][:n], t["summary"][:n]))
    return root


RUNS = {
    "translation": ["--task", "translation", "--task.data_dir", "{data}/mt", "--task.source_lang", "de",
                    "--task.target_lang", "en", "--task.model", "tiny", "--task.vocab_size", "500",
                    "--task.valid_split", "val", "--train.max_tokens", "300", "--rdrop.alpha", "5"],
    "summarization": ["--task", "summarization", "--task.data_dir", "{data}/sum", "--task.source_column", "dialogue",
                      "--task.model", "bart_tiny", "--task.vocab_size", "400", "--task.max_source_positions", "96",
                      "--task.max_target_positions", "24", "--train.max_tokens", "600", "--rdrop.alpha", "0.7"],
}


def _engine_run(world, data, tmp, task, fused, ckpt=False):
    out = tmp / f"{task}-{fused}-{ckpt}"
    args = [a.format(data=data) for a in RUNS[task]] + [
        "--output_dir", str(out), "--ds_config", "ds_configs/zero3.json", "--task.cache_dir", str(tmp / f"bpe-{task}"),
        "--task.fused_loss", fused, "--task.label_smoothing", "0.1", "--task.eval_generate", "false",
        "--train.max_steps", "3", "--train.grad_accum", "2", "--optim.impl", "torch", "--optim.lr", "2e-3",
        "--optim.warmup_steps", "2", "--log.every_steps", "1", "--log.progress", "false", "--log.tensorboard", "false",
        "--eval.batch_size", "16", "--checkpoint.save_best", "false",
        "--train.activation_checkpointing", str(ckpt).lower()]

    def attached(t):
        assert (fused_loss.find(t.engine) is not None) == (fused == "true")
    train_in_process(world, args, check=attached)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [r for r in records if r["kind"] == "train"], [r for r in records if r["kind"] == "eval"][-1]


@pytest.mark.parametrize("task", ["translation", "summarization"])
def test_engine_run_fused_on_off_and_checkpointed_are_equal(world, small_data, tmp_path, task):
    runs = {name: _engine_run(world, small_data, tmp_path, task, fused, ckpt)
            for name, (fused, ckpt) in {"unfused": ("false", False), "fused": ("true", False),
                                        "fused_ckpt": ("true", True)}.items()}
    ref_train, ref_eval = runs["unfused"]
    assert len(ref_train) == 3 and all(r["consistency"] > 0 for r in ref_train)
    for name in ("fused", "fused_ckpt"):
        train, ev = runs[name]
        for a, b in zip(train, ref_train):
            for key in ("loss", "nll", "consistency", "grad_norm"):
                assert a[key] == pytest.approx(b[key], rel=2e-4, abs=1e-6), (name, key, a, b)
        for key in ("loss", "nll"):
            assert ev[key] == pytest.approx(ref_eval[key], rel=1e-4), (name, key)
        # token accuracy from the chunked argmax equals the full logits' (a near-tie may flip one token)
        assert 0 <= ev["acc"] <= 1 and ev["acc"] == pytest.approx(ref_eval["acc"], abs=5e-3), (name, ev, ref_eval)
