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


def write_all(res: Result, out: Path) -> list[Path]:
    plt = _plt()
    paths = []
    # Cost vs P95 TTFT scatter.
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, s in res.summary.items():
        x, y = s["ttft_ms"]["p95"], s["cost_per_1k_tokens"]
        ax.scatter([x], [y], s=60 if name.startswith("infermesh") else 30,
                   marker="*" if name.startswith("infermesh") else "o")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
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
    for name, m in res.collectors.items():
        if not m.ttft_ms:
            continue
        v = np.sort(np.asarray(m.ttft_ms))
        idx = np.linspace(0, len(v) - 1, min(len(v), 2000)).astype(int)
        ax.plot(v[idx], (idx + 1) / len(v), label=name, lw=2.0 if name.startswith("infermesh") else 1.0)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms, log)")
    ax.set_ylabel("fraction of completed requests")
    ax.set_title(f"{res.scenario}: TTFT CDF")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(out / "ttft_cdf.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    # Learning curve: P95 TTFT per 10 s of arrivals, infermesh (and its peers for reference).
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, m in res.collectors.items():
        curve = m.learning_curve(10.0)
        if not curve:
            continue
        xs, ys, _ = zip(*curve, strict=True)
        ours = name.startswith("infermesh") or name == "vw_peer"
        ax.plot(xs, ys, label=name, lw=2.0 if ours else 0.8, alpha=1.0 if ours else 0.5)
    ax.set_yscale("log")
    ax.set_xlabel("arrival time (s)")
    ax.set_ylabel("P95 TTFT per 10 s (ms, log)")
    ax.set_title(f"{res.scenario}: learning curve")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(out / "learning_curve.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
