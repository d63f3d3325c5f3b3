"""``benchmarks/curve_spread.py``: a candidate's loss curve against the spread of the reference run
repeated, on synthetic ``metrics.jsonl`` files."""

from __future__ import annotations

import json

import pytest

from tests.unit.benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def spread():
    return load_benchmark("curve_spread")


def _run(tmp_path, name: str, kd: list[float], cr: list[float]):
    d = tmp_path / name
    d.mkdir()
    lines = [
        json.dumps({"step": i + 1, "loss/kd": k, "cr/memory": c})
        for i, (k, c) in enumerate(zip(kd, cr, strict=True))
    ]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_a_candidate_within_and_one_outside_the_repeat_spread(spread, tmp_path, capsys) -> None:
    kd = [1.0, 0.8, 0.6, 0.5]
    cr = [1.0, 2.0, 3.0, 4.0]
    ref = _run(tmp_path, "ref", kd, cr)
    rep = _run(tmp_path, "rep", [1.0, 0.8, 0.606, 0.49], cr)  # drifts 1% / 2% by the end
    close = _run(tmp_path, "close", [1.0, 0.8, 0.603, 0.505], cr)
    far = _run(tmp_path, "far", [1.0, 0.85, 0.7, 0.6], [1.0, 2.0, 3.3, 4.0])
    report = spread.compare(ref, rep, [close, far], keys=("loss/kd", "cr/memory", "loss/compression"))
    s = report["spread"]["loss/kd"]
    assert s["max"] == pytest.approx(0.02) and s["max_step"] == 4 and s["first_step_over_1e-6"] == 3
    assert report["spread"]["cr/memory"]["max"] == 0.0
    assert report["spread"]["loss/compression"]["steps"] == 0  # not logged: no verdict on it
    c, f = report["candidates"][str(close)], report["candidates"][str(far)]
    assert c["loss/kd"]["within_spread"] is True and c["cr/memory"]["within_spread"] is True
    assert f["loss/kd"]["within_spread"] is False and f["loss/kd"]["first_step_over_1e-6"] == 2
    assert f["cr/memory"]["within_spread"] is False and f["cr/memory"]["max"] == pytest.approx(0.1)
    assert c["loss/compression"]["within_spread"] is None
    spread.main(["--reference", str(ref), "--repeat", str(rep), "--candidate", str(close), str(far),
                 "--out", str(tmp_path / "s.json")])  # fmt: skip
    table = capsys.readouterr().out
    assert "**outside**" in table and "within" in table
    assert json.loads((tmp_path / "s.json").read_text())["candidates"][str(far)]["loss/kd"]["max_step"] == 4


def test_a_missing_run_is_refused(spread, tmp_path) -> None:
    with pytest.raises(SystemExit, match=r"metrics\.jsonl"):
        spread.read_curve(tmp_path)


def test_several_repeats_widen_the_spread_and_the_exact_run_arbitrates(spread, tmp_path, capsys) -> None:
    cr = [1.0, 2.0, 3.0]
    ref = _run(tmp_path, "ref", [1.0, 0.8, 0.6], cr)
    near = _run(tmp_path, "near", [1.0, 0.8, 0.603], cr)  # 0.5% at the end
    wide = _run(tmp_path, "wide", [1.0, 0.808, 0.6], cr)  # 1% at step 2
    cand = _run(tmp_path, "cand", [1.0, 0.804, 0.606], cr)  # 1% at step 3: within the wider repeat
    exact = _run(tmp_path, "exact", [1.0, 0.802, 0.603], cr)
    report = spread.compare(ref, [near, wide], [cand], keys=("loss/kd",), exact=exact)
    s = report["spread"]["loss/kd"]
    assert s["max"] == pytest.approx(0.01) and s["max_step"] == 2  # the wider of the two repeats
    assert report["candidates"][str(cand)]["loss/kd"]["within_spread"] is True
    dist = report["exact"]["distance"]
    assert set(dist) == {str(ref), str(near), str(wide), str(cand)}
    assert dist[str(ref)]["loss/kd"]["max"] == pytest.approx(0.003 / 0.603)
    assert dist[str(cand)]["loss/kd"]["max"] == pytest.approx(0.003 / 0.603)  # no farther than ref
    assert dist[str(cand)]["loss/kd"]["mean"] == pytest.approx((0.002 / 0.802 + 0.003 / 0.603) / 3)
    spread.main(["--reference", str(ref), "--repeat", str(near), str(wide), "--candidate", str(cand),
                 "--exact", str(exact)])  # fmt: skip
    assert "Distance from the exact-attention run" in capsys.readouterr().out
