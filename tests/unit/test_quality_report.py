"""Reports of launch/evaluate.py: equal-memory markdown tables and the quality-vs-memory plot from
synthetic results, one run or several merged (``launch/evaluate.py plot a.json b.json --out p.png``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dms_megatron.inference.quality_report import _panels, markdown, pareto_plot

ROOT = Path(__file__).resolve().parents[2]


def _results(name: str, dms_cr: float, sweep: bool) -> dict:
    def ppl(cr: float, kl: float) -> dict:
        return {"perplexity": 30 + 40 * kl, "kl_to_teacher": kl, "memory_cr": cr, "stream_cr_mean": cr * 1.5}

    def pk(cr: float, found: int) -> dict:
        return {"accuracy": found / 10, "found": found, "trials": 10, "memory_cr": cr, "stream_cr_mean": cr}

    rows = {"teacher": (1.0, 0.0, 9), "dms": (dms_cr, 0.2, 3)}
    for base, k in (("streaming_llm", 0.05), ("tova", 0.07), ("h2o", 0.03)):
        rows[f"{base}@=dms"] = (dms_cr, k * dms_cr, 2)
        if sweep:
            rows |= {f"{base}@{cr:g}": (cr, k * cr, max(0, 8 - cr)) for cr in (2, 4, 8, 16)}
    tasks = {
        f"perplexity_{n}": {label: ppl(cr, kl) for label, (cr, kl, _) in rows.items()} for n in (2048, 8192)
    }
    for filler in ("classic", "text"):
        tasks[f"passkey_{filler}_4096"] = {label: pk(cr, f) for label, (cr, _, f) in rows.items()}
    return {
        "name": name,
        "model": f"exports/{name}",
        "tasks": tasks,
        "timing": {"perplexity/baselines": 12.5},
    }


def test_markdown_has_memory_cr_columns_and_trials() -> None:
    md = markdown(_results("cr8", 4.2, sweep=True))
    assert "| policy | memory CR @2K | ppl 2K | KL 2K | memory CR @8K |" in md
    assert "| h2o@=dms | 4.20 |" in md
    assert "| dms | 3/10 (4.20) | 3/10 (4.20) |" in md  # found / trials (memory CR) per pass-key task
    assert "perplexity/baselines | 12.5" in md and "effective" not in md


def test_pareto_plot_one_run_and_merged_cli(tmp_path: Path) -> None:
    a, b = _results("cr8", 4.2, sweep=True), _results("cr4", 2.9, sweep=False)
    assert [title for _, _, title in _panels([a, b])] == [
        "KL to teacher @8K",
        "perplexity @8K",
        "pass-key classic 4096",
        "pass-key text 4096",
    ]
    pareto_plot([a], tmp_path / "one.png")
    assert (tmp_path / "one.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in (a, b):
        (tmp_path / f"{r['name']}.json").write_text(json.dumps(r))
    from dms_megatron.cli import evaluate as cli

    out = tmp_path / "merged" / "pareto.png"
    cli.main(["plot", str(tmp_path / "cr8.json"), str(tmp_path / "cr4.json"), "--out", str(out)])
    assert out.stat().st_size > 10_000
    merged = out.with_suffix(".md").read_text()
    assert "## cr8" in merged and "## cr4" in merged
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["plot", str(tmp_path / "missing.json"), "--out", str(out)])
    policies = cli._policies(["teacher", "dms", "h2o", "tova@=dms", "streaming_llm@8"])
    assert [p.label for p in policies] == ["teacher", "dms", "h2o@=dms", "tova@=dms", "streaming_llm@8"]
