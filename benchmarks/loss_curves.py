"""Training loss curves of a run's experts and trained baselines, and whether each has flattened.

Reads every ``<run>/experts/<name>/train_log.jsonl`` (the three axis experts, sft-mix, ...), plots the per-step
loss and its moving average (window 16) in ``<run>/loss_curves.png`` (or ``--output``), and prints per curve the
mean loss of the first and last 16 steps, the OLS slope of the second half with its 95 % interval (one that
includes 0: the curve has flattened, by this test), and the mean loss of each block of ``--block`` steps (where
the curve stops falling). Last line: ``<name>_slope=<x> ...``.

    python benchmarks/loss_curves.py --run runs/study --output docs/study/loss_curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

WINDOW = 16


def curves(run: Path) -> dict[str, np.ndarray]:
    out = {}
    for log in sorted((run / "experts").glob("*/train_log.jsonl")):
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        if rows:
            out[log.parent.name] = np.array([row["loss"] for row in rows], dtype=float)
    return out


def late_slope(loss: np.ndarray) -> tuple[float, float]:
    """OLS slope of the second half's loss per 100 steps and the half-width of its 95 % interval."""
    y = loss[len(loss) // 2 :]
    x = np.arange(len(y), dtype=float)
    if len(y) < 3:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    se = np.sqrt(residual @ residual / (len(y) - 2) / ((x - x.mean()) @ (x - x.mean())))
    return float(100 * slope), float(100 * 1.96 * se)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/study")
    parser.add_argument("--output", help="where the plot goes (default: <run>/loss_curves.png)")
    parser.add_argument("--block", type=int, default=8, help="steps per block of the block means (default 8)")
    args = parser.parse_args()
    run = Path(args.run)
    found = curves(run)
    if not found:
        raise SystemExit(f"no training logs under {run / 'experts'}: train with `alignx stage1` first")
    fig, axes = plt.subplots(1, len(found), figsize=(3.6 * len(found), 3.2), squeeze=False)
    for ax, (name, loss) in zip(axes[0], found.items()):
        steps = np.arange(1, len(loss) + 1)
        ax.plot(steps, loss, lw=0.6, alpha=0.5)
        if len(loss) >= WINDOW:
            ax.plot(steps[WINDOW - 1 :], np.convolve(loss, np.ones(WINDOW) / WINDOW, mode="valid"), lw=1.6)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step")
    axes[0][0].set_ylabel("training loss (per token)")
    fig.tight_layout()
    output = Path(args.output) if args.output else run / "loss_curves.png"
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    print(f"{'curve':<16}{'steps':>6}{'first 16':>10}{'last 16':>10}   second-half slope per 100 steps (95 % CI)")
    for name, loss in found.items():
        slope, half = late_slope(loss)
        print(f"{name:<16}{len(loss):>6}{loss[:WINDOW].mean():>10.4f}{loss[-WINDOW:].mean():>10.4f}   "
              f"{slope:+.3f} ± {half:.3f}")
    print(f"\nmean loss per block of {args.block} steps")
    for name, loss in found.items():
        blocks = [loss[start : start + args.block].mean() for start in range(0, len(loss), args.block)]
        print(f"{name:<16}" + " ".join(f"{b:.3f}" for b in blocks))
    print(f"plot: {output}")
    print(" ".join(f"{name.replace('-', '_')}_slope={late_slope(loss)[0]:+.3f}" for name, loss in found.items()))


if __name__ == "__main__":
    main()
