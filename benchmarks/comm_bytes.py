"""Bytes each rank sends per optimizer step, per model preset and ZeRO stage: measured with DeepSpeed's comms
logger on a 2-rank loopback world and checked against the formula; then, from the formula, the expected step time
and scaling efficiency at 8, 64 and 512 GPUs on 100 and 400 Gb/s links, baseline and R-Drop.  docs/scaling.md
explains the numbers.

    python benchmarks/comm_bytes.py [--variants 0,1,2,3,1r,2r,2b,3b] [--accum 2] [--out bench_results/comm_bytes.json]
        runs `deepspeed --num_gpus 2 benchmarks/comm_bytes.py --worker --variant V ...` once per variant: the ZeRO
        stage's ds_configs/zeroN.json (b: zeroN_bf16.json; r: with "use_multi_rank_bucket_allreduce": false), filled
        by engine/ds_config.py, plus "comms_logger": {"enabled": true, "prof_all": true}; compares, projects
    python benchmarks/comm_bytes.py --project_only      the projection table from the formula alone

What a rank sends, for the ring algorithms NCCL and gloo use, with N ranks and an op of M bytes (the comms
logger records M: the tensor argument of all_reduce / reduce_scatter_tensor, the local shard of
all_gather_into_tensor):  all_reduce 2 (N-1)/N M,  reduce_scatter_tensor (N-1)/N M,  all_gather_into_tensor
(N-1) M_shard,  reduce / broadcast (N-1)/N M (a chain: every rank but the root sends M; the average).  Only collectives issued
through deepspeed.comm are logged: the engine's own per-step unit count (one float64 all-reduce through
torch.distributed) is not, and is negligible.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# measured on the 2-rank loopback world (small enough for 2 CPU ranks)
MEASURED = {"mt_tiny": ("mt", "tiny", 1000), "mt_iwslt": ("mt", "transformer_iwslt_de_en", 10000),
            "bart_tiny": ("bart", "bart_tiny", 1000), "bart_mini": ("bart", "bart_mini", 8000),
            "vit_small": ("vit", "small", 10)}
# projected from the formula (parameter counts from the models built on the meta device)
PROJECTED = {"transformer_iwslt_de_en (V 10k)": ("mt", "transformer_iwslt_de_en", 10000),
             "transformer_wmt_en_de_big (V 32k)": ("mt", "transformer_vaswani_wmt_en_de_big", 32000),
             "bart_base (V 50265)": ("bart", "bart_base", 50265),
             "bart_large (V 50265)": ("bart", "bart_large", 50265),
             "vit_b16 (CIFAR-100)": ("vit", "vit_b16", 100), "vit_l16 (CIFAR-100)": ("vit", "vit_l16", 100)}
# ring bytes sent per rank for an op whose logged size is M (see the module docstring)
RING = {"all_reduce": lambda m, n: 2 * (n - 1) / n * m, "reduce_scatter_tensor": lambda m, n: (n - 1) / n * m,
        "all_gather_into_tensor": lambda m, n: (n - 1) * m, "reduce_scatter": lambda m, n: (n - 1) / n * m,
        "all_gather": lambda m, n: (n - 1) * m, "broadcast": lambda m, n: (n - 1) / n * m,
        "reduce": lambda m, n: (n - 1) / n * m, "barrier": lambda m, n: 0}


def build(kind: str, preset: str, vocab: int, ds_config: dict):
    if kind == "mt":
        from models import transformer_mt as mt
        return mt.build(mt.make_config(preset, vocab, vocab, share_all_embeddings=True), ds_config)
    if kind == "bart":
        from models import bart
        return bart.build_bart(bart.bart_config(preset, vocab), ds_config)
    from models import vit
    return vit.build_vit(preset, vocab, ds_config, image_size=16 if preset in ("tiny", "small") else 0)


def batch(kind: str, model, vocab: int, rows: int = 2):
    import torch
    g = torch.Generator().manual_seed(0)
    if kind == "vit":
        c = model.config
        return {"pixel_values": torch.randn(rows, c.num_channels, c.image_size, c.image_size, generator=g)}, \
            torch.randint(0, vocab, (rows,), generator=g)
    ids = torch.randint(4, vocab, (rows, 12), generator=g)
    dec = torch.randint(4, vocab, (rows, 10), generator=g)
    return {"input_ids": ids, "attention_mask": ids.ne(1), "decoder_input_ids": dec, "use_cache": False}, \
        torch.randint(4, vocab, (rows, 10), generator=g)


def param_stats(model, threshold: int) -> dict:
    """Trainable parameters (what gradients and the optimizer cover) and, for ZeRO-3, the parameters gathered for
    every forward and backward: all partitioned ones (frozen included) above the persistence threshold."""
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    numels = [getattr(p, "ds_numel", p.numel()) for p in model.parameters()]
    gathered = sum(n for n in numels if n > threshold)
    return {"trainable": int(trainable), "all": int(sum(numels)), "gathered_z3": int(gathered)}


# -- the formula ----------------------------------------------------------------------------------------------
def formula_bytes(stage: int, p: dict, n: int, accum: int, grad_bytes: int = 4, param_bytes: int = 4,
                  bucket_allreduce: bool = True, reuse_distance: float = 1e9) -> dict:
    """Bytes one rank sends per optimizer step (ring algorithms), by collective, as DeepSpeed 0.19.8 does it.

    f = (N-1)/N; P = trainable parameters; P3 = parameters above stage3_param_persistence_threshold (frozen ones
    included: ZeRO-3 partitions and gathers every parameter); g = gradient accumulation steps; b = bytes/element.
    stage 0: the gradients all-reduced once per step (at the accumulation boundary):         2 f P b
    stage 1: all-reduced once per step, then the updated partitions all-gathered:          2 f P b + f P b
    stage 2: all-reduced at EVERY micro-step (gradients are partitioned as they are
             produced), the updated partitions all-gathered once:                        g 2 f P b + f P b
      ZeRO-1/2 "reduce" the gradients with all-reduce buckets (use_multi_rank_bucket_allreduce, true by
      default): every rank receives the full sum and keeps its partition.  With it false they are reduced to
      each partition's owner instead, f P b per reduction, as a reduce-scatter would (bucket_allreduce=False).
    stage 3: every micro-step gathers the parameters for forward (and again for backward when the model is larger
             than stage3_max_reuse_distance, 1e9 by default: below it they stay gathered) and reduce-scatters
             the gradients:                                                g (1 or 2) f P3 b + g f P b"""
    f = (n - 1) / n
    P, P3 = p["trainable"], p["gathered_z3"]
    red = (2 if bucket_allreduce else 1) * f * P * grad_bytes
    name = "all_reduce" if bucket_allreduce else "reduce"
    if stage == 0:
        return {"all_reduce": 2 * f * P * grad_bytes}
    if stage == 1:
        return {name: red, "all_gather": f * P * param_bytes}
    if stage == 2:
        return {name: accum * red, "all_gather": f * P * param_bytes}
    gathers = 1 if p["all"] < reuse_distance else 2
    return {"all_gather": accum * gathers * f * P3 * param_bytes, "reduce_scatter": accum * f * P * grad_bytes}


# -- the worker (one rank of the 2-rank world) --------------------------------------------------------------------
def worker(args) -> None:
    import torch
    import deepspeed
    from engine import distributed as du
    from engine.config import parse_args
    from engine.ds_config import load, resolve
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    du.set_threads(1)
    world = du.init()
    stage, bf16, no_mr = int(args.variant[0]), "b" in args.variant, "r" in args.variant
    path = str(ROOT / f"ds_configs/zero{stage}{'_bf16' if bf16 else ''}.json")
    cfg = parse_args(["--task", "image_classification", "--output_dir", tempfile.mkdtemp(), "--ds_config", path,
                      "--optim.impl", "torch", "--train.micro_batch_size", "2", "--train.grad_accum",
                      str(args.accum), "--log.tensorboard", "false"])
    ds = resolve(load(path), cfg, world.world_size, path, on_cpu=True)
    ds["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}
    if no_mr:
        ds["zero_optimization"]["use_multi_rank_bucket_allreduce"] = False
    threshold = int(ds["zero_optimization"].get("stage3_param_persistence_threshold", 10 ** 5))
    out = {}
    for name, (kind, preset, vocab) in MEASURED.items():
        if args.presets and name not in args.presets.split(","):
            continue
        du.seed_everything(0)
        model = build(kind, preset, vocab, ds)
        inputs, target = batch(kind, model, vocab)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad], config=ds)
        stats = param_stats(engine.module, threshold)

        def step():
            for _ in range(args.accum):
                logits = engine(**inputs).logits
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                         target.reshape(-1))
                engine.backward(loss)
                engine.step()
        step()                                          # warm-up: first-step set-up traffic is not per-step
        deepspeed.comm.comms_logger.reset_data()
        for _ in range(args.steps):
            step()
        raw = deepspeed.comm.comms_logger.get_raw_data()
        ops = {op: {str(size): rec[0] / args.steps for size, rec in sizes.items()} for op, sizes in raw.items()}
        out[name] = {"params": stats, "ops_per_step": ops, "preset": preset, "vocab": vocab}
        del engine, model
        gc.collect()
        unset_hf_deepspeed_config()
    if world.rank == 0:
        Path(args.out).write_text(json.dumps({"variant": args.variant, "stage": stage, "bf16": bf16,
                                              "bucket_allreduce": not no_mr, "world": world.world_size,
                                              "accum": args.accum,
                                              "threshold": threshold, "presets": out}, indent=2))
    du.shutdown(world)


def measured_bytes(ops: dict, n: int) -> dict:
    """Ring bytes per rank per step by collective, from the logged op sizes and counts."""
    by: dict = {}
    for op, sizes in ops.items():
        fn = RING.get(op)
        if fn is None:
            raise KeyError(f"collective {op} has no ring cost in RING")
        key = {"reduce_scatter_tensor": "reduce_scatter", "all_gather_into_tensor": "all_gather"}.get(op, op)
        by[key] = by.get(key, 0.0) + sum(fn(int(size), n) * count for size, count in sizes.items())
    return by


def collectives(ops: dict) -> float:
    return sum(c for sizes in ops.values() for c in sizes.values())


# -- the projection -----------------------------------------------------------------------------------------------
GPU_FLOPS = 312e12 * 0.4          # an A100's bf16 dense peak at 40% MFU
TOKENS_PER_GPU = {"mt": 4096, "bart": 4096, "vit": 32 * 197}    # fairseq --max-tokens 4096; ViT: 32 x 197 tokens
ALPHA_S = 5e-6                    # per-hop latency of a collective step


def meta_params(kind: str, preset: str, vocab: int) -> dict:
    import torch
    with torch.device("meta"):
        model = build(kind, preset, vocab, {})
    stats = param_stats(model, 10000)
    stats["collective_modules"] = sum(1 for m in model.modules()
                                      if any(p.numel() > 10000 for p in m.parameters(recurse=False)))
    return stats


VARIANTS = ("0", "1", "2", "2r", "3")


def project(p: dict, kind: str, variant: str, n: int, gbps: float, rdrop: bool, accum: int = 1,
            grad_bytes: int = 2, param_bytes: int = 2) -> dict:
    """Expected step time (s) and efficiency T_compute / (T_compute + T_comm), no overlap (overlap_comm false).
    variant: the ZeRO stage, + r for use_multi_rank_bucket_allreduce false."""
    stage, bucket_allreduce = int(variant[0]), "r" not in variant
    copies = 2 if rdrop else 1
    t_comp = accum * 6 * p["trainable"] * TOKENS_PER_GPU[kind] * copies / GPU_FLOPS
    if n == 1:
        return {"step_s": t_comp, "comm_s": 0.0, "compute_s": t_comp, "bytes": 0.0, "efficiency": 1.0}
    sent = sum(formula_bytes(stage, p, n, accum, grad_bytes, param_bytes, bucket_allreduce).values())
    # collectives per step: ~1 bucket each for ZeRO 0-2 (reduce: one per owner); ZeRO-3 gathers per module
    count = {0: 1, 1: 2 if bucket_allreduce else n + 1, 2: accum * (1 if bucket_allreduce else n) + 1,
             3: accum * (p["collective_modules"] + 1)}[stage]
    t_comm = sent * 8 / (gbps * 1e9) + count * 2 * math.ceil(math.log2(n)) * ALPHA_S
    return {"step_s": t_comp + t_comm, "comm_s": t_comm, "compute_s": t_comp, "bytes": sent,
            "efficiency": t_comp / (t_comp + t_comm)}


def projection_table() -> dict:
    table = {}
    for name, (kind, preset, vocab) in PROJECTED.items():
        p = meta_params(kind, preset, vocab)
        rows = {}
        for variant in VARIANTS:
            for gbps in (100, 400):
                for n in (8, 64, 512):
                    for rdrop in (False, True):
                        rows[f"z{variant}/{gbps}G/{n}/{'rdrop' if rdrop else 'base'}"] = project(
                            p, kind, variant, n, gbps, rdrop)
        table[name] = {"params": p, "rows": rows}
    return table


def print_projection(table: dict) -> None:
    print(f"\nprojection: bf16 on the wire, {TOKENS_PER_GPU['mt']} tokens per GPU per step (text; ViT 32 images), "
          f"{GPU_FLOPS / 1e12:.0f} TFLOP/s achieved per GPU, no overlap, accumulation 1.  Cells: scaling efficiency "
          "baseline / R-Drop, and R-Drop's step time over the baseline's (2.0 = no communication hidden)")
    print(f"{'preset':<34}{'ZeRO':>5}{'GB/rank':>9}  " + "".join(
        f"{f'{g}G n={n}':>18}" for g in (100, 400) for n in (8, 64, 512)))
    for name, t in table.items():
        for variant in VARIANTS:
            r = t["rows"]
            gb = r[f"z{variant}/100G/512/base"]["bytes"] / 1e9
            cells = []
            for g in (100, 400):
                for n in (8, 64, 512):
                    b, d = r[f"z{variant}/{g}G/{n}/base"], r[f"z{variant}/{g}G/{n}/rdrop"]
                    cells.append(f"{b['efficiency']:.2f}/{d['efficiency']:.2f} x{d['step_s'] / b['step_s']:.2f}")
            print(f"{name:<34}{variant:>5}{gb:>9.3f}  " + "".join(f"{c:>18}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="2", help=argparse.SUPPRESS)
    ap.add_argument("--variants", default="0,1,2,3,1r,2r,2b,3b",
                    help="ZeRO stage, + b: the bf16 config, + r: use_multi_rank_bucket_allreduce false")
    ap.add_argument("--presets", default="")
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--project_only", action="store_true")
    ap.add_argument("--out", default="bench_results/comm_bytes.json")
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        worker(args)
        return
    result: dict = {"measured": {}, "formula_check": {}}
    if not args.project_only:
        from tests.helpers import env, free_port
        for variant in args.variants.split(","):
            tmp = tempfile.mktemp(suffix=".json")
            port = free_port()
            cmd = [sys.executable, str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2",
                   "--master_port", str(port), str(Path(__file__).resolve()), "--worker", "--variant", variant,
                   "--accum", str(args.accum), "--steps", str(args.steps), "--out", tmp, "--presets", args.presets]
            print(f"ZeRO variant {variant}: {' '.join(cmd[1:])}", flush=True)
            proc = subprocess.run(cmd, cwd=ROOT, env=env(OMP_NUM_THREADS="1"), capture_output=True, text=True)
            for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
                f.unlink()
            if proc.returncode != 0:
                sys.exit(f"variant {variant} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
            res = json.loads(Path(tmp).read_text())
            result["measured"][variant] = res
            n, b = res["world"], 2 if res["bf16"] else 4
            for name, r in res["presets"].items():
                meas = measured_bytes(r["ops_per_step"], n)
                form = formula_bytes(res["stage"], r["params"], n, res["accum"], b, b, res["bucket_allreduce"])
                result["formula_check"][f"{name}/z{variant}"] = {
                    "measured": meas, "formula": form, "collectives_per_step": collectives(r["ops_per_step"]),
                    "ratio": sum(meas.values()) / max(sum(form.values()), 1.0)}
        print(f"\n{'preset/stage':<18}{'trainable':>12}{'measured MB':>13}{'formula MB':>12}{'ratio':>7}"
              f"{'colls/step':>11}  by collective (measured)")
        for key, c in result["formula_check"].items():
            name, variant = key.split("/z")
            params = result["measured"][variant]["presets"][name]["params"]["trainable"]
            print(f"{key:<18}{params:>12,}{sum(c['measured'].values()) / 2 ** 20:>13.3f}"
                  f"{sum(c['formula'].values()) / 2 ** 20:>12.3f}{c['ratio']:>7.3f}{c['collectives_per_step']:>11.0f}  "
                  + ", ".join(f"{k} {v / 2 ** 20:.3f}" for k, v in c["measured"].items()))
    result["projection"] = projection_table()
    print_projection(result["projection"])
    out = ROOT / args.out if not os.path.isabs(args.out) else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
