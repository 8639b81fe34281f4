"""The report card's figures (matplotlib, no display needed). Each function returns the Figure, so tests can read
back what is drawn; `save` writes it as PNG."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        from quantkit.errors import EvalError

        raise EvalError("the report card's plots need matplotlib: pip install 'quantkit[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(title: str, xlabel: str, ylabel: str, xscale: str = "linear", yscale: str = "linear"):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xscale=xscale, yscale=yscale)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def kld_vs_bpw(rows: list[dict]):
    """One labelled point per output: bits per weight (x) against mean KLD to the reference (y, log scale)."""
    fig, ax = _figure("Quality against size", "bits per weight (tensor bytes x 8 / parameters)",
                      "mean KLD to the reference (nats)", yscale="log")
    xs = [r["bpw"] for r in rows]
    ys = [max(r["kld"]["mean"], 1e-6) for r in rows]
    ax.scatter(xs, ys, zorder=3)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.margins(x=0.15)  # room for the labels of the outermost points
    fig.tight_layout()
    return fig


def layer_error(rows: list[dict]):
    """Relative error of the residual stream after each layer (probe positions), one line per output."""
    fig, ax = _figure("Error of each layer's output", "layer", "||h_test - h_ref|| / ||h_ref||", yscale="log")
    for r in rows:
        errors = r["layer_error"]
        ax.plot(range(len(errors)), [max(e, 1e-8) for e in errors], marker="o", markersize=3, label=r["name"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def kld_distribution(rows: list[dict], per_token: dict[str, torch.Tensor]):
    """Empirical CDF of the per-token KLD of each output (log x axis)."""
    fig, ax = _figure("Distribution of per-token KLD", "KLD of a token (nats)", "fraction of tokens at or below",
                      xscale="log")
    for r in rows:
        values = per_token[r["name"]].double().clamp_min(1e-8).sort().values
        ax.plot(values.numpy(), torch.linspace(0, 1, values.numel()).numpy(), label=r["name"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save(fig, path: str | Path) -> None:
    plt = _pyplot()
    fig.savefig(str(path), format="png")
    plt.close(fig)
