"""PNG charts of pass summaries (matplotlib with the Agg backend, imported only when used)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def plot_sweep(summaries: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Latency (left) and throughput (right) against concurrency, one point per pass."""
    plt = _pyplot()
    from matplotlib import ticker

    xs = [s["concurrency"] for s in summaries]
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    curves = [
        ("ttft_ms", "p50", "TTFT p50"),
        ("ttft_ms", "p99", "TTFT p99"),
        ("itl_ms", "p50", "ITL p50"),
        ("itl_ms", "p99", "ITL p99"),
        ("e2e_ms", "p50", "E2E p50"),
    ]
    if any("healthz" in s for s in summaries):
        curves.append(("healthz", "p99", "/healthz p99"))
    for key, q, label in curves:
        ys = [
            _nan((s[key]["latency_ms"] if key == "healthz" else s[key])[q])
            if key in s
            else float("nan")
            for s in summaries
        ]
        lat.plot(xs, ys, marker="o", label=label)
    lat.set(xlabel="concurrency", ylabel="latency (ms)", title="Latency")
    lat.set_yscale("log")
    lat.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    lat.yaxis.set_minor_formatter(ticker.NullFormatter())
    lat.legend(fontsize="small")
    thr.plot(xs, [s["output_throughput"] for s in summaries], marker="o", color="tab:blue")
    thr.set(xlabel="concurrency", title="Throughput")
    thr.set_ylabel("output tokens/s", color="tab:blue")
    req = thr.twinx()
    req.plot(
        xs, [s["request_throughput"] for s in summaries], marker="s", color="tab:orange", ls="--"
    )
    req.set_ylabel("requests/s", color="tab:orange")
    for ax in (lat, thr):
        if len(xs) > 1 and min(xs) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(True, alpha=0.3)
    return _save(plt, fig, path, title)


def plot_strategies(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One bar group per server configuration: throughput, TTFT and /healthz latency."""
    plt = _pyplot()
    from matplotlib import ticker

    names = [r["name"] for r in rows]
    xs = range(len(rows))
    fig, (thr, ttft, health) = plt.subplots(1, 3, figsize=(14, 4.2))
    thr.bar(xs, [r["summary"]["output_throughput"] for r in rows], color="tab:blue")
    thr.set(ylabel="output tokens/s", title="Throughput")
    width = 0.4
    for ax, key, name in (
        (ttft, lambda r: r["summary"]["ttft_ms"], "TTFT"),
        (health, lambda r: r["summary"]["healthz"]["latency_ms"], "/healthz latency"),
    ):
        for offset, q in ((-width / 2, "p50"), (width / 2, "p99")):
            ax.bar([x + offset for x in xs], [_nan(key(r)[q]) for r in rows], width, label=q)
        ax.set(ylabel="ms", title=name)
        if ax is health:  # an inline engine's stalls are 100x a healthy loop's latency
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.legend(fontsize="small")
    for ax in (thr, ttft, health):
        ax.set_xticks(list(xs), names, rotation=15, fontsize="small")
        ax.grid(True, axis="y", alpha=0.3)
    return _save(plt, fig, path, title)


def _save(plt: Any, fig: Any, path: str | Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
