"""Speed benchmark report files: markdown tables and one PNG with a panel per measured part, so a run's
figures can be read at a glance instead of from its JSON."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def summarise_reference_pairs(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """The reference comparison over several back-to-back pairs: medians of each script's images/s and peak
    memory and of the per-pair speed-ups, plus the pairs themselves. The machine's speed drifts between runs,
    so only a ratio taken inside one pair is fair, and the median keeps one slow run from deciding it."""
    if not pairs:
        raise ValueError("no reference pair was measured")
    summary: dict[str, Any] = {}
    for name in ("reference", "stepdistill"):
        keys = [key for key in ("images_per_s", "s_per_step", "peak_rss_mib", "peak_tree_pss_mib", "peak_gpu_mib")
                if all(pair[name].get(key) is not None for pair in pairs)]
        summary[name] = {key: statistics.median(pair[name][key] for pair in pairs) for key in keys}
    summary["speedup"] = statistics.median(pair["stepdistill"]["images_per_s"] / pair["reference"]["images_per_s"]
                                           for pair in pairs)
    summary["pairs"] = pairs
    return summary


def speed_markdown(report: dict[str, Any]) -> str:
    """One markdown table per part present in ``report`` (training, sampling and its parts, reference)."""
    parts = []
    if report.get("training"):
        lines = ["| trainer | batch | images/s | s/step | split (s/step) | peak RSS (MiB) | peak GPU memory (MiB) |",
                 "|---|---|---|---|---|---|---|"]
        for row in report["training"]:
            split = ", ".join(f"{k} {v:.3f}" for k, v in sorted(row["split_s_per_step"].items()))
            lines.append(f"| {row['trainer']} | {row['batch']} | {rate_text(row['images_per_s'])} | {row['s_per_step']:.3f} | "
                         f"{split} | {row['peak_rss_mib']:.0f} | {_mib(row.get('peak_gpu_mib'))} |")
        parts.append("\n".join(lines))
    if report.get("sampling"):
        options = report.get("sampling_options", {})
        setting = ", ".join(f"{k} {v}" for k, v in options.items() if k != "compile")
        compiled = "denoisers and VAE decoders compiled with torch.compile" if options.get("compile") else "eager"
        lines = [f"Sampling ({setting + '; ' if setting else ''}{compiled}):", "",
                 "| model | steps | images per call | ms/image | speed-up over the teacher |", "|---|---|---|---|---|"]
        for row in report["sampling"]:
            lines.append(f"| {row['model']} | {row['steps']} | {row['images_per_call']} | {row['latency_ms']:.1f} | "
                         f"{row['speedup_vs_teacher']:.1f}x |")
        parts.append("\n".join(lines))
    if report.get("sampling_parts"):
        steps = list(report["sampling_parts"][0]["predicted_speedup"])
        head = "| images per call | encode | encode + empty prompt | pass | CFG pass | VAE decode | " + \
            " | ".join(f"implied {k}-step speed-up (network only)" for k in steps) + " |"
        lines = ["Parts of one call, ms (the teacher pays encode + empty prompt, 50 CFG passes and a decode; "
                 "a student the encode, k passes and a decode):", "", head, "|---" * (6 + len(steps)) + "|"]
        for row in report["sampling_parts"]:
            p = row["parts_ms"]
            implied = " | ".join(f"{v['with_fixed_costs']:.1f}x ({v['network_only']:.1f}x)"
                                 for v in row["predicted_speedup"].values())
            lines.append(f"| {row['images_per_call']} | {p['encode']:.1f} | {p['encode_cfg']:.1f} | {p['pass']:.1f} | "
                         f"{p['cfg_pass']:.1f} | {p['decode']:.1f} | {implied} |")
        parts.append("\n".join(lines))
    if report.get("reference"):
        ref = report["reference"]
        pairs = ref.get("pairs", [])
        label = f"median of {len(pairs)} pairs" if len(pairs) > 1 else "one pair"
        processes = ref.get("processes", {})
        label += "".join(f"; {name} as {n} processes" for name, n in processes.items() if n > 1)
        gpu = any(ref[name].get("peak_gpu_mib") is not None for name in ("reference", "stepdistill"))
        lines = [f"| LCM-LoRA script ({label}) | images/s | peak RSS, largest process (MiB) | peak PSS, process tree (MiB) |"
                 + (" peak GPU memory, nvidia-smi (MiB) |" if gpu else ""), "|---|---|---|---|" + ("---|" if gpu else "")]
        for name in ("reference", "stepdistill"):
            lines.append(f"| {name} | {ref[name]['images_per_s']:.1f} | {ref[name]['peak_rss_mib']:.0f} | "
                         f"{_mib(ref[name].get('peak_tree_pss_mib'))} |" + (f" {_mib(ref[name].get('peak_gpu_mib'))} |" if gpu else ""))
        lines.append(f"\nspeed-up: {ref['speedup']:.2f}x")
        if len(pairs) > 1:
            lines += ["", "| pair | reference images/s, RSS, tree PSS (MiB) | stepdistill images/s, RSS, tree PSS (MiB) | speed-up |",
                      "|---|---|---|---|"]
            for i, pair in enumerate(pairs, 1):
                a, b = pair["reference"], pair["stepdistill"]
                lines.append(f"| {i} | {a['images_per_s']:.1f}, {a['peak_rss_mib']:.0f}, {_mib(a.get('peak_tree_pss_mib'))} | "
                             f"{b['images_per_s']:.1f}, {b['peak_rss_mib']:.0f}, {_mib(b.get('peak_tree_pss_mib'))} | "
                             f"{b['images_per_s'] / a['images_per_s']:.2f}x |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def rate_text(images_per_s: float) -> str:
    """Images/s with one decimal, or three below 1 (a full-size UNet on the CPU is not "0.0")."""
    return f"{images_per_s:.1f}" if images_per_s >= 1 else f"{images_per_s:.3f}"


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def write_speed_plot(report: dict[str, Any], path: Path) -> None:
    """Training images/s per trainer, sampling ms/image per row (log scale, speed-up printed on each bar),
    and the reference comparison, as side-by-side panels of one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [part for part in ("training", "sampling", "reference") if report.get(part)]
    if not panels:
        raise ValueError("the speed report holds no measured part to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), dpi=120, squeeze=False)
    for ax, part in zip(axes[0], panels):
        if part == "training":
            rows = report["training"]
            bars = ax.bar([r["trainer"] for r in rows], [r["images_per_s"] for r in rows], color="tab:blue")
            ax.bar_label(bars, labels=[f"{r['peak_rss_mib']:.0f} MiB" for r in rows], fontsize=8)
            ax.set_ylabel("training images/s")
            ax.set_title(f"training, batch {rows[0]['batch']}")
        elif part == "sampling":
            rows = report["sampling"]
            labels = [f"{r['model']}\n{r['steps']} steps, x{r['images_per_call']}" for r in rows]
            bars = ax.bar(range(len(rows)), [r["latency_ms"] for r in rows],
                          color=["tab:gray" if r["speedup_vs_teacher"] == 1.0 else "tab:green" for r in rows])
            ax.bar_label(bars, labels=[f"{r['speedup_vs_teacher']:.1f}x" for r in rows], fontsize=8)
            ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=30, ha="right")
            ax.set_yscale("log")
            ax.set_ylabel("ms per image (log)")
            ax.set_title("sampling (x N: images per call)")
        else:
            ref = report["reference"]
            names = ["reference", "stepdistill"]
            bars = ax.bar(names, [ref[n]["images_per_s"] for n in names], color=["tab:gray", "tab:blue"])
            ax.bar_label(bars, labels=[f"RSS {ref[n]['peak_rss_mib']:.0f} MiB" + (
                f"\ntree PSS {ref[n]['peak_tree_pss_mib']:.0f} MiB" if ref[n].get("peak_tree_pss_mib") else "") + (
                f"\nGPU {ref[n]['peak_gpu_mib']:.0f} MiB" if ref[n].get("peak_gpu_mib") else "")
                for n in names], fontsize=8)
            ax.set_ylabel("LCM-LoRA training images/s")
            ax.set_title(f"against diffusers' script: {ref['speedup']:.2f}x")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
