"""Fused vs unfused R-Drop token loss: peak memory and time of forward + backward (prints a table, writes JSON).

Not a test: the numbers depend on the machine.  Each measurement runs in a FRESH subprocess per side (so one side's
allocator state cannot hide the other's peak), and the sides are interleaved round by round so machine noise hits
all of them.  Memory is the kernel's peak resident set size (VmHWM, reset just before) minus the RSS just before
the first real forward, with the inputs (hidden [2N, H], weight [V, H], target, mask) already allocated and the
code paths warmed up on a small problem; library code pages mapped during the step are subtracted.  It is what the
loss itself needs, all allocations included (logits, log-probs, saved tensors, gradients of hidden/weight/bias).  Time is the best of
``--iters`` forward+backward calls after that first one, per round, as wall time and as the process's CPU time
(``time.process_time``: on a shared machine other jobs inflate wall time but hardly CPU time; with ``--threads 1``
CPU time is the work done); the table gives the minimum over rounds and the spread (max - min over rounds).

Sides: unfused (engine.losses on the full logits, the reference), fused with recompute-in-backward (default), fused
with gradient-in-forward (Liger's style).  The loss is nll(a) + nll(b) + alpha * symmetric KL with label smoothing
0.1 and ~10% padding, as the R-Drop hook computes it.

    python benchmarks/fused_loss.py [--tokens 2048] [--vocab 32000] [--hidden 512] [--rounds 3] [--iters 2]
    python benchmarks/fused_loss.py --worker SIDE ...     (one measurement, JSON on stdout; used by the tests)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("unfused", "fused_recompute", "fused_forward")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0), so that imports and set-up,
    which may have peaked higher than the loss will, do not hide the loss's own peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(args) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    from engine import losses
    from engine.fused_loss import fused_token_loss
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)

    def make(N, H, V):
        hidden = torch.randn(2 * N, H, generator=g).requires_grad_()
        weight = (torch.randn(V, H, generator=g) * H ** -0.5).requires_grad_()
        bias = torch.zeros(V).requires_grad_()
        target = torch.randint(0, V, (N,), generator=g)
        mask = torch.rand(N, generator=g) < 0.1
        return N, hidden, weight, bias, target, mask

    # warm-up on a small problem with the same code paths: the first use of a kernel maps its code pages (shared
    # library pages count in RSS, and how many depends on the page cache), which must not count as the loss's memory
    N, hidden, weight, bias, target, mask = make(64, args.hidden, 1024)

    def step():
        if args.side == "unfused":
            z = torch.nn.functional.linear(hidden, weight, bias)
            nll = losses.nll_loss(z[:N], target, mask, 0.1) + losses.nll_loss(z[N:], target, mask, 0.1)
            cons = losses.symmetric_kl(z[:N], z[N:], mask)
        else:
            nll, cons = fused_token_loss(hidden, weight, target, mask, bias, 0.1, "kl", chunk_size=args.chunk or None,
                                         strategy=args.side.split("_")[1])
        (nll + args.alpha * cons).backward()
        hidden.grad = weight.grad = bias.grad = None
        return float(nll.detach()), float(cons.detach())

    step()
    N, hidden, weight, bias, target, mask = make(args.tokens, args.hidden, args.vocab)
    _reset_peak()
    before, file_before = _status_bytes("VmRSS"), _status_bytes("RssFile")
    t = time.perf_counter()
    nll, cons = step()
    first = time.perf_counter() - t
    peak = _status_bytes("VmHWM")
    file_delta = _status_bytes("RssFile") - file_before
    times, cpu = [], []
    for _ in range(args.iters):
        t, c = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"side": args.side, "peak_delta_mb": (peak - before - max(0, file_delta)) / 2 ** 20,
            "rss_peak_delta_mb": (peak - before) / 2 ** 20, "file_pages_mapped_mb": file_delta / 2 ** 20,
            "first_s": first, "times_s": times, "cpu_s": cpu, "nll": nll, "cons": cons,
            "inputs_mb": (hidden.numel() + weight.numel() + bias.numel()) * 4 / 2 ** 20}


def run_worker(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
           "--hidden", str(args.hidden), "--iters", str(args.iters), "--chunk", str(args.chunk),
           "--alpha", str(args.alpha), "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per copy (the loss sees 2x this many rows)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=2, help="timed forward+backward calls per round and side")
    ap.add_argument("--chunk", type=int, default=0, help="tokens per copy per chunk (0: the default from V)")
    ap.add_argument("--alpha", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench_results/fused_loss.json")
    args = ap.parse_args()
    if args.worker:
        args.side = args.worker
        print(json.dumps(worker(args)))
        return
    sides = args.sides.split(",")
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.rounds):
        for s in sides:                                      # interleaved: every round measures every side
            runs[s].append(run_worker(s, args))
            print(f"round {r} {s}: peak +{runs[s][-1]['peak_delta_mb']:.0f} MB, "
                  f"best {min(runs[s][-1]['times_s']):.3f} s", flush=True)
    summary = {}
    for s, rs in runs.items():
        peaks = [x["peak_delta_mb"] for x in rs]
        best = [min(x["times_s"]) for x in rs]
        cpu = [min(x["cpu_s"]) for x in rs]
        summary[s] = {"peak_mb_min": min(peaks), "peak_mb_spread": max(peaks) - min(peaks),
                      "time_s_min": min(best), "time_s_spread": max(best) - min(best),
                      "cpu_s_min": min(cpu), "cpu_s_spread": max(cpu) - min(cpu)}
    base = summary.get("unfused")
    print(f"\nN={args.tokens} tokens per copy ({2 * args.tokens} rows), V={args.vocab}, H={args.hidden}, "
          f"rounds={args.rounds}, iters={args.iters}, chunk={args.chunk or 'default'}")
    print(f"{'side':16s} {'peak MB':>8s} {'spread':>7s} {'wall s':>7s} {'spread':>7s} {'cpu s':>7s} {'spread':>7s} "
          f"{'mem/unf':>8s} {'wall/unf':>9s} {'cpu/unf':>8s}")
    nan = float("nan")
    for s, v in summary.items():
        if base:
            v["peak_ratio"] = v["peak_mb_min"] / base["peak_mb_min"]
            v["time_ratio"] = v["time_s_min"] / base["time_s_min"]
            v["cpu_ratio"] = v["cpu_s_min"] / base["cpu_s_min"]
        print(f"{s:16s} {v['peak_mb_min']:8.0f} {v['peak_mb_spread']:7.0f} {v['time_s_min']:7.3f} "
              f"{v['time_s_spread']:7.3f} {v['cpu_s_min']:7.3f} {v['cpu_s_spread']:7.3f} {v.get('peak_ratio', nan):8.3f} "
              f"{v.get('time_ratio', nan):9.3f} {v.get('cpu_ratio', nan):8.3f}")
    import torch
    out = {"config": vars(args) | {"rows": 2 * args.tokens, "torch": torch.__version__,
                                   "threads": args.threads or torch.get_num_threads(), "cpus": os.cpu_count()},
           "memory": "peak RSS (VmHWM reset before the step) minus RSS before it, less library pages mapped during "
                     "it; fresh subprocess per side, code paths warmed up on a small problem first",
           "summary": summary, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
