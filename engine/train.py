"""Entry point: ``python -m engine.train --task NAME --output_dir DIR --ds_config PATH [--section.field VALUE ...]``.

parse -> guard the output dir -> init the process group -> build -> train -> export -> close, always closing.

Exit status (README, "Failures"): 0 done; 2 bad input, divergence or a checkpoint that cannot be saved or loaded,
with one line on stderr (rank 0 only); 75 stopped on SIGTERM/SIGINT with a checkpoint of the last step saved
(requeue the job, it continues with --resume auto; engine/preempt.py); 128+N aborted by signal N; 1 anything
else, with the traceback.
"""
from __future__ import annotations

import errno
import os
import sys


def _fail(msg: str, code: int) -> int:
    from engine.distributed import env_rank
    if env_rank() == 0:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    return code


def guard_output_dir(cfg) -> None:
    """Never write into an existing run unless asked to continue it; the directory must be creatable and
    writable (checked on every rank, before anything is built)."""
    from engine.config import ConfigError
    from engine.preflight import check_output_dir, holds_a_run
    d = cfg.output_dir
    if os.path.exists(d) and not os.path.isdir(d):
        raise ConfigError(f"--output_dir {d} is a file: choose a directory path")
    if os.path.isdir(d) and holds_a_run(d) and not cfg.resume:
        raise ConfigError(f"--output_dir {d} already holds a run: pass --resume auto to continue it, "
                          "or choose a new --output_dir")
    check_output_dir(d)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from engine.config import ConfigError, help_text, parse_args
    if "-h" in argv or "--help" in argv:
        task_cls = None
        if "--task" in argv and argv.index("--task") + 1 < len(argv):
            from engine.task import get_task_class
            try:
                task_cls = get_task_class(argv[argv.index("--task") + 1]).Config
            except ConfigError:
                pass
        print(help_text(task_cls))
        return 0
    try:
        cfg = parse_args(argv)
        guard_output_dir(cfg)
    except ConfigError as e:
        return _fail(str(e), 2)
    from engine.distributed import env_rank
    from engine.preempt import EXIT_PREEMPTED, Preempted, Preemption
    preemption = Preemption(cfg.train.save_grace_s, env_rank()).install()

    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")   # what DeepSpeed detects anyway, minus its warning
    from engine import distributed as dist_utils
    from engine.trainer import Trainer
    dist_utils.set_threads(cfg.dist.omp_threads)
    dist_utils.pin_build_tools()                        # one ninja for every process: no op-cache rebuilds
    world, trainer, code = None, None, 1
    try:
        world = dist_utils.init(cfg.dist.timeout_s)
        import socket
        print(f"[engine] rank {world.rank}/{world.world_size} local_rank {world.local_rank} "
              f"node_rank {os.environ.get('CROSS_RANK') or os.environ.get('GROUP_RANK') or os.environ.get('NODE_RANK', '0')} "
              f"host {socket.gethostname()} pid {os.getpid()} backend {world.backend}", flush=True)
        trainer = Trainer(cfg, world, preemption)
        trainer.setup()
        metrics = trainer.fit()
        trainer.export()
        if world.is_main:
            tb = os.path.join(cfg.output_dir, "tensorboard")
            shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            print(f"[engine] done: {shown}", flush=True)
            print(f"[engine] metrics: {os.path.join(cfg.output_dir, 'metrics.jsonl')}", flush=True)
            if os.path.isdir(tb):
                print(f"[engine] TensorBoard logs: {tb}\n[engine] open them with: tensorboard --logdir {tb}",
                      flush=True)
        code = 0
    except Preempted as p:
        code = EXIT_PREEMPTED
        if world is not None and world.is_main:
            where = f"saved {p.saved}" if p.saved else "nothing new to save"
            print(f"[engine] stopped on {p.reason} after step {p.step}: {where}; exit {code}: requeue the job and "
                  "it continues with --resume auto", flush=True)
    except ConfigError as e:
        code = _fail(str(e), 2)
    except KeyboardInterrupt:
        code = 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        from engine.checkpoint import device_of
        code = _fail(f"no space left on {device_of(e.filename or cfg.output_dir)} ({e.filename}): free space and "
                     "continue with --resume auto", 2)
    except Exception as e:      # noqa: BLE001 - a peer that aborted on a second signal breaks our collectives
        if not preemption.requested:
            raise
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        code = _fail(f"stopped on {preemption.reason} before the checkpoint was saved ({type(e).__name__}: "
                     f"{first}); the previous checkpoint is intact, continue with --resume auto",
                     preemption.exit_code)
    finally:
        # On failure skip the final barrier: a crashed peer would leave it waiting for the timeout.
        if trainer is not None:
            trainer.close(clean=code in (0, EXIT_PREEMPTED))
        elif world is not None:
            dist_utils.shutdown(world, clean=False)
        preemption.uninstall()
    return code


if __name__ == "__main__":
    sys.exit(main())
