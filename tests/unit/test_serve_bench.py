"""benchmarks/serve_bench.py measures what it names: on a tiny model at a KV budget too small for every
dense row, the DMS model decodes more rows at once, each request finishes, and the report's ratios are
the ratios of its own rows."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

from tests.unit.test_inference_model import _with_dms, tiny  # noqa: F401  (module fixture)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def serve_bench():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))  # serve_bench imports decode_bench as its sibling
    try:
        spec = importlib.util.spec_from_file_location("serve_bench", ROOT / "benchmarks" / "serve_bench.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_fixed_budget_admits_more_dms_rows_and_reports_consistent_ratios(
    serve_bench,
    tiny,  # noqa: F811
    tmp_path,
    capsys,
) -> None:
    model = _with_dms(tiny[1], "adapter", "head", 4)
    ids = torch.randint(0, 96, (400,), generator=torch.Generator().manual_seed(3)).tolist()
    args = argparse.Namespace(
        prompt_lengths=[40, 300], new_tokens=12, kv_budget_gib=[8e-5], requests=6, dense_requests=5,
        max_batch=6, equal_batch=2, block_size=4, prefill_chunk=16, backend="auto", device="cpu", model=None,
        out=tmp_path / "serve.json", progress_every=3,
    )  # fmt: skip
    report = serve_bench.benchmark(model, ids, args)

    assert report["dms"]["window"] == 4 and model.dms is not None  # the DMS block is put back
    runs = report["runs"]
    rows = {r["mode"]: r for r in runs if "mode" in r}
    assert set(rows) == {"dms", "dense"}
    for mode, row in rows.items():
        assert row["finished"] == row["requests"] == {"dms": 6, "dense": 5}[mode], mode
        assert row["errors"] == [], mode
        assert row["peak_pool_blocks_used"] <= row["pool_blocks"]
        assert row["kv_budget_bytes"] <= 8e-5 * 2**30
        assert row["decode_tokens_per_s"] > 0 and row["tpot_ms_p99"] >= row["tpot_ms_p50"] > 0
    assert rows["dense"]["memory_cr"] == 1.0 < rows["dms"]["memory_cr"]
    assert rows["dms"]["peak_rows"] > rows["dense"]["peak_rows"]
    ratio = next(r for r in runs if "decode_tokens_per_s_dms_over_dense" in r)
    assert ratio["decode_tokens_per_s_dms_over_dense"] == pytest.approx(
        rows["dms"]["decode_tokens_per_s"] / rows["dense"]["decode_tokens_per_s"]
    )
    assert ratio["peak_rows_dms_over_dense"] == rows["dms"]["peak_rows"] / rows["dense"]["peak_rows"]
    skipped = [r for r in runs if r.get("prompt_tokens") == 300]
    assert len(skipped) == 1 and "beyond the model context (256)" in skipped[0]["skipped"]
    equal = {r["mode"]: r for r in report["equal_batch"]}
    assert set(equal) == {"dms", "dense"} and all(r["batch"] == 2 for r in equal.values())
    assert equal["dense"]["memory_cr"] == 1.0 < equal["dms"]["memory_cr"]
    # the file written after each row ends as the whole report, marked complete
    import json

    assert json.loads(args.out.read_text()) == json.loads(json.dumps(report)) and report["complete"]
    printed = capsys.readouterr().out  # progress lines: prefills done, then request 0's tokens
    assert "prefilled 3/6" in printed and "prefilled 6/6" in printed and "prefilled 5/5" in printed
    assert "request 0: 12/12 tokens" in printed


def test_past_context_serves_longer_prompts_and_marks_their_rows(serve_bench, tiny, tmp_path) -> None:  # noqa: F811
    """``--past-context``: a prompt longer than the model's context (256 here) is served, not skipped,
    with RoPE positions extrapolated, and its rows say so; the model's own context is raised for it."""
    model = _with_dms(tiny[1], "adapter", "head", 4)
    context = model.arch.max_position_embeddings
    ids = torch.randint(0, 96, (1200,), generator=torch.Generator().manual_seed(4)).tolist()
    args = argparse.Namespace(
        prompt_lengths=[300], new_tokens=8, kv_budget_gib=[2e-3, 1e-5], requests=3, dense_requests=2,
        max_batch=3, equal_batch=0, block_size=4, prefill_chunk=64, backend="auto", device="cpu", model=None,
        out=tmp_path / "serve.json", progress_every=0, past_context=True,
    )  # fmt: skip
    try:
        report = serve_bench.benchmark(model, ids, args)
        assert report["past_context"] == {"trained_context": context, "served_up_to": 308}
        rows = [r for r in report["runs"] if "mode" in r and r["kv_budget_gib"] == 2e-3]
        assert {r["mode"] for r in rows} == {"dms", "dense"}
        for row in rows:
            assert row["past_trained_context"] and row["finished"] == row["requests"] and not row["errors"]
        # at a budget too small for one dense row, dense finishes nothing and no ratio is made of it
        small = {r["mode"]: r for r in report["runs"] if "mode" in r and r["kv_budget_gib"] == 1e-5}
        assert small["dense"]["finished"] == 0 and small["dense"]["errors"]
        ratios = [r for r in report["runs"] if "decode_tokens_per_s_dms_over_dense" in r]
        assert [r["kv_budget_gib"] for r in ratios] == [2e-3]
        assert model.arch.max_position_embeddings == 308
    finally:
        model.extend_context(context)  # the module fixture's model, as it was
