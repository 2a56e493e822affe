"""Token-task step benchmark: the fused R-Drop loss, this engine against the HF Trainer, R-Drop against a doubled
batch, the engine against a hand-written loop, and achieved FLOP/s against this machine's matmul FLOP/s.
Prints a table and writes JSON.  Not a test: the numbers depend on the machine and its load.

Models (vocabulary --vocab, 32k by default; random weights, synthetic token ids, since the loss's cost does not
depend on what the tokens say; Multi30k could not give a 32k BPE vocabulary anyway):
  mt   the translation transformer (tasks/translation.py + models/transformer_mt.py, preset --mt_preset), source
       and target lengths drawn from 8..40 tokens, token batches of --tokens (--train.max_tokens, per copy)
  lm   a GPT-style LM: HF GPT2LMHeadModel from a config (--lm_layers x --lm_dim), blocks of --lm_block tokens,
       --tokens // --lm_block rows per copy, through a minimal Task defined here

Sides, every one measured in this one process, rounds interleaved (round r runs every side's --steps steps
before round r+1 starts), after --warmup steps per side:
  rdrop_fused     this engine's R-Drop step (DeepSpeed, --ds_config), the fused chunked loss (the default)
  rdrop_unfused   the same with --task.fused_loss false: full [2 x tokens, V] logits
  hf_trainer      transformers.Trainer with deepspeed=<the same filled DeepSpeed config dict>, R-Drop the usual way:
                  compute_loss runs two forwards of the batch and adds alpha * symmetric KL, with the engine's
                  reduction (sums over both copies / target tokens of one copy, label smoothing the same), the same
                  model (same init), the same batches, the same optimizer (from the DeepSpeed config)
  double_batch    the engine, --rdrop.mode none on batches of twice the tokens (distinct rows), fused loss
  none            the engine, --rdrop.mode none on the R-Drop sides' batches, fused loss
  plain           a hand-written PyTorch loop on those batches: the same model code and the same fused loss
                  function, loss.backward(), torch AdamW; no DeepSpeed, no engine
Ratios: fused/unfused peak memory and time per token; engine/HF tokens per second and peak memory; R-Drop /
double batch per target token through the model (R-Drop's B rows doubled against 2B distinct rows: the paper's
appendix C.1 comparison); engine / plain per token; achieved training FLOP/s / measured matmul FLOP/s (MFU).

Measures.  Time: wall time and the main thread's CPU time (time.thread_time) per step; with --threads 1 (the
default) torch computes on the main thread, so CPU time is the work done and hardly moves with the machine's
load, while wall time does.  Per side and round: time per target token (one copy) over the round's steps; the
table shows the minimum over rounds and the spread (max - min).  Memory: the kernel's peak resident set (VmHWM,
reset just before each step) minus the RSS just before it, the maximum over the round's steps; the process runs
with MALLOC_MMAP_THRESHOLD_=65536 (re-executed with it if unset), so freed buffers above 64 KB go back to the
kernel and RSS follows live memory; the model, optimizer state and DeepSpeed buffers exist before the step and are
not in the delta.  On a GPU (DS_ACCELERATOR=cuda) memory is torch.cuda.max_memory_allocated over what was
allocated before the step, time is synchronised, and the matmul peak is an 8192^3 float32 torch.mm (this path has
not run: the machine this was written on has no GPU).  FLOPs: the model's matmul and attention FLOPs on the padded batch (forward; training = 3x
forward), doubled rows included, the fused loss's recomputation not counted (model FLOPs, not hardware FLOPs);
the matmul peak is the best of a 1024^3 float32 torch.mm per round with the same threads.  os.getloadavg() is
recorded with every round.

    python benchmarks/token_step.py [--models mt,lm] [--vocab 32000] [--tokens 1024] [--steps 2] [--rounds 3]
        [--warmup 1] [--threads 1] [--ds_config ds_configs/zero2.json] [--out bench_results/token_step.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


# -- memory ---------------------------------------------------------------------------------------------------
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:      # VmHWM := VmRSS (Linux >= 4.0)
        f.write("5")


CUDA = False          # set in main(): on a GPU, memory is torch.cuda.max_memory_allocated and time is synchronised


class Meter:
    """Wall time, main-thread CPU time and peak memory of one step: on the CPU the peak RSS delta (VmHWM reset
    before the step), on a GPU the peak of torch.cuda.max_memory_allocated over what was allocated before."""

    def __enter__(self):
        if CUDA:
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.rss0 = torch.cuda.memory_allocated()
        else:
            _reset_peak()
            self.rss0 = _status_bytes("VmRSS")
        self.t0, self.c0 = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc):
        if CUDA:
            import torch
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.thread_time() - self.c0
        if CUDA:
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.rss0) / 2 ** 20
        else:
            self.peak_mb = (_status_bytes("VmHWM") - self.rss0) / 2 ** 20


def matmul_flops(threads: int, n: int = 1024, reps: int = 3) -> dict:
    """Best dense float32 matmul FLOP/s (wall and main-thread CPU) on this machine, now (on a GPU: n = 8192,
    the device's float32 matmul as torch runs it, TF32 if enabled)."""
    import torch
    dev = "cuda" if CUDA else "cpu"
    n = 8192 if CUDA else n
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    torch.mm(a, b)
    best_w = best_c = float("inf")
    for _ in range(reps):
        if CUDA:
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.thread_time()
        torch.mm(a, b)
        if CUDA:
            torch.cuda.synchronize()
        best_w, best_c = min(best_w, time.perf_counter() - t), min(best_c, time.thread_time() - c)
    return {"wall": 2 * n ** 3 / best_w, "cpu": 2 * n ** 3 / max(best_c, 1e-9)}


# -- FLOPs ----------------------------------------------------------------------------------------------------
def mt_forward_flops(cfg, src: int, tgt: int, rows: int, vocab: int) -> float:
    """FSMT forward FLOPs of ``rows`` examples padded to ``src`` / ``tgt`` tokens (multiply-add = 2)."""
    d, fe, fd = cfg.d_model, cfg.encoder_ffn_dim, cfg.decoder_ffn_dim
    enc = src * (8 * d * d + 4 * d * fe + 4 * src * d)                               # qkvo, ffn, scores + values
    dec = tgt * (8 * d * d + 4 * d * d + 4 * d * fd + 4 * tgt * d + 4 * src * d) + src * 4 * d * d  # + cross k, v
    return rows * (cfg.encoder_layers * enc + cfg.decoder_layers * dec + tgt * 2 * d * vocab)


def lm_forward_flops(cfg, tokens: int, rows: int) -> float:
    d, T = cfg.n_embd, tokens
    inner = cfg.n_inner or 4 * d
    per_layer = T * (8 * d * d + 4 * d * inner + 4 * T * d)
    return rows * (cfg.n_layer * per_layer + T * 2 * d * cfg.vocab_size)


# -- the tasks ------------------------------------------------------------------------------------------------
def synthetic_translation():
    """tasks/translation.py on synthetic token ids: its model, collate, forward and loss, no BPE."""
    from tasks import _seq2seq
    from tasks.translation import Translation

    class SyntheticTranslation(Translation):
        def prepare(self):
            pass

        def vocab_sizes(self):
            v = self.cfg.vocab_size
            return v, v

        def check_resume_vocab(self):
            pass

        def build_dataset(self, split):
            rng = random.Random(1234)
            v, n = self.cfg.vocab_size, self.cfg.max_train_examples
            def ids(k):
                return [rng.randrange(4, v) for _ in range(k)]
            src = [ids(rng.randint(8, 40)) for _ in range(n)]
            tgt = [ids(max(4, len(s) + rng.randint(-6, 6))) for s in src]
            return _seq2seq.PairSplit(src, tgt, [""] * n, [""] * n)

    return SyntheticTranslation


def lm_task():
    import torch
    from engine import fused_loss
    from engine.task import Task, TaskConfig, TaskOutput

    @dataclass
    class LMConfig(TaskConfig):
        vocab_size: int = 32000
        n_embd: int = 128
        n_layer: int = 2
        n_head: int = 4
        block: int = 128
        dropout: float = 0.1
        label_smoothing: float = 0.0
        fused_loss: str = "auto"
        examples: int = 512

    class LM(Task):
        """A minimal GPT-2 language-modelling task (blocks of random ids); the real one is tasks/language_modeling."""
        Config = LMConfig

        def config(self):
            from transformers import GPT2Config
            c = self.cfg
            return GPT2Config(vocab_size=c.vocab_size, n_positions=c.block, n_embd=c.n_embd, n_layer=c.n_layer,
                              n_head=c.n_head, resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=0.0,
                              bos_token_id=0, eos_token_id=0)

        def build_model(self, ds_config):
            from transformers import GPT2LMHeadModel
            from models import hf
            model = hf.build(GPT2LMHeadModel, self.config(), ds_config)
            if fused_loss.want_fused(self.cfg.fused_loss, self.cfg.vocab_size):
                fused_loss.attach(model)
            return model

        def build_dataset(self, split):
            g = torch.Generator().manual_seed(4321)
            return torch.randint(0, self.cfg.vocab_size, (self.cfg.examples, self.cfg.block + 1), generator=g)

        def collate(self, samples, generator=None):
            x = torch.stack(list(samples))
            return {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}

        def forward(self, model, batch):
            head = fused_loss.find(model)
            if head is not None:            # through the engine; the empty index: lm_head computes nothing
                out = model(input_ids=batch["input_ids"], output_hidden_states=True, use_cache=False,
                            logits_to_keep=torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device))
                return TaskOutput(None, batch["labels"], None, hidden=out.hidden_states[-1], head=head)
            return TaskOutput(model(input_ids=batch["input_ids"], use_cache=False).logits, batch["labels"])

        def num_units(self, batch):
            return int(batch["labels"].numel())

    return LM


# -- the HF Trainer side ----------------------------------------------------------------------------------------
def hf_trainer(model, ds_config, batches, logits_fn, alpha, eps, out_dir, on_step):
    """transformers.Trainer with the same DeepSpeed config, R-Drop in compute_loss (two forwards)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from engine import losses

    opt = ds_config["optimizer"]["params"]

    class RDropTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            target = inputs["labels"]
            pad = inputs.get("pad_mask")
            la, lb = logits_fn(model, inputs), logits_fn(model, inputs)
            units = target.numel() if pad is None else int((~pad).sum())
            nll = losses.nll_loss(la, target, pad, eps) + losses.nll_loss(lb, target, pad, eps)
            loss = (nll + alpha * losses.symmetric_kl(la, lb, pad)) / units
            return (loss, la) if return_outputs else loss

        def get_train_dataloader(self):           # the engine's batches, in order, one per step
            return torch.utils.data.DataLoader(batches, batch_size=1, shuffle=False, collate_fn=lambda xs: xs[0])

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.meter = Meter().__enter__()

        def on_step_end(self, args, state, control, **kw):
            self.meter.__exit__(None, None, None)
            on_step(state.global_step, self.meter)

    args = TrainingArguments(
        output_dir=out_dir, deepspeed=ds_config, gradient_accumulation_steps=1,
        per_device_train_batch_size=ds_config["train_micro_batch_size_per_gpu"],   # matched; the loader below
        #                                                    yields one collated batch per step whatever it says
        learning_rate=opt["lr"], adam_beta1=opt["betas"][0], adam_beta2=opt["betas"][1], adam_epsilon=opt["eps"],
        weight_decay=opt["weight_decay"], max_grad_norm=ds_config["gradient_clipping"], max_steps=len(batches),
        lr_scheduler_type="constant", warmup_steps=0, logging_strategy="no", save_strategy="no", report_to=[],
        disable_tqdm=True, remove_unused_columns=False, use_cpu=not CUDA, dataloader_num_workers=0, seed=1)
    return RDropTrainer(model=model, args=args, train_dataset=batches, callbacks=[Timer()])


# -- main -------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mt,lm")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=1024, help="target tokens per copy per step (before doubling)")
    ap.add_argument("--mt_preset", default="mini")
    ap.add_argument("--lm_dim", type=int, default=128)
    ap.add_argument("--lm_layers", type=int, default=2)
    ap.add_argument("--lm_block", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per side per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ds_config", default="ds_configs/zero2.json")
    ap.add_argument("--out", default="bench_results/token_step.json")
    args = ap.parse_args()
    if os.environ.get(MMAP_ENV) is None:          # before any allocation: re-execute with a fixed mmap threshold
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, MMAP_ENV: "65536"})
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from engine import distributed as du
    from engine import fused_loss
    from engine.config import parse_args
    from engine.trainer import Trainer, to_device

    global CUDA
    du.set_threads(args.threads)
    world = du.init()
    CUDA = world.device.type == "cuda"
    tmp = tempfile.mkdtemp(prefix="token-step-")
    steps_needed = args.warmup + args.rounds * args.steps
    results: dict = {"config": vars(args), "machine": {"threads": args.threads, "torch": torch.__version__,
                                                       "cpus": os.cpu_count(), "malloc_mmap_threshold": 65536},
                     "models": {}}

    def engine_trainer(model_key: str, mode: str, fused: bool, tokens: int) -> Trainer:
        common = ["--output_dir", f"{tmp}/{model_key}-{mode}-{fused}-{tokens}", "--ds_config",
                  str(ROOT / args.ds_config), "--optim.impl", "torch", "--optim.lr", "5e-4", "--optim.schedule",
                  "constant", "--optim.warmup_steps", "0", "--optim.beta2", "0.98", "--optim.weight_decay", "0.0",
                  "--rdrop.mode", mode, "--train.max_steps", "100000", "--log.tensorboard", "false",
                  "--log.progress", "false", "--task.data_dir", str(ROOT), "--seed", "1"]
        if model_key == "mt":
            cfg = parse_args(["--task", "translation", *common, "--task.model", args.mt_preset,
                              "--task.vocab_size", str(args.vocab), "--task.max_train_examples", "4000",
                              "--task.fused_loss", str(fused).lower(), "--train.max_tokens", str(tokens),
                              "--rdrop.alpha", "5"])
            cfg.task_class = synthetic_translation()
        else:
            rows = max(1, tokens // args.lm_block)
            cfg = parse_args(["--task", "translation", *common, "--train.micro_batch_size", str(rows),
                              "--rdrop.alpha", "1"])
            cfg.task_class = lm_task()
            cfg.task_cfg = cfg.task_class.Config(vocab_size=args.vocab, n_embd=args.lm_dim, n_layer=args.lm_layers,
                                                 block=args.lm_block, fused_loss=str(fused).lower(),
                                                 examples=rows * steps_needed * 2)
        t = Trainer(cfg, world)
        t.setup()
        assert (fused_loss.find(t.engine) is not None) == fused
        return t

    def groups(t: Trainer, n: int) -> list:
        return [[t.batches.collate(s) for s in t.batches.step_specs(i)] for i in range(n)]

    for model_key in args.models.split(","):
        print(f"[{model_key}] building the sides ...", flush=True)
        eng = {"rdrop_fused": engine_trainer(model_key, "rdrop", True, args.tokens),
               "rdrop_unfused": engine_trainer(model_key, "rdrop", False, args.tokens),
               "double_batch": engine_trainer(model_key, "none", True, 2 * args.tokens),
               "none": engine_trainer(model_key, "none", True, args.tokens)}
        task = eng["rdrop_fused"].task
        data_b = groups(eng["rdrop_fused"], steps_needed)
        data_2b = groups(eng["double_batch"], steps_needed)
        ds = eng["rdrop_fused"].ds
        alpha, eps = eng["rdrop_fused"].cfg.rdrop.alpha, task.label_smoothing
        pad_id = task.layout.pad if model_key == "mt" else None

        def units(group):
            return sum(task.num_units(b) for b in group)

        def flops(group, copies):
            total = 0.0
            for b in group:
                if model_key == "mt":
                    c = eng["none"].engine.module.config
                    total += mt_forward_flops(c, b["input_ids"].shape[1], b["labels"].shape[1],
                                              b["labels"].shape[0], args.vocab)
                else:
                    total += lm_forward_flops(eng["none"].engine.module.config, b["input_ids"].shape[1],
                                              b["input_ids"].shape[0])
            return 3.0 * copies * total

        # the hand-written loop and the HF Trainer get their own model with the same initial weights
        def fresh_model(fused: bool):
            torch.manual_seed(1)
            du.seed_everything(1)
            m = task.build_model({"zero_optimization": {"stage": 0}})
            if not fused and fused_loss.find(m) is not None:
                del m._modules[fused_loss.ATTR]
            m.train()
            return m

        plain_model = fresh_model(True).to(world.device)
        o = eng["none"].cfg.optim
        plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                      weight_decay=o.weight_decay)

        def plain_step(group):
            for b in map(lambda x: to_device(x, world.device), group):
                out = task.forward(plain_model, b)
                nll = out.head(out.hidden, out.target, out.pad_mask, eps, None, copies=1)[0]
                (nll / task.num_units(b)).backward()
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)

        def engine_step(t):
            return lambda group: t.train_step([to_device(b, world.device) for b in group], t.alpha())

        sides = {"rdrop_fused": (engine_step(eng["rdrop_fused"]), data_b, 2),
                 "rdrop_unfused": (engine_step(eng["rdrop_unfused"]), data_b, 2),
                 "double_batch": (engine_step(eng["double_batch"]), data_2b, 1),
                 "none": (engine_step(eng["none"]), data_b, 1),
                 "plain": (plain_step, data_b, 1)}
        rec: dict[str, list] = {k: [] for k in [*sides, "hf_trainer"]}
        rounds_meta: list = []

        def run_engine_sides(r: int):
            """Round r of every engine-side (r = -1: the warm-up steps, not recorded)."""
            first = 0 if r < 0 else args.warmup + r * args.steps
            for name, (fn, data, copies) in sides.items():
                rows = []
                for i in range(first, first + (args.warmup if r < 0 else args.steps)):
                    with Meter() as m:
                        fn(data[i])
                    rows.append({"wall": m.wall, "cpu": m.cpu, "peak_mb": m.peak_mb, "units": units(data[i]),
                                 "copies": copies, "flops": flops(data[i], copies)})
                if r >= 0:
                    rec[name].append(rows)
            if r >= 0:
                rounds_meta.append({"round": r, "loadavg": os.getloadavg(), "matmul": matmul_flops(args.threads)})
                print(f"[{model_key}] round {r} done, load {os.getloadavg()[0]:.1f}", flush=True)

        # HF Trainer: one flat batch per step (its micro batch is 1 "example" = one of our collated batches)
        hf_batches = [dict(b) for g in data_b for b in g]
        if model_key == "mt":
            def mt_logits(model, inputs):
                return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             decoder_input_ids=inputs["decoder_input_ids"], use_cache=False).logits
            for b in hf_batches:
                b["pad_mask"] = b["labels"].eq(pad_id)
            logits_fn = mt_logits
        else:
            def logits_fn(model, inputs):
                return model(input_ids=inputs["input_ids"], use_cache=False).logits
        hf_rows: list = []

        def on_hf_step(step: int, meter: Meter):
            b = hf_batches[step - 1]
            hf_rows.append({"wall": meter.wall, "cpu": meter.cpu, "peak_mb": meter.peak_mb,
                            "units": task.num_units(b), "copies": 2, "flops": flops([b], 2)})
            if step == args.warmup:
                hf_rows.clear()
                run_engine_sides(-1)                    # the engine sides' warm-up
            elif step > args.warmup and (step - args.warmup) % args.steps == 0:
                rec["hf_trainer"].append(list(hf_rows))
                hf_rows.clear()
                run_engine_sides((step - args.warmup) // args.steps - 1)

        hf = hf_trainer(fresh_model(False), json.loads(json.dumps(ds)), hf_batches, logits_fn, alpha, eps,
                        f"{tmp}/{model_key}-hf", on_hf_step)
        du.set_threads(args.threads)
        print(f"[{model_key}] running: HF Trainer steps drive the rounds ...", flush=True)
        hf.train()
        results["models"][model_key] = summarize(model_key, rec, rounds_meta, eng, args)
        hf.accelerator.free_memory() if hasattr(hf, "accelerator") else None
        del hf
        for t in eng.values():
            t.engine = None

    out = ROOT / args.out if not os.path.isabs(args.out) else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"wrote {out}")
    du.shutdown(world)


def summarize(model_key, rec, rounds_meta, eng, args) -> dict:
    """Per side and round: seconds per unit (wall, cpu), tokens/s, peak MB, FLOP/s; then min/spread over rounds."""
    per_side = {}
    for name, rounds in rec.items():
        rr = []
        for rows in rounds:
            u = sum(x["units"] for x in rows)
            wall, cpu, fl = sum(x["wall"] for x in rows), sum(x["cpu"] for x in rows), sum(x["flops"] for x in rows)
            rows_u = sum(x["units"] * x["copies"] for x in rows)        # target tokens through the model
            rr.append({"wall_per_unit": wall / u, "cpu_per_unit": cpu / u, "tokens_per_s": u / wall,
                       "wall_per_row_token": wall / rows_u, "cpu_per_row_token": cpu / rows_u,
                       "peak_mb": max(x["peak_mb"] for x in rows), "flops_per_s_wall": fl / wall,
                       "flops_per_s_cpu": fl / max(cpu, 1e-9), "units": u, "steps": rows})
        per_side[name] = rr

    def stat(side, key, best=min):
        vals = [r[key] for r in per_side[side]]
        return {"min" if best is min else "max": best(vals), "spread": max(vals) - min(vals), "rounds": vals}

    def ratio(a, b, key, invert=False):
        """a / b of per-round values (inverted: b / a, for a rate from a time): the ratio of the best rounds, and
        the ratio within each round (same load), its minimum and spread."""
        va, vb = [r[key] for r in per_side[a]], [r[key] for r in per_side[b]]
        paired = [(y / x if invert else x / y) for x, y in zip(va, vb)]
        best = min(vb) / min(va) if invert else min(va) / min(vb)
        return {"ratio_of_mins": best, "per_round_min": min(paired), "per_round_spread": max(paired) - min(paired),
                "per_round": paired}

    peak_mm = {"wall": max(m["matmul"]["wall"] for m in rounds_meta),
               "cpu": max(m["matmul"]["cpu"] for m in rounds_meta)}
    sides = {s: {"wall_s_per_1k_tokens": {k: (v * 1000 if isinstance(v, float) else [x * 1000 for x in v])
                                           for k, v in stat(s, "wall_per_unit").items()},
                 "cpu_s_per_1k_tokens": {k: (v * 1000 if isinstance(v, float) else [x * 1000 for x in v])
                                          for k, v in stat(s, "cpu_per_unit").items()},
                 "tokens_per_s": stat(s, "tokens_per_s", max), "peak_mb": stat(s, "peak_mb"),
                 "mfu_wall": max(r["flops_per_s_wall"] for r in per_side[s]) / peak_mm["wall"],
                 "mfu_cpu": max(r["flops_per_s_cpu"] for r in per_side[s]) / peak_mm["cpu"]}
             for s in per_side}
    comparisons = {
        "fused_over_unfused": {"peak_memory": ratio("rdrop_fused", "rdrop_unfused", "peak_mb"),
                               "wall_time": ratio("rdrop_fused", "rdrop_unfused", "wall_per_unit"),
                               "cpu_time": ratio("rdrop_fused", "rdrop_unfused", "cpu_per_unit"),
                               "target": "peak memory <= 0.25 at time <= 1.0"},
        "engine_over_hf_trainer": {"tokens_per_s": ratio("rdrop_fused", "hf_trainer", "wall_per_unit", invert=True),
                                   "cpu_time": ratio("rdrop_fused", "hf_trainer", "cpu_per_unit"),
                                   "peak_memory": ratio("rdrop_fused", "hf_trainer", "peak_mb"),
                                   "target": "tokens/s >= 1.2"},
        "rdrop_over_double_batch": {"wall_time": ratio("rdrop_fused", "double_batch", "wall_per_row_token"),
                                    "cpu_time": ratio("rdrop_fused", "double_batch", "cpu_per_row_token"),
                                    "target": "<= 1.05 (time per target token through the model: R-Drop's "
                                              "2 x B rows against 2B distinct rows)"},
        "engine_over_plain": {"wall_time": ratio("none", "plain", "wall_per_unit"),
                              "cpu_time": ratio("none", "plain", "cpu_per_unit"), "target": "<= 1.05"},
        "mfu": {s: {"wall": sides[s]["mfu_wall"], "cpu": sides[s]["mfu_cpu"]} for s in sides},
    }
    mod = eng["none"].engine.module
    return {"model": type(mod).__name__, "parameters": sum(p.numel() for p in mod.parameters() if p.requires_grad),
            "vocab": args.vocab, "sides": sides, "comparisons": comparisons, "matmul_peak_flops": peak_mm,
            "rounds": rounds_meta}


def print_table(results: dict) -> None:
    for key, m in results["models"].items():
        print(f"\n== {key}: {m['model']}, {m['parameters']:,} parameters, vocab {m['vocab']}; matmul peak "
              f"{m['matmul_peak_flops']['wall'] / 1e9:.1f} GFLOP/s wall, {m['matmul_peak_flops']['cpu'] / 1e9:.1f} cpu; "
              "load " + ", ".join(f"{r['loadavg'][0]:.1f}" for r in m["rounds"]))
        print(f"{'side':<14}{'wall s/1k tok':>14}{'spread':>8}{'cpu s/1k tok':>14}{'spread':>8}{'tok/s':>8}"
              f"{'peak MB':>9}{'spread':>8}{'MFU wall':>9}{'MFU cpu':>8}")
        for s, v in m["sides"].items():
            w, c, p = v["wall_s_per_1k_tokens"], v["cpu_s_per_1k_tokens"], v["peak_mb"]
            print(f"{s:<14}{w['min']:>14.3f}{w['spread']:>8.3f}{c['min']:>14.3f}{c['spread']:>8.3f}"
                  f"{v['tokens_per_s']['max']:>8.0f}{p['min']:>9.0f}{p['spread']:>8.0f}{v['mfu_wall']:>9.3f}"
                  f"{v['mfu_cpu']:>8.3f}")
        cmp = m["comparisons"]
        f, e, r, p = (cmp["fused_over_unfused"], cmp["engine_over_hf_trainer"], cmp["rdrop_over_double_batch"],
                      cmp["engine_over_plain"])
        def fmt(x):
            return f"{x['ratio_of_mins']:.3f} (per round {x['per_round_min']:.3f} + {x['per_round_spread']:.3f})"
        print(f"fused/unfused   peak memory {fmt(f['peak_memory'])}, wall {fmt(f['wall_time'])}, "
              f"cpu {fmt(f['cpu_time'])}   [target mem <= 0.25, time <= 1.0]")
        print(f"engine/HF       tokens/s {fmt(e['tokens_per_s'])}, cpu time {fmt(e['cpu_time'])}, "
              f"peak memory {fmt(e['peak_memory'])}   [target tokens/s >= 1.2]")
        print(f"R-Drop/double   wall {fmt(r['wall_time'])}, cpu {fmt(r['cpu_time'])}   [target <= 1.05]")
        print(f"engine/plain    wall {fmt(p['wall_time'])}, cpu {fmt(p['cpu_time'])}   [target <= 1.05]")


if __name__ == "__main__":
    main()
