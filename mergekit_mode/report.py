"""`mergekit-mode report`: the eval table plus a routing heatmap per domain (layer x expert share).

One panel per domain, all on one colour scale from 0 to 1 with the share printed in each cell, so
a glance shows whether each domain's tokens go to its own expert, in which layers, and how
balanced the rest is. matplotlib is an optional extra (`pip install 'mergekit-mode[report]'`).
"""

from __future__ import annotations

from pathlib import Path

from mergekit_mode.errors import ModeError
from mergekit_mode.evaluate import DomainResult


def pyplot():
    """matplotlib's pyplot without a display, or a ModeError saying how to install it (called
    before the evaluation, so a missing extra fails in a second rather than after the run)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ModeError("--plot: needs matplotlib (pip install 'mergekit-mode[report]')") from None
    return plt


def plot_routing(results: dict[str, DomainResult], names: list[str], out: Path) -> None:
    """Write the heatmaps of every MoE domain result to `out` (PNG, PDF or SVG by its suffix)."""
    plt = pyplot()
    routed = {d: r for d, r in results.items() if r.routing is not None}
    if not routed:
        raise ModeError("--plot: MODEL is not a mixture of experts (no router), nothing to plot")
    layers = len(next(iter(routed.values())).routing)
    cell = 0.6
    fig, axes = plt.subplots(1, len(routed), squeeze=False, constrained_layout=True,
                             figsize=((cell * len(names) + 1.0) * len(routed) + 1.2, cell * layers + 2.2))
    for ax, (domain, r) in zip(axes[0], routed.items()):
        image = ax.imshow(r.routing, vmin=0, vmax=1, cmap="Blues", aspect="equal")
        for layer, row in enumerate(r.routing):
            for e, share in enumerate(row):
                ax.text(e, layer, f"{share:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if share > 0.6 else "black")
        ax.set_title(f"{domain}\nppl {r.perplexity:.2f}", fontsize=10)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(layers), [str(i) for i in range(layers)], fontsize=8)
        ax.set_xlabel("expert")
    axes[0][0].set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="share of tokens routed to the expert", shrink=0.9)
    fig.suptitle("Routing per domain", fontsize=11)
    try:
        fig.savefig(out, dpi=150)
    except (OSError, ValueError) as e:
        raise ModeError(f"--plot: cannot write {out} ({e})") from None
    finally:
        plt.close(fig)
