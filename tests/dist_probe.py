"""A tiny stand-in trainer for the multi-node tests: real DeepSpeed, real ranks, seconds per run.

It follows the public contract of `engine.train` where the multi-node tests touch it (rank discovery
under every launcher, --output_dir with checkpoints/, --resume auto, universal checkpoints, one
line per rank on exit), so those tests exercise the launch paths without the cost of the real
task. Run as a module: `python -m tests.dist_probe --output_dir DIR [--steps N] ...`.

Every rank prints, once initialised:
    PROBE_START rank=R world=W local_rank=L node_rank=N pid=P
and on success:
    PROBE_DONE rank=R world=W step=S resumed_from=K loss=X
"""
import argparse
import gc
import json
import os
import sys
import time
from datetime import timedelta


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir", required=True)
    p.add_argument("--steps", type=int, default=4, help="train until this global step")
    p.add_argument("--save_every", type=int, default=2)
    p.add_argument("--step_sleep", type=float, default=0.0, help="seconds to sleep per step")
    p.add_argument("--resume", default="", help="'auto': load the latest checkpoint in output_dir/checkpoints")
    p.add_argument("--universal", action="store_true", help="load a universal checkpoint")
    p.add_argument("--zero_stage", type=int, default=2)
    p.add_argument("--timeout_s", type=int, default=60)
    p.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    import deepspeed
    import deepspeed.comm as dist

    # MPI discovery (mpirun without RANK/...) sets MASTER_PORT to its `distributed_port`: keep ours.
    deepspeed.init_distributed(dist_backend="gloo", distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
                               timeout=timedelta(seconds=args.timeout_s), verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"PROBE_START rank={rank} world={world} local_rank={os.environ.get('LOCAL_RANK')} "
          f"node_rank={os.environ.get('CROSS_RANK', '-')} mpi={int('OMPI_COMM_WORLD_SIZE' in os.environ)} "
          f"pid={os.getpid()}", flush=True)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.1), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4))
    ds_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": args.zero_stage},
    }
    if args.universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

    ckpt_dir = os.path.join(args.output_dir, "checkpoints")
    step = 0
    resumed_from = -1
    if args.resume == "auto" and os.path.isdir(ckpt_dir):
        load_path, client = engine.load_checkpoint(ckpt_dir)
        if load_path is None:
            raise SystemExit(f"rank {rank}: --resume auto found no loadable checkpoint in {ckpt_dir}")
        step = resumed_from = int(client["step"])

    loss = torch.tensor(0.0)
    while step < args.steps:
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(4, 16, generator=g)
        y = torch.randint(0, 4, (4, ), generator=g)
        loss = torch.nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        step += 1
        if args.save_every and step % args.save_every == 0:
            engine.save_checkpoint(ckpt_dir, tag=f"global_step{step}", client_state={"step": step})
            if rank == 0:
                with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss.item(), "world": world}) + "\n")
        if args.step_sleep:
            time.sleep(args.step_sleep)

    dist.barrier()
    print(f"PROBE_DONE rank={rank} world={world} step={step} resumed_from={resumed_from} "
          f"loss={loss.item():.6f}", flush=True)
    del engine
    gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
