"""The trainer: the one deepspeed.initialize, the micro-step loop, evaluation, checkpoints.  Read top to bottom.

Per optimizer step every rank takes its ``grad_accum`` micro-batches, counts their units (one copy, before R-Drop
doubles anything), and one all-reduce gives the units of the whole step.  Each micro-batch's SUMMED loss is then
scaled by ``accum * world / units`` before ``engine.backward``: DeepSpeed divides by ``accum`` and averages over
ranks, so the gradient is exactly d(sum of all losses)/(units of one copy) -- the reduction stated in
engine/rdrop.py -- whatever the accumulation and world size.  DeepSpeed owns accumulation (engine.step() is called
every micro-step and only updates at the boundary).
"""
from __future__ import annotations

import math
import os
import time

import deepspeed
import torch

from engine import checkpoint, data, ds_config as dsc, preflight, schedules
from engine import export as hf_export
from engine import distributed as dist_utils
from engine.config import ConfigError, RunConfig, dumps
from engine.guard import StepGuard
from engine.preempt import Preempted
from engine.monitor import Monitor
from engine.rdrop import rdrop_loss
from engine.task import model_has_active_dropout


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Checkpoint every layer of an HF model (``activation_checkpointing_enable``, transformers >= 5) with
    torch.utils.checkpoint(use_reentrant=False): the forward keeps only each layer's inputs and backward recomputes
    the layer.  torch restores the RNG state for the recomputation (preserve_rng_state), so dropout replays the
    masks of the forward: under R-Drop the two copies ([x; x] in one batch) keep their distinct masks and the
    gradients equal those without checkpointing (tests/test_seq2seq_fused.py; the DeepSpeed#6811 concern)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"--train.activation_checkpointing: {type(model).__name__} does not support activation "
                          "checkpointing: drop the flag")
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:                                    # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def param_groups(model: torch.nn.Module, optim_cfg) -> list[dict]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not optim_cfg.no_decay_bias_norm or optim_cfg.weight_decay == 0:
        return [{"params": [p for _, p in params]}]
    def exempt(name, p):   # biases and norm weights; ZeRO-3 partitioned params keep their shape in ds_shape
        return len(getattr(p, "ds_shape", p.shape)) < 2 or "norm" in name.lower()
    return [{"params": [p for n, p in params if not exempt(n, p)]},
            {"params": [p for n, p in params if exempt(n, p)], "weight_decay": 0.0}]


class EvalContext:
    """What Task.evaluate gets: the engine (call it like the model) and the evaluation services a task needs, so
    that no task reaches into the trainer:

    - ``batches(split)`` / ``gather_eval(split)``: one ordinary pass over a split sharded over ranks, results back
      in dataset order;
    - ``shard(indices)``: this rank's share of a list of example indices (every rank gets the same number, which
      ZeRO-3 needs), ``gather(local, n)`` for tensors and ``gather_objects(obj)`` for any picklable per-rank dict;
    - ``generate(**inputs)``: HF ``generate`` on the unwrapped module, with ZeRO-3's synchronised generation
      (``synced_gpus``: every rank keeps stepping until all finished, so parameter gathers stay matched) handled
      here, as HF's Seq2SeqTrainer does;
    - ``step``, ``final`` (the run's last evaluation: where tasks write prediction files and score whole splits),
      ``output_dir``, ``world``, ``device``.
    """

    step: int = 0
    final: bool = False

    def __init__(self, trainer: "Trainer"):
        self._trainer = trainer
        self.task = trainer.task
        self.world = trainer.world
        self.model = trainer.engine
        self.device = trainer.world.device
        self.output_dir = trainer.cfg.output_dir
        self.batch_size = trainer.cfg.eval.batch_size
        self.zero_stage = trainer.stage
        self._num_workers = trainer.cfg.train.num_workers

    @property
    def module(self) -> torch.nn.Module:
        """The bare model (the engine's module), e.g. for HF ``generate``."""
        return self.model.module if hasattr(self.model, "module") else self.model

    def dataset(self, split: str):
        return self._trainer.dataset(split)

    def shard(self, indices: list[int]) -> list[int]:
        """Rank r takes positions r, r + W, ... of ``indices`` padded (by wrapping) to a multiple of W."""
        W, n = self.world.world_size, len(indices)
        if n == 0:
            return []
        padded = -(-n // W) * W
        return [indices[i % n] for i in range(self.world.rank, padded, W)]

    def batches(self, split: str):
        """This rank's eval batches (on device) in shard order; ``gather`` puts the results back in order."""
        ds = self.dataset(split)
        specs, _ = data.eval_specs(len(ds), self.batch_size, self.world.world_size, self.world.rank)
        collate = lambda spec: self.task.collate([ds[i] for i in spec.indices], None)  # noqa: E731
        for batch in data.loader(specs, collate, self._num_workers):
            yield to_device(batch, self.device)

    def gather(self, local: dict[str, list], n: int) -> dict[str, torch.Tensor]:
        """Interleave per-rank results (rank r holds examples r, r+W, ...) back into dataset order, first n."""
        cat = {k: torch.cat(v) if v else torch.empty(0) for k, v in local.items()}
        if self.world.world_size == 1:
            return {k: v[:n] for k, v in cat.items()}
        parts = [None] * self.world.world_size
        torch.distributed.all_gather_object(parts, cat)
        out = {}
        for k in cat:
            stacked = torch.stack([p[k] for p in parts], dim=1)  # [per_rank, W, ...]
            out[k] = stacked.reshape(-1, *stacked.shape[2:])[:n]
        return out

    def gather_objects(self, obj: dict) -> dict:
        """Every rank's dict merged into one (on every rank); later ranks win on equal keys."""
        if self.world.world_size == 1:
            return dict(obj)
        parts = [None] * self.world.world_size
        torch.distributed.all_gather_object(parts, obj)
        merged: dict = {}
        for p in parts:
            merged.update(p)
        return merged

    @torch.no_grad()
    def generate(self, **kwargs) -> torch.Tensor:
        """``module.generate(**kwargs)``; under ZeRO-3 with several ranks, synchronised so that a rank that
        finishes early keeps joining the parameter gathers of the others."""
        synced = self.world.world_size > 1 and self.zero_stage == 3
        return self.module.generate(synced_gpus=synced, **kwargs)

    @torch.no_grad()
    def gather_eval(self, split: str) -> dict[str, torch.Tensor]:
        """One ordinary pass (no R-Drop) over ``split``: Task.eval_step per batch, gathered in dataset order."""
        local: dict[str, list] = {}
        for batch in self.batches(split):
            out = self.task.forward(self.model, batch)
            for k, v in self.task.eval_step(out, batch).items():
                local.setdefault(k, []).append(v.detach().float().cpu() if v.is_floating_point() else v.cpu())
        return self.gather(local, len(self.dataset(split)))


class Trainer:
    def __init__(self, cfg: RunConfig, world: dist_utils.World, preemption=None):
        self.cfg, self.world = cfg, world
        self.preemption = preemption                  # engine/preempt.py: read once per step by the guard
        self.last_saved_step = -1
        self.task = cfg.task_class(cfg, world)
        self.engine = None
        self._datasets: dict = {}
        self.best = None
        self.start_step = 0
        self.train_seconds = 0.0      # wall seconds in training steps (no eval, no saving), summed over resumes
        self.evaluated_step = -1      # the last step evaluated (a preemption save can come before its evaluation)
        self.eval_owed = False        # resumed from a preemption save of an evaluation step that was not evaluated
        self.final_metrics: dict = {}
        self._stats: dict[str, list[float]] = {}     # Task.batch_stats sums over the current log interval

    def dataset(self, split: str):
        if split not in self._datasets:
            self._datasets[split] = self.task.build_dataset(split)
        return self._datasets[split]

    # ------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, world = self.cfg, self.world
        on_cpu = world.device.type == "cpu"
        self.ds = dsc.resolve(dsc.load(cfg.ds_config), cfg, world.world_size, cfg.ds_config, on_cpu)
        preflight.check_ds_config(self.ds, cfg.ds_config)
        preflight.check_shared_output_dir(cfg.output_dir, world)
        self.eval_split = cfg.eval.split or self.task.default_eval_split

        # once-per-run preparation (BPE training, vocabularies): rank 0 first, the others then load its output
        if world.is_main:
            self.task.prepare()
        dist_utils.barrier()
        if not world.is_main:
            self.task.prepare()
        self.task.check_data(["train", self.eval_split], self.dataset)   # every split the run reads, up front
        dist_utils.seed_everything(cfg.seed)            # identical initial weights on every rank
        model = self.task.build_model(self.ds)
        if cfg.train.activation_checkpointing:
            enable_activation_checkpointing(model)
        if cfg.rdrop.mode in ("rdrop", "fd") and cfg.rdrop.alpha > 0 and not model_has_active_dropout(model):
            raise ConfigError(f"--rdrop.alpha {cfg.rdrop.alpha} but the model has no active dropout, so the two "
                              "passes agree and R-Drop does nothing: set the task's dropout > 0 or --rdrop.mode none")
        self.batches = data.TrainBatches(self.task, self.dataset("train"), cfg.train.micro_batch_size,
                                         cfg.train.grad_accum, world.world_size, world.rank, cfg.seed,
                                         cfg.train.max_tokens)
        tok = self.batches.tokens
        if tok is not None and world.is_main:
            print(f"[engine] token batches: {len(tok.batches)} of <= {cfg.train.max_tokens} tokens over "
                  f"{tok.num_examples - tok.dropped} examples, padding ratio {tok.pad_ratio:.3f}"
                  + (f"; {tok.dropped} examples longer than --train.max_tokens left out" if tok.dropped else ""),
                  flush=True)
        self.total_steps = cfg.train.max_steps or self.batches.steps_per_epoch * cfg.train.max_epochs
        if world.is_main:
            for w in preflight.warnings_for_run(cfg, self.total_steps):
                print(f"[engine] warning: {w}", flush=True)

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim), config=self.ds,
            lr_scheduler=schedules.build(cfg.optim, self.total_steps))
        self.stage = dsc.zero_stage(self.ds)
        self.guard = StepGuard(cfg, self.engine, world, dsc.precision(self.ds), self.preemption, cfg.log.every_steps)
        dist_utils.seed_everything(dist_utils.rank_seed(cfg.seed, world.rank))  # dropout differs per rank

        self.resolved = {**cfg.to_dict(), "ds_config_resolved": self.ds, "world_size": world.world_size,
                         "total_steps": self.total_steps, **hf_export.command_record(cfg, world.world_size)}
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
        if cfg.resume:
            self.resume()
        if world.is_main:
            checkpoint.sweep_partial(self.ckpt_root)         # saves a kill cut short: never visible, now gone
            os.makedirs(cfg.output_dir, exist_ok=True)
            with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
                f.write(dumps(self.resolved))
        self.monitor = Monitor(cfg.output_dir, self.engine, world.is_main, self.total_steps, self.start_step,
                               cfg.log.progress)

    def resume(self) -> None:
        """Continue from --resume auto|DIR: the newest complete checkpoint (engine/checkpoint.py), checked for
        pickled code and against this run's config (task, ZeRO stage, number of ranks) before it is loaded."""
        cfg, world = self.cfg, self.world
        log = print if world.is_main else (lambda *a, **k: None)
        found = checkpoint.find(cfg.resume, cfg.output_dir, cfg.checkpoint.universal, log=lambda m: log(m, flush=True))
        if found is None:
            return
        where = os.path.join(*found)
        checkpoint.scan(*found, world)
        saved = checkpoint.saved_config(*found)
        diff = preflight.check_resume(saved, self.resolved, world.world_size, cfg.checkpoint.universal, where)
        try:
            client = checkpoint.load(self.engine, *found, world)
        except checkpoint.CheckpointError as e:
            if diff:
                raise checkpoint.CheckpointError(f"{e} (the checkpoint's config differs: {'; '.join(diff[:4])})") \
                    from None
            raise
        self.start_step = self.last_saved_step = int(client["step"])
        self.best = client.get("best")
        self.train_seconds = float(client.get("train_seconds", 0.0))
        self.eval_owed = bool(client.get("eval_pending")) and self.start_step < self.total_steps
        if client.get("world_size") != world.world_size:
            dist_utils.seed_everything(dist_utils.rank_seed(cfg.seed + self.start_step, world.rank))
        if world.is_main:
            print(f"[engine] resumed from {where} at step {self.start_step}", flush=True)
            if diff:
                print(f"[engine] note: settings changed since the checkpoint: {'; '.join(diff)}", flush=True)

    # ------------------------------------------------------------------------------------------- train
    def alpha(self) -> float:
        r = self.cfg.rdrop
        if r.alpha_schedule == "linear_with_lr":
            return r.alpha * self.current_lr() / self.cfg.optim.lr
        return r.alpha

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def micro_batches(self, step: int):
        """Yields (step, [accum collated micro-batches]) from ``step`` on, through a DataLoader if workers > 0."""
        accum = self.cfg.train.grad_accum
        b = self.batches

        class Specs(torch.utils.data.Dataset):
            def __len__(self_):
                return (self.total_steps - step) * accum

            def __getitem__(self_, i):
                s, j = divmod(i, accum)
                return b.step_specs(step + s)[j]

        group = []
        for batch in data.loader(Specs(), b.collate, self.cfg.train.num_workers):
            group.append(batch)
            if len(group) == accum:
                yield group
                group = []

    def train_step(self, group: list[dict], alpha: float, want_norm: bool = False):
        """One optimizer step over this rank's ``accum`` micro-batches.

        Returns the step's local sums: ``loss, nll, consistency`` as one float64 tensor on the device (no host
        sync per micro-step), ``units, samples, units x copies`` as host floats, and, if asked (ZeRO-0, which
        keeps no norm of its own), the grad norm as a device tensor."""
        task, engine, world = self.task, self.engine, self.world
        accum = len(group)
        units = [float(task.num_units(b)) for b in group]
        total_units = dist_utils.all_reduce_sum([sum(units)], world)[0]
        scale = accum * world.world_size / max(total_units, 1.0)
        for batch in group:
            for name, (num, den) in task.batch_stats(batch).items():
                acc = self._stats.setdefault(name, [0.0, 0.0])
                acc[0] += float(num)
                acc[1] += float(den)
        device_sums = torch.zeros(3, dtype=torch.float64, device=world.device)
        host_sums, norm = [sum(units), 0.0, 0.0], None
        for j, batch in enumerate(group):
            batch = to_device(batch, world.device)
            out = rdrop_loss(task, engine, batch, self.cfg.rdrop.mode, alpha)
            engine.backward(out.loss * scale)
            if want_norm and j == accum - 1:    # ZeRO-0 keeps no norm of its own; grads are reduced by now
                norm = self.guard.grad_norm_on_device(engine.module)
            engine.step()
            device_sums += torch.stack([out.loss.detach(), out.nll, out.consistency]).double()
            host_sums[1] += float(next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0])
            host_sums[2] += units[j] * out.copies
        return device_sums, host_sums, norm

    def fit(self) -> dict:
        cfg, world, engine = self.cfg, self.world, self.engine
        log_every, eval_every, save_every = cfg.log.every_steps, cfg.eval.every_steps, cfg.checkpoint.every_steps
        # log-interval sums: loss, nll, consistency (device) | units (one copy), samples (one copy), copies*units
        dev_sums, host_sums = torch.zeros(3, dtype=torch.float64, device=world.device), [0.0] * 3
        t_last, step, grad_norm = time.perf_counter(), self.start_step, float("nan")
        t_step = t_last
        engine.train()
        if self.guard.stop_agreed():            # signalled while setting up: nothing new to save
            raise Preempted(step, self.preemption.reason, None)
        if self.eval_owed:                      # preempted at an evaluation step before evaluating: do it now, with
            self.evaluate(step)                 # the same weights, so the eval curve has no hole
        for group in self.micro_batches(self.start_step):
            alpha, lr = self.alpha(), self.current_lr()      # what this step uses (the scheduler steps inside)
            step_dev, step_host, norm0 = self.train_step(group, alpha, want_norm=self.guard.zero0_norm)
            step += 1
            # one small all-reduce per step: non-finite loss / grad norm (raises under --train.nonfinite stop),
            # exploding loss, and whether any rank was asked to stop (engine/guard.py)
            verdict = self.guard.after_step(step, step_dev[0], step_host[0], norm0)
            if not verdict.skipped:
                dev_sums += step_dev
                host_sums = [a + b for a, b in zip(host_sums, step_host)]
            grad_norm = verdict.grad_norm
            self.monitor.advance()
            will_log = bool(log_every) and (step % log_every == 0 or step >= self.total_steps or verdict.stop)
            if will_log and host_sums[0] > 0:   # every log_every steps, the run's last step, a preemption step
                names = sorted(self._stats)      # the same names on every rank: tasks report them per batch
                flat = dev_sums.tolist() + host_sums + [v for n in names for v in self._stats[n]]
                reduced = dist_utils.all_reduce_sum(flat, world)
                loss, nll, cons, units, samples, copy_units = reduced[:6]
                elapsed = time.perf_counter() - t_last
                record = {"loss": loss / units, "nll": nll / copy_units, "consistency": cons / units,
                          "alpha": alpha, "lr": lr, "grad_norm": grad_norm, "samples_per_sec": samples / elapsed,
                          "units_per_sec": units / elapsed}
                for k, n in enumerate(names):
                    num, den = reduced[6 + 2 * k], reduced[7 + 2 * k]
                    record[n] = num / den if den else float("nan")
                self.monitor.log("train", step, record)
                self._stats = {}
                dev_sums.zero_()
                host_sums, t_last = [0.0] * 3, time.perf_counter()
            self.train_seconds += time.perf_counter() - t_step
            if verdict.stop:                     # preemption: save this step (every rank), then leave
                saved = self.save(step)
                self.preemption.finish()
                raise Preempted(step, self.preemption.reason, saved)
            is_last = step >= self.total_steps
            stop = step == cfg.train.stop_at_step
            if (eval_every and step % eval_every == 0) or is_last:
                self.evaluate(step)
            if (save_every and step % save_every == 0) or is_last or stop:
                self.save(step)
            if stop and not is_last:
                if world.is_main:
                    print(f"[engine] stopped at step {step} (--train.stop_at_step); continue with --resume auto",
                          flush=True)
                self.stopped_early = True
                break
            t_step = time.perf_counter()
        if self.start_step >= self.total_steps:        # resumed a finished run: evaluate and export what is there
            self.evaluate(step)
            self.last_tag = f"global_step{step}"       # the checkpoint it resumed from (export() needs one)
        return self.final_metrics

    # ------------------------------------------------------------------------------------------- eval / save
    def evaluate(self, step: int) -> dict:
        self.engine.eval()
        try:
            ctx = EvalContext(self)
            ctx.step, ctx.final = step, step >= self.total_steps
            metrics = self.task.evaluate(ctx, self.eval_split)
        finally:
            self.engine.train()
        self.monitor.log("eval", step, metrics, extra={"train_s": self.train_seconds})
        self.evaluated_step = step
        self.final_metrics = {"step": step, "split": self.eval_split, **metrics}
        value = metrics.get(self.task.metric)
        if value is not None and math.isfinite(value) and self.cfg.checkpoint.save_best:
            better = self.best is None or (value > self.best if self.task.metric_mode == "max" else value < self.best)
            if better:
                self.best = value
                self._save_tag("best", step)
        return metrics

    def _eval_due(self, step: int) -> bool:
        """This step is one of the run's evaluation steps and was not evaluated (a preemption saves first)."""
        every = self.cfg.eval.every_steps
        return bool(every and step % every == 0 and self.evaluated_step != step)

    def _client_state(self, step: int) -> dict:
        return {"step": step, "micro_step": step * self.cfg.train.grad_accum, "best": self.best,
                "train_seconds": self.train_seconds, "eval_pending": self._eval_due(step),
                "world_size": self.world.world_size, "data": {"epoch": step // self.batches.steps_per_epoch,
                                                              "step_in_epoch": step % self.batches.steps_per_epoch},
                "config": self.resolved}

    def _save_tag(self, tag: str, step: int) -> str:
        return checkpoint.save(self.engine, self.ckpt_root, tag, self._client_state(step), self.world,
                               self.resolved, self.cfg.checkpoint.keep_last)

    def save(self, step: int) -> str:
        """The step checkpoint (once per step: a preemption right after a periodic save reuses it)."""
        path = os.path.join(self.ckpt_root, f"global_step{step}")
        if step != self.last_saved_step:
            path = self._save_tag(f"global_step{step}", step)
            self.last_saved_step = step
        self.last_tag = f"global_step{step}"
        return path

    def export(self) -> str | None:
        """Consolidated fp32 weights in HF save_pretrained format (DIR/hf_model), gathered over the process
        group from the live engine (the same weights as the last checkpoint; nothing is read back from disk), and
        the best checkpoint's as DIR/best_model: complete folders (engine/export.py adds the card)."""
        if not self.cfg.checkpoint.export_hf or not hasattr(self, "last_tag") or getattr(self, "stopped_early", 0):
            return None
        out = os.path.join(self.cfg.output_dir, "hf_model")
        sd = checkpoint.consolidated_state_dict(self.engine, self.world)
        if self.world.is_main:
            self.task.export(self.engine.module, sd, out)
            hf_export.complete(self, out, "final")       # model card + export.json
            hf_export.export_best(self)                 # DIR/best_model (--checkpoint.export_best)
        dist_utils.barrier()
        return out

    def close(self, clean: bool = True) -> None:
        if getattr(self, "monitor", None) is not None:
            self.monitor.close()
        engine, self.engine, self.optimizer, self.scheduler = self.engine, None, None, None
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
        del engine
        dist_utils.shutdown(self.world, clean)
