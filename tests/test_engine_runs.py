"""End-to-end runs of the real entry point with real ranks (gloo), real DeepSpeed engines and real data."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import TINY, load_weights, metrics, run

pytestmark = pytest.mark.dist

# ZeRO 0-3 and an offload config through the real `deepspeed` launcher, 2 ranks each. zero1 runs under torchrun
# instead (the other launcher users reach for) and its TensorBoard output is read back below; zero2 and
# zero2_offload use the default fused optimizers (FusedAdam, DeepSpeedCPUAdam: real JIT-built ops).
STAGE_CONFIGS = ["zero0", "zero1", "zero2", "zero3", "zero2_offload"]
LAUNCHER = {"zero1": "torchrun"}
FUSED = {"zero2", "zero2_offload"}
_losses: dict[str, list[float]] = {}
_outputs: dict = {}


def _stage_args():
    return ["--train.max_steps", "6", "--train.micro_batch_size", "8", "--eval.batch_size", "90",
            "--eval.every_steps", "3", "--task.max_eval_examples", "180", "--checkpoint.every_steps", "2",
            "--checkpoint.keep_last", "2"]


@pytest.mark.parametrize("name", STAGE_CONFIGS)
def test_two_ranks_every_zero_stage_and_offload(tmp_path, name):
    out = tmp_path / name
    args = [a for a in TINY if a not in ("--optim.impl", "torch")] if name in FUSED else TINY
    proc = run([*args, "--output_dir", str(out), "--ds_config", f"ds_configs/{name}.json", *_stage_args()],
               nproc=2, launcher=LAUNCHER.get(name, "deepspeed"))
    for r in (0, 1):
        assert f"rank {r}/2" in proc.stdout
    train = metrics(out)
    assert [r["step"] for r in train] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and r["consistency"] > 0 for r in train)
    assert all(r["grad_norm"] > 0 for r in train)
    ev = metrics(out, "eval")
    assert [r["step"] for r in ev] == [3, 6] and all(0.0 <= r["accuracy"] <= 1.0 for r in ev)
    assert (out / "checkpoints" / "global_step6").is_dir() and (out / "checkpoints" / "latest").read_text() == \
        "global_step6"
    best = max(ev, key=lambda r: r["accuracy"])
    assert (out / "checkpoints" / "best").is_dir()
    state = torch.load(next((out / "checkpoints" / "best").glob("*model_states.pt")), weights_only=False)
    assert state["best"] == pytest.approx(best["accuracy"]) and state["step"] == best["step"]
    resolved = json.loads((out / "config.json").read_text())["ds_config_resolved"]
    assert resolved["optimizer"]["params"]["torch_adam"] is (name not in FUSED)
    weights = load_weights(out)
    assert weights["classifier.weight"].shape == (10, 32) and weights["classifier.weight"].dtype == torch.float32
    assert all(torch.isfinite(w).all() for w in weights.values())
    _losses[name] = [r["loss"] for r in train]
    _outputs[name] = out


def test_zero_stages_train_identically():
    """fp32 ZeRO 0, 1, 2 and CPU offload are the same optimisation: the loss curves agree to float precision
    (fused and torch Adam included).  ZeRO-3 builds the model already partitioned (HF's zero.Init), which draws
    the random init differently, so only its finiteness is checked above."""
    if set(_losses) != set(STAGE_CONFIGS):
        pytest.fail(f"the per-stage runs above did not all complete: {sorted(_losses)}")
    for name in ("zero1", "zero2", "zero2_offload"):
        assert _losses[name] == pytest.approx(_losses["zero0"], rel=1e-4, abs=1e-5), name


def test_tensorboard_tags_read_back():
    """The zero1 run's TensorBoard file, read with TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    if "zero1" not in _outputs:
        pytest.fail("the zero1 run above did not complete")
    out = _outputs["zero1"]
    runs = list((out / "tensorboard").glob("*"))
    assert runs, "no TensorBoard run directory"
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {"Train/loss", "Train/nll", "Train/consistency", "Train/lr", "Train/grad_norm", "Train/samples_per_sec",
            "Train/units_per_sec", "Train/alpha", "Eval/accuracy", "Eval/loss", "Train/Samples/lr"}
    assert want <= tags, want - tags
    losses = acc.Scalars("Train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in metrics(out)], rel=1e-6)
    assert [e.step for e in acc.Scalars("Eval/accuracy")] == [3, 6]


def test_accumulation_equals_data_parallel_and_sgd_under_zero2_equals_zero0(tmp_path):
    """1 rank x accumulation 2 and 2 ranks x accumulation 1 take the same steps (dropout off), under ZeRO-0 and
    under ZeRO-2 (its own gradient accumulation buffers); with --optim.name sgd (momentum, weight decay), which
    DeepSpeed refuses under ZeRO 1-3 unless zero_allow_untested_optimizer is set."""
    def args(out, ds, accum):
        return [*TINY, "--output_dir", str(out), "--ds_config", f"ds_configs/{ds}.json", "--train.max_steps", "4",
                "--train.micro_batch_size", "8", "--train.grad_accum", str(accum), "--task.dropout", "0",
                "--rdrop.mode", "duplicate", "--optim.name", "sgd", "--optim.lr", "0.1", "--optim.momentum", "0.9",
                "--optim.weight_decay", "0.01", "--optim.schedule", "constant", "--task.max_eval_examples", "10"]
    run(args(tmp_path / "z0_acc", "zero0", 2), nproc=1)
    run(args(tmp_path / "z2_acc", "zero2", 2), nproc=1)
    run(args(tmp_path / "z2_dp", "zero2", 1), nproc=2, launcher="deepspeed")
    resolved = json.loads((tmp_path / "z2_dp" / "config.json").read_text())["ds_config_resolved"]
    assert resolved["zero_allow_untested_optimizer"] is True and resolved["optimizer"]["type"] == "SGD"
    ref = load_weights(tmp_path / "z2_dp")
    ref_loss = [r["loss"] for r in metrics(tmp_path / "z2_dp")]
    for other in ("z0_acc", "z2_acc"):
        w = load_weights(tmp_path / other)
        for k in ref:
            torch.testing.assert_close(w[k], ref[k], rtol=1e-5, atol=1e-6, msg=f"{other} {k}")
        assert [r["loss"] for r in metrics(tmp_path / other)] == pytest.approx(ref_loss, rel=1e-5), other


def test_reduction_is_sum_over_both_copies_over_units_of_one_copy(tmp_path):
    """One SGD step with accumulation 2 moves the weights by lr * grad(sum of losses of both copies of both
    micro-batches / examples of one copy), computed here by hand in plain PyTorch."""
    lr = 0.5
    out = tmp_path / "sgd"
    args = [*TINY, "--output_dir", str(out), "--ds_config", "ds_configs/zero0.json", "--train.max_steps", "1",
            "--train.micro_batch_size", "6", "--train.grad_accum", "2", "--task.dropout", "0",
            "--rdrop.mode", "duplicate", "--optim.name", "sgd", "--optim.momentum", "0", "--optim.lr", str(lr),
            "--optim.weight_decay", "0", "--optim.schedule", "constant", "--optim.warmup_steps", "0",
            "--task.max_eval_examples", "10", "--seed", "7"]
    run(args, nproc=1)
    from engine import data
    from engine import distributed as du
    from engine.config import parse_args
    from engine.ds_config import load, resolve
    from engine.task import get_task_class
    cfg = parse_args(args)
    task = get_task_class(cfg.task)(cfg)
    ds = resolve(load("ds_configs/zero0.json"), cfg, 1, "zero0", True)
    du.seed_everything(cfg.seed)
    model = task.build_model(ds)
    batches = data.TrainBatches(task, task.build_dataset("train"), 6, 2, 1, 0, cfg.seed)
    micro = [batches.collate(s) for s in batches.step_specs(0)]
    total = 0
    for b in micro:
        logits = model(pixel_values=torch.cat([b["pixel_values"]] * 2)).logits
        total = total + torch.nn.functional.cross_entropy(logits, torch.cat([b["labels"]] * 2), reduction="sum")
    (total / 12).backward()      # 12 = examples of ONE copy over both micro-batches
    expected = {n: (p - lr * p.grad).detach() for n, p in model.named_parameters()}
    from transformers import ViTForImageClassification
    got = dict(ViTForImageClassification.from_pretrained(str(out / "hf_model")).named_parameters())
    for n, w in expected.items():
        torch.testing.assert_close(got[n], w, rtol=1e-5, atol=1e-6, msg=n)


def test_resume_equals_uninterrupted_run(tmp_path):
    """The zero2 run above (fused Adam, R-Drop), stopped after step 3 (checkpoint) and resumed with --resume auto:
    losses and weights equal the straight run's."""
    if "zero2" not in _outputs:
        pytest.fail("the zero2 run above did not complete")
    full, part = _outputs["zero2"], tmp_path / "part"
    common = [a for a in TINY if a not in ("--optim.impl", "torch")] + ["--ds_config", "ds_configs/zero2.json",
                                                                       *_stage_args(), "--output_dir", str(part)]
    first = run([*common, "--train.stop_at_step", "3"], nproc=2, launcher="deepspeed")
    assert "stopped at step 3" in first.stdout
    assert (part / "checkpoints" / "latest").read_text() == "global_step3"
    # the resolved config travels with every checkpoint
    cfg = json.loads((part / "checkpoints" / "global_step3" / "config.json").read_text())
    assert cfg["ds_config_resolved"]["gradient_clipping"] == 0.0 and cfg["train"]["max_steps"] == 6
    second = run([*common, "--resume", "auto"], nproc=2, launcher="deepspeed")
    assert "resumed from" in second.stdout and "at step 3" in second.stdout
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == list(range(1, 7))               # one record per step, nothing doubled
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["consistency"] == rb["consistency"], (ra, rb)
    wa, wb = load_weights(full), load_weights(part)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # --checkpoint.keep_last 2 pruned the older step checkpoints
    assert sorted(p.name for p in (part / "checkpoints").glob("global_step*")) == ["global_step4", "global_step6"]


def test_no_launcher_world_of_one_and_bf16(tmp_path):
    out = tmp_path / "single"
    proc = run([*TINY, "--output_dir", str(out), "--ds_config", "ds_configs/zero2_bf16.json", "--train.max_steps",
                "3", "--train.micro_batch_size", "8", "--task.max_eval_examples", "50", "--log.every_steps", "2"],
               nproc=1, launcher="python")
    assert "rank 0/1" in proc.stdout
    assert [r["step"] for r in metrics(out)] == [2, 3]       # every 2 steps, and always the run's last step
    assert "accuracy" in metrics(out, "eval")[-1]
