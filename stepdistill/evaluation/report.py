"""Sweep report files: a markdown table and a FID-vs-steps plot."""
from __future__ import annotations

from pathlib import Path

COLUMNS = [("model", "model"), ("solver", "solver"), ("steps", "steps"), ("nfe", "NFE"), ("fid", "FID"),
           ("kid", "KID x1e3"), ("top1", "top-1"), ("top5", "top-5"), ("psnr_vs_teacher", "PSNR vs teacher-50 (dB)"),
           ("feature_dist_vs_teacher", "feat. dist vs teacher-50"), ("latency_ms", "latency ms/img")]


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if isinstance(value, str) or isinstance(value, int):
        return str(value)
    if value is None:
        return "-"
    scale = 1000 if key == "kid" else 100 if key in ("top1", "top5") else 1
    text = f"{value * scale:.2f}" if key != "latency_ms" else f"{value:.1f}"
    spread = row.get(f"{key}_std")
    return f"{text} ± {spread * scale:.2f}" if spread else text


def markdown_table(rows: list[dict]) -> str:
    """GitHub markdown table of the sweep rows (mean ± std over seeds; top-k in %)."""
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row, key) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_markdown(rows: list[dict], path: Path) -> None:
    path.write_text(markdown_table(rows))


def write_plot(rows: list[dict], path: Path) -> None:
    """FID against step count (log2 axis), one line per teacher solver or student, error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    series: dict[str, list[dict]] = {}
    for row in rows:
        series.setdefault(f"{row['model']} ({row['solver']})", []).append(row)
    for label, items in series.items():
        items.sort(key=lambda r: r["steps"])
        ax.errorbar([r["steps"] for r in items], [r["fid"] for r in items], yerr=[r.get("fid_std", 0) for r in items],
                    marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FID (testbed evaluator features)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
