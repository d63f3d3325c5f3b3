"""Reports of ``launch/evaluate.py`` results: markdown tables and the quality-vs-memory (Pareto) plot.

``results`` is the dict written to ``results.json``: ``name`` (the checkpoint), ``tasks`` (``{task:
{policy label: metrics}}``, tasks ``perplexity_{n}``, ``passkey_{filler}_{n}``, ``variable_tracking``),
``timing``. Several results (e.g. a CR 4 and a CR 8 checkpoint evaluated against the same baselines)
merge into one plot: every DMS checkpoint is a labelled marker, every baseline one line through its
fixed-CR sweep points and its equal-memory points.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dms_megatron.inference.evaluate import EQUAL_MEMORY

BASELINES = ("streaming_llm", "tova", "h2o")
_PPL = re.compile(r"perplexity_(\d+)$")
_PASSKEY = re.compile(r"passkey_(?:(\w+)_)?(\d+)$")


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _ppl_lengths(results: dict[str, Any]) -> list[int]:
    return sorted(int(m[1]) for t in results["tasks"] if (m := _PPL.match(t)))


def _passkey_tasks(results: dict[str, Any]) -> list[str]:
    def key(task: str) -> tuple[str, int]:
        m = _PASSKEY.match(task)
        assert m is not None
        return m[1] or "", int(m[2])

    return sorted((t for t in results["tasks"] if _PASSKEY.match(t)), key=key)


def _baseline_of(label: str) -> str | None:
    name = label.split("@")[0]
    return name if name in BASELINES and "@" in label else None


def markdown(results: dict[str, Any]) -> str:
    """Equal-memory tables: perplexity / KL / memory CR per length, pass-key found / trials (memory
    CR) per task, variable tracking, and the wall seconds per phase."""
    tasks = results["tasks"]
    lines = [f"## {results.get('name', 'results')}", ""]
    for key in ("model", "teacher", "device", "dtype"):
        if key in results:
            lines.append(f"- {key}: {results[key]}")
    lines += ["", "memory CR = tokens seen x layers x KV heads / tokens held over all of them.", ""]
    lengths = _ppl_lengths(results)
    if lengths:
        head = "| policy |" + "".join(f" memory CR @{_k(n)} | ppl {_k(n)} | KL {_k(n)} |" for n in lengths)
        lines += ["### Perplexity and KL to the teacher", "", head, "|---" * (1 + 3 * len(lengths)) + "|"]
        for label in tasks[f"perplexity_{lengths[0]}"]:
            cells = []
            for n in lengths:
                row = tasks[f"perplexity_{n}"][label]
                cells += [f"{row['memory_cr']:.2f}", f"{row['perplexity']:.2f}"]
                cells.append(f"{row['kl_to_teacher']:.3f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    pk = _passkey_tasks(results)
    if pk:
        names = [t.removeprefix("passkey_").replace("_", " ") for t in pk]
        lines += [
            "### Pass-key retrieval: found / trials (memory CR)",
            "",
            "| policy | " + " | ".join(names) + " |",
            "|---" * (1 + len(pk)) + "|",
        ]
        for label in tasks[pk[0]]:
            cells = [
                f"{tasks[t][label]['found']}/{tasks[t][label]['trials']} ({tasks[t][label]['memory_cr']:.2f})"
                for t in pk
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    if "variable_tracking" in tasks:
        lines += [
            "### Variable tracking: fraction found (memory CR)",
            "",
            "| policy | found | trials | memory CR |",
            "|---|---|---|---|",
        ]
        for label, row in tasks["variable_tracking"].items():
            lines.append(f"| {label} | {row['found']:.2f} | {row['trials']} | {row['memory_cr']:.2f} |")
        lines.append("")
    if results.get("timing"):
        lines += ["### Wall seconds per phase", "", "| phase | s |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in results["timing"].items()]
        lines.append("")
    return "\n".join(lines)


def _panels(runs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """``(task, metric, title)`` per subplot: KL and perplexity at the longest perplexity length any run
    has (runs without it are not drawn there), then accuracy per pass-key task."""
    lengths = {n for r in runs for n in _ppl_lengths(r)}
    out = []
    if lengths:
        n = max(lengths)
        out += [
            (f"perplexity_{n}", "kl_to_teacher", f"KL to teacher @{_k(n)}"),
            (f"perplexity_{n}", "perplexity", f"perplexity @{_k(n)}"),
        ]
    tasks = list(dict.fromkeys(t for r in runs for t in _passkey_tasks(r)))
    for t in tasks:
        out.append((t, "accuracy", "pass-key " + t.removeprefix("passkey_").replace("_", " ")))
    return out


def pareto_plot(runs: list[dict[str, Any]], path: str | Path) -> None:
    """Quality vs memory CR (log2 x axis), one subplot per metric (see ``_panels``): one line per
    baseline through its fixed-CR sweep with its equal-memory points beside it (hollow; the line
    joins them when there is no sweep), each DMS checkpoint a large labelled
    star, the teacher a dashed line (perplexity, pass-key)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = _panels(runs)
    if not panels:
        raise ValueError("no perplexity or pass-key task in the results: nothing to plot")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    colors = {b: f"C{i}" for i, b in enumerate(BASELINES)}
    dms_colors: dict[str, str] = {}
    for ax, (task, metric, title) in zip(axes.flat, panels, strict=False):
        points: dict[str, dict[str, tuple[float, float, bool]]] = {b: {} for b in BASELINES}
        for i, r in enumerate(runs):
            table = r["tasks"].get(task, {})
            for label, row in table.items():
                base = _baseline_of(label)
                if base is None:
                    continue
                matched = EQUAL_MEMORY in label
                key = f"{label}#{i}" if matched else label  # sweep points shared by the runs: once
                points[base].setdefault(key, (row["memory_cr"], row[metric], matched))
        for base, pts in points.items():
            if not pts:
                continue
            xs, ys, matched = zip(*sorted(pts.values()), strict=True)
            # the curve runs through the fixed-CR sweep; equal-memory points sit beside it, unless the
            # run has no sweep (then they are the curve)
            line = [(x, y) for x, y, m in zip(xs, ys, matched, strict=True) if not m]
            line = line or list(zip(xs, ys, strict=True))
            ax.plot(*zip(*line, strict=True), "-", color=colors[base], label=base, lw=1.2)
            for x, y, m in zip(xs, ys, matched, strict=True):
                ax.plot(x, y, "o", color=colors[base], ms=7 if m else 4, mfc="none" if m else colors[base])
        teacher_drawn = False
        for i, r in enumerate(runs):
            table = r["tasks"].get(task, {})
            for label, row in table.items():
                if label != "dms" and not label.startswith("dms:"):
                    continue
                name = label.removeprefix("dms:") if ":" in label else r.get("name", f"dms {i}")
                color = dms_colors.setdefault(name, f"C{3 + len(dms_colors) % 7}")
                ax.plot(row["memory_cr"], row[metric], "*", ms=16, color=color, mec="k")
                ax.annotate(
                    name,
                    (row["memory_cr"], row[metric]),
                    textcoords="offset points",
                    xytext=(6, 6),
                    fontsize=8,
                )
            if "teacher" in table and metric != "kl_to_teacher" and not teacher_drawn:
                ax.axhline(table["teacher"][metric], ls="--", color="gray", lw=1, label="teacher")
                teacher_drawn = True
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("memory CR (dense KV bytes / held)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[min(1, len(panels) - 1)].legend(fontsize=8)  # the perplexity panel has the teacher too
    fig.suptitle("quality vs KV memory (hollow: baseline at the DMS model's memory)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
