"""Step-time benchmark (prints a table and writes JSON).  Not a test: the numbers depend on the machine.

Two ratios, each measured side by side in one process, rounds interleaved so machine noise hits both sides:
  engine_over_plain      the engine's optimizer step (DeepSpeed ZeRO-2 engine, R-Drop hook in mode none, unit
                         counting and scaling) / a hand-written PyTorch loop (forward, CE, backward, AdamW step)
                         on the same model, the same batch and the same torch AdamW
  rdrop_over_double      an R-Drop step on B rows (doubled to 2B, KL) / a plain step on 2B distinct rows (no KL):
                         the paper's appendix C.1 reports about 1.1
  rdrop_over_duplicate   R-Drop / the duplicate ablation (same 2B rows, no KL): the cost of the KL term alone

    python benchmarks/step_time.py [--model small] [--batch 64] [--steps 30] [--rounds 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="ViT preset (tiny, small, vit_b16, ...)")
    ap.add_argument("--image_size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64, help="rows per step before R-Drop doubling")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round and side")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ds_config", default="ds_configs/zero2.json")
    ap.add_argument("--out", default="bench_results/step_time.json")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    import torch.nn.functional as F

    from engine import distributed as du
    from engine.config import parse_args
    from engine.trainer import Trainer

    threads = du.set_threads(0)
    world = du.init()

    def trainer(mode: str, batch: int) -> Trainer:
        cfg = parse_args(["--task", "image_classification", "--output_dir", f"/tmp/rdrop-bench-{os.getpid()}",
                          "--ds_config", str(ROOT / args.ds_config), "--task.model", args.model,
                          "--task.image_size", str(args.image_size), "--optim.impl", "torch",
                          "--rdrop.mode", mode, "--train.micro_batch_size", str(batch), "--train.max_steps", "1000",
                          "--log.tensorboard", "false", "--log.progress", "false", "--optim.warmup_steps", "0",
                          "--optim.schedule", "constant"])
        t = Trainer(cfg, world)
        t.setup()
        return t

    def batches(t: Trainer, n: int):
        return [[t.batches.collate(s) for s in t.batches.step_specs(i)] for i in range(n)]

    # the sides
    eng_none = trainer("none", args.batch)
    eng_rdrop = trainer("rdrop", args.batch)
    eng_dup = trainer("duplicate", args.batch)
    eng_double = trainer("none", 2 * args.batch)
    data_b = batches(eng_none, args.steps)
    data_2b = batches(eng_double, args.steps)

    torch.manual_seed(0)
    plain_model = eng_none.task.build_model({"zero_optimization": {"stage": 0}})
    plain_model.train()
    o = eng_none.cfg.optim
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay)

    def plain_step(group):
        for b in group:
            logits = plain_model(pixel_values=b["pixel_values"]).logits
            loss = F.cross_entropy(logits, b["labels"])
            loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def engine_step(t):
        return lambda group: t.train_step(group, t.alpha())

    sides = {"plain": (plain_step, data_b), "engine": (engine_step(eng_none), data_b),
             "rdrop": (engine_step(eng_rdrop), data_b), "duplicate": (engine_step(eng_dup), data_b),
             "double_batch": (engine_step(eng_double), data_2b)}
    times: dict[str, list[float]] = {k: [] for k in sides}
    for name, (fn, data) in sides.items():      # warm-up (allocator, kernels)
        for g in data[:3]:
            fn(g)
    for _ in range(args.rounds):
        for name, (fn, data) in sides.items():
            for g in data:
                t0 = time.perf_counter()
                fn(g)
                times[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    result = {
        "machine": {"threads": threads, "torch": torch.__version__, "cpu_count": os.cpu_count()},
        "setup": {"model": args.model, "image_size": args.image_size, "batch": args.batch, "steps": args.steps,
                  "rounds": args.rounds, "ds_config": args.ds_config},
        "median_ms_per_step": med,
        "engine_over_plain": med["engine"] / med["plain"],
        "rdrop_over_double": med["rdrop"] / med["double_batch"],
        "rdrop_over_duplicate": med["rdrop"] / med["duplicate"],
    }
    print(f"{'side':<14}{'ms/step (median)':>18}")
    for k, v in med.items():
        print(f"{k:<14}{v:>18.1f}")
    for k in ("engine_over_plain", "rdrop_over_double", "rdrop_over_duplicate"):
        print(f"{k:<22}{result[k]:.3f}")
    out = ROOT / args.out if not os.path.isabs(args.out) else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    for t in (eng_none, eng_rdrop, eng_dup, eng_double):
        t.engine = None
    du.shutdown(world)


if __name__ == "__main__":
    main()
