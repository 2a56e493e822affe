"""Equal-fit analysis of a finished translation study (PYTHONPATH=. python results/equal_fit.py STUDY_DIR).

For every evaluation of every non-baseline run it prints the train NLL reached (label-smoothed, dropout on, mean of
the train records in the ``--window`` steps before the evaluation; one copy's for R-Drop), the test loss, and two
differences against the baseline arm's seed-mean curve, linearly interpolated:

- ``dloss@fit``: test loss minus the baseline's test loss at the same train NLL (below 0: better generalisation
  at equal fit, what a regulariser should show);
- ``dbleu@loss``: subset BLEU minus the baseline's BLEU at the same test loss, on the baseline's curve up to its
  best test loss (below 0: worse output than the test loss suggests; nan below the baseline's best loss).

It also prints each run's whole-split BLEU breakdown (brevity penalty, length ratio, precisions, distinct outputs)
from its ``predictions/*.hyp`` against the reference file given with ``--ref``. Only reads; writes nothing.
"""
from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

from engine.study import read_jsonl


def records(run: Path) -> tuple[list[dict], list[dict]]:
    rows = read_jsonl(run / "metrics.jsonl")
    train = [r for r in rows if r.get("kind") == "train"]
    evals = {r["step"]: r for r in rows if r.get("kind") == "eval"}    # a resumed step's last record wins
    return train, [evals[s] for s in sorted(evals)]


def curve(run: Path, window: int) -> list[tuple[int, float, float, float]]:
    """(step, train NLL over the window before it, test loss, subset BLEU) per evaluation; the BLEU is nan where
    the evaluation generated more than the subset (the final one, on the whole split: not on the curve's scale)."""
    train, evals = records(run)
    subset = min(e.get("gen_examples", 0) for e in evals) if evals else 0
    out = []
    for e in evals:
        nll = [t["nll"] for t in train if e["step"] - window < t["step"] <= e["step"]]
        if nll:
            bleu = e["bleu"] if e.get("gen_examples", 0) == subset else float("nan")
            out.append((e["step"], float(np.mean(nll)), e["loss"], bleu))
    return out


def interp(x: float, xs: list[float], ys: list[float]) -> float:
    """y at x on the curve (xs, ys) over its finite points; xs must be monotone (either way); nan outside its
    range."""
    xs_, ys_ = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    keep = np.isfinite(xs_) & np.isfinite(ys_)
    xs_, ys_ = xs_[keep], ys_[keep]
    order = np.argsort(xs_)
    xs_, ys_ = xs_[order], ys_[order]
    if not np.isfinite(x) or not len(xs_) or x < xs_[0] or x > xs_[-1]:
        return float("nan")
    return float(np.interp(x, xs_, ys_))


def breakdown(run: Path, ref: list[str]) -> str:
    import sacrebleu
    hyps = sorted((run / "predictions").glob("*.hyp"))
    if not hyps:
        return "no predictions"
    hyp = hyps[0].read_text().splitlines()
    if len(hyp) != len(ref):
        return f"{hyps[0].name}: {len(hyp)} lines, reference {len(ref)}"
    b = sacrebleu.corpus_bleu(hyp, [ref])
    prec = " / ".join(f"{p:.1f}" for p in b.precisions)
    return (f"BLEU {b.score:.2f}, BP {b.bp:.3f} (ratio {b.sys_len / b.ref_len:.3f}), precisions {prec}, "
            f"{len(set(hyp))} distinct of {len(hyp)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study_dir", type=Path)
    ap.add_argument("--baseline", default="none")
    ap.add_argument("--window", type=int, default=75, help="train steps averaged before each evaluation")
    ap.add_argument("--ref", type=Path, default=None, help="reference file (.gz allowed) for the BLEU breakdown")
    a = ap.parse_args()
    runs = sorted(p.parent for p in (a.study_dir / "runs").glob("*/*/metrics.jsonl"))
    if not runs:
        raise SystemExit(f"no runs under {a.study_dir / 'runs'}: pass the study's --dir")
    base = [curve(r, a.window) for r in runs if r.parent.name == a.baseline]
    if not base:
        raise SystemExit(f"no runs of the baseline arm {a.baseline!r}: pass --baseline ARM")
    steps = sorted(set.intersection(*(set(s for s, *_ in c) for c in base)))
    mean = [np.mean([[x for x in c if x[0] == s][0][1:] for c in base], axis=0) for s in steps]
    b_nll, b_loss, b_bleu = ([m[i] for m in mean] for i in range(3))
    # BLEU against test loss only up to the baseline's best test loss: past it (an overfitting baseline) the loss
    # rises again and one loss would map to two BLEUs
    best = int(np.nanargmin(b_loss)) + 1
    ref = None
    if a.ref:
        opener = gzip.open if a.ref.suffix == ".gz" else open
        with opener(a.ref, "rt") as f:
            ref = f.read().splitlines()
    print(f"baseline {a.baseline} (mean of {len(base)} seeds): "
          + ", ".join(f"{s}: nll {n:.3f} loss {lo:.3f} bleu {bl:.2f}" for s, n, lo, bl in zip(steps, b_nll, b_loss, b_bleu)))
    for run in runs:
        name = f"{run.parent.name}/{run.name}"
        if ref is not None:
            print(f"{name}: {breakdown(run, ref)}")
        if run.parent.name == a.baseline:
            continue
        for step, nll, loss, bleu in curve(run, a.window):
            print(f"  {name} step {step}: train NLL {nll:.3f}, test loss {loss:.3f}, BLEU {bleu:.2f}; "
                  f"dloss@fit {loss - interp(nll, b_nll, b_loss):+.3f}, "
                  f"dbleu@loss {bleu - interp(loss, b_loss[:best], b_bleu[:best]):+.2f}")


if __name__ == "__main__":
    main()
