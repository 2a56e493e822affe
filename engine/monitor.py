"""Metrics out: DeepSpeed's monitor (TensorBoard, and whatever else the ds_config enables), DIR/metrics.jsonl and
a tqdm bar, all on rank 0.  Values arrive already reduced over ranks (sums divided once, never averaged twice).

DeepSpeed 0.19 writes only Train/Samples/lr by itself; the engine writes these tags through engine.monitor:
  Train/loss  Train/nll  Train/consistency  Train/alpha  Train/lr  Train/grad_norm  Train/samples_per_sec
  Train/units_per_sec  Eval/<metric>  (x axis: optimizer step)
metrics.jsonl's eval records also carry ``train_s``: wall seconds spent in training steps so far (evaluation and
checkpoint saving excluded, summed over resumed sessions), the x axis of curves against time (engine/study.py).
"""
from __future__ import annotations

import json
import os

from tqdm import tqdm


class Monitor:
    def __init__(self, output_dir: str, ds_engine, is_main: bool, total_steps: int, start_step: int,
                 progress: bool = True):
        self.is_main = is_main
        self.ds_monitor = getattr(ds_engine, "monitor", None)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.bar = None
        if is_main:
            self._truncate_after(start_step)
            if progress:
                self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                                mininterval=2.0)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records the interrupted run wrote after its last checkpoint: the file then reads as
        one run."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def log(self, kind: str, step: int, values: dict[str, float], extra: dict[str, float] | None = None) -> None:
        """One record to metrics.jsonl, TensorBoard and the bar; ``extra`` goes to metrics.jsonl only (eval
        records carry ``train_s``, the training seconds so far, for curves against wall-clock time)."""
        if not self.is_main:
            return
        record = {"kind": kind, "step": step, **{k: float(v) for k, v in values.items()},
                  **{k: float(v) for k, v in (extra or {}).items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.ds_monitor is not None and getattr(self.ds_monitor, "enabled", False):
            prefix = "Train" if kind == "train" else "Eval"
            self.ds_monitor.write_events([(f"{prefix}/{k}", float(v), step) for k, v in values.items()])
        if self.bar is not None:
            if kind == "train":
                self.bar.set_postfix({k: f"{values[k]:.4g}" for k in ("loss", "lr") if k in values}, refresh=False)
            else:
                self.bar.write(f"step {step} eval: " + ", ".join(f"{k}={v:.4f}" for k, v in values.items()))

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.is_main and self.ds_monitor is not None:
            tb = getattr(self.ds_monitor, "tb_monitor", None)
            writer = getattr(tb, "summary_writer", None)
            if writer is not None:
                writer.flush()
                writer.close()
