"""PNG plots: cost vs P95 TTFT (as in the whitepaper), TTFT CDFs, and the learning curve."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sim.runner import Result


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _positive(v: Any) -> bool:
    """Placeable on a log axis: a finite number > 0 (NaN means the strategy served nothing)."""
    return isinstance(v, (int, float)) and bool(np.isfinite(v)) and v > 0


def _empty(ax: Any) -> None:
    ax.text(0.5, 0.5, "no request got a first token", ha="center", va="center", transform=ax.transAxes)


def write_all(res: Result, out: Path) -> list[Path]:
    """Write the three PNGs into ``out``; strategies without data (NaN) are left out, never a crash."""
    plt = _plt()
    paths = []
    # Cost vs P95 TTFT scatter.
    fig, ax = plt.subplots(figsize=(7, 5))
    plotted = 0
    for name, s in res.summary.items():
        x, y = s["ttft_ms"]["p95"], s["cost_per_1k_tokens"]
        if not _positive(x) or not np.isfinite(y):
            continue  # nothing served (NaN P95 or cost): no point to place, and log axes refuse it
        plotted += 1
        ax.scatter([x], [y], s=60 if name.startswith("infermesh") else 30,
                   marker="*" if name.startswith("infermesh") else "o")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if plotted:
        ax.set_xscale("log")
    else:
        _empty(ax)
    ax.set_xlabel("P95 TTFT (ms, log)")
    ax.set_ylabel("$ per 1K output tokens (request GPU-seconds)")
    ax.set_title(f"{res.scenario}: cost vs P95 TTFT")
    ax.grid(True, alpha=0.3)
    paths.append(out / "cost_vs_p95_ttft.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    # TTFT CDFs.
    fig, ax = plt.subplots(figsize=(7, 5))
    plotted = 0
    for name, m in res.collectors.items():
        v = np.sort(np.asarray(m.ttft_ms))
        v = v[v > 0]
        if not len(v):
            continue
        plotted += 1
        idx = np.linspace(0, len(v) - 1, min(len(v), 2000)).astype(int)
        ax.plot(v[idx], (idx + 1) / len(v), label=name, lw=2.0 if name.startswith("infermesh") else 1.0)
    if plotted:
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    else:
        _empty(ax)
    ax.set_xlabel("TTFT (ms, log)")
    ax.set_ylabel("fraction of requests with a first token")
    ax.set_title(f"{res.scenario}: TTFT CDF")
    ax.grid(True, alpha=0.3)
    paths.append(out / "ttft_cdf.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    # Learning curve: P95 TTFT per 10 s of arrivals, infermesh (and its peers for reference).
    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = 0
    for name, m in res.collectors.items():
        curve = [c for c in m.learning_curve(10.0) if _positive(c[1])]
        if not curve:
            continue
        plotted += 1
        xs, ys, _ = zip(*curve, strict=True)
        ours = name.startswith("infermesh") or name == "vw_peer"
        ax.plot(xs, ys, label=name, lw=2.0 if ours else 0.8, alpha=1.0 if ours else 0.5)
    if plotted:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    else:
        _empty(ax)
    ax.set_xlabel("arrival time (s)")
    ax.set_ylabel("P95 TTFT per 10 s (ms, log)")
    ax.set_title(f"{res.scenario}: learning curve")
    ax.grid(True, alpha=0.3)
    paths.append(out / "learning_curve.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
