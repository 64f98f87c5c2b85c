"""The end-of-run figure: accuracy per epoch, and layer-wise accuracy (the paper's layer-wise curve)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

__all__ = ["plot_runs"]

_COLORS = {"auglocal": "tab:blue", "bp": "tab:orange", "dgl": "tab:green", "predsim": "tab:red",
           "infopro": "tab:purple", "greedy": "tab:brown"}


def plot_runs(histories: Mapping[str, Sequence[Dict[str, Any]]], path: Path, *, title: str = "") -> Path:
    """Save a PNG with two panels for one or more runs (keyed by rule):

    left, test top-1 of the final head per epoch;
    right, the accuracy of each layer's aux net at the last evaluated epoch, the final head last (the paper's
    layer-wise figure; backprop, which has no aux nets, is its final accuracy as a dashed line).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; keeps headless servers happy
    import matplotlib.pyplot as plt

    fig, (ax_curve, ax_layers) = plt.subplots(1, 2, figsize=(11, 4.2))
    for rule, history in histories.items():
        evaluated = [r for r in history if r.get("eval_top1") is not None]
        if not evaluated:
            continue
        color = _COLORS.get(rule)
        epochs = [r["epoch"] for r in evaluated]
        ax_curve.plot(epochs, [r["eval_top1"] for r in evaluated], marker="o", ms=3, color=color,
                      label=f"{rule} (best {max(r['eval_top1'] for r in evaluated):.2f}%)")
        layer_acc: List[float] = evaluated[-1].get("layer_acc") or []
        if len(layer_acc) > 1:
            xs = list(range(1, len(layer_acc) + 1))
            ax_layers.plot(xs, layer_acc, marker="o", ms=3, color=color, label=f"{rule}: aux nets, then head")
        else:
            ax_layers.axhline(evaluated[-1]["eval_top1"], color=color, ls="--", label=f"{rule}: final head")
    ax_curve.set_xlabel("epoch")
    ax_curve.set_ylabel("test top-1 (%)")
    ax_curve.set_title("test accuracy")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(loc="best")
    from matplotlib.ticker import MaxNLocator

    ax_layers.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_layers.set_xlabel("local layer")
    ax_layers.set_ylabel("test top-1 (%)")
    ax_layers.set_title("layer-wise accuracy (last epoch)")
    ax_layers.grid(alpha=0.3)
    if ax_layers.lines:
        ax_layers.legend(loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
