"""Loss curves of retrofit runs against the GPU's own run-to-run spread.

    python benchmarks/curve_spread.py --reference runs/curves/flex_a --repeat runs/curves/flex_b \
        runs/curves/flex_c --candidate runs/curves/triton --exact runs/curves/exact --out spread.json

Each folder is a ``launch/retrofit.py`` run directory (its ``metrics.jsonl``). The reference and the repeat
are the same configuration run twice: how far apart they drift, step by step, is the spread a GPU run
has by itself (atomics, split-K reductions, the hard eviction decisions amplifying last-bit
differences). Each candidate (another attention backend, the teacher's CUDA graph, ...) is compared with
the reference the same way. Per key (default ``loss/kd``, ``loss/compression``, ``cr/memory``): the
relative difference per step, its maximum over the run and the first step it exceeds 1e-6. A candidate
is ``within_spread`` for a key when its largest difference from the reference is no more than the
largest repeat's (so repeated runs of the reference would not tell them apart). With one repeat the
spread is a lower bound: its runs agree bitwise until the first non-deterministic reduction, while a
candidate with other rounding differs from step 0, so several repeats give a fairer limit.

``--exact``: a run with fp32 attention math (``dms.attention_backend=reference``) as the arbiter: each
run's distance from it, per key, as the maximum and the mean relative difference over the run. A candidate
no farther from the exact run than the reference and its repeats has no error of its own that the curves
can show, even where it falls outside the repeats' spread.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

KEYS = ("loss/kd", "loss/compression", "cr/memory")


def read_curve(run_dir: Path) -> dict[int, dict]:
    """``step -> record`` from a run directory's ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (a launch/retrofit.py run directory?)")
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[int(rec["step"])] = rec
    return out


def relative_differences(a: dict[int, dict], b: dict[int, dict], key: str) -> dict[int, float]:
    """Per common step with ``key`` in both: |b - a| / max(|a|, 1e-12)."""
    out = {}
    for step in sorted(set(a) & set(b)):
        x, y = a[step].get(key), b[step].get(key)
        if (
            isinstance(x, int | float)
            and isinstance(y, int | float)
            and math.isfinite(x)
            and math.isfinite(y)
        ):
            out[step] = abs(y - x) / max(abs(x), 1e-12)
    return out


def _summary(diffs: dict[int, float]) -> dict:
    if not diffs:
        return {"steps": 0, "max": None, "max_step": None, "first_step_over_1e-6": None}
    worst = max(diffs, key=diffs.get)
    first = next((s for s in sorted(diffs) if diffs[s] > 1e-6), None)
    return {"steps": len(diffs), "max": diffs[worst], "max_step": worst, "first_step_over_1e-6": first}


def _widest(summaries: list[dict]) -> dict:
    """The summary with the largest maximum (a key no repeat logged: the first, with no maximum)."""
    logged = [s for s in summaries if s["max"] is not None]
    return max(logged, key=lambda s: s["max"]) if logged else summaries[0]


def compare(
    reference: Path,
    repeat: Path | list[Path],
    candidates: list[Path],
    keys: tuple[str, ...] = KEYS,
    exact: Path | None = None,
) -> dict:
    """The spread of the repeats (the widest of them) and of each candidate against the reference, per
    key; with ``exact``, every run's distance from that run."""
    repeats = [repeat] if isinstance(repeat, Path) else list(repeat)
    ref = read_curve(reference)
    reps = [read_curve(r) for r in repeats]
    report: dict = {
        "reference": str(reference),
        "repeat": [str(r) for r in repeats],
        "keys": list(keys),
        "spread": {},
    }
    for key in keys:
        report["spread"][key] = _widest([_summary(relative_differences(ref, rep, key)) for rep in reps])
    report["candidates"] = {}
    for cand in candidates:
        cur = read_curve(cand)
        row = {}
        for key in keys:
            s = _summary(relative_differences(ref, cur, key))
            limit = report["spread"][key]["max"]
            s["within_spread"] = None if s["max"] is None or limit is None else s["max"] <= limit
            row[key] = s
        report["candidates"][str(cand)] = row
    if exact is not None:
        report["exact"] = {
            "run": str(exact),
            "distance": _distances(exact, [reference, *repeats, *candidates], keys),
        }
    return report


def _distances(exact: Path, runs: list[Path], keys: tuple[str, ...]) -> dict:
    """Per run and key: the maximum and the mean relative difference from the exact run."""
    ex = read_curve(exact)
    out: dict = {}
    for run in runs:
        cur = read_curve(run)
        row = {}
        for key in keys:
            diffs = relative_differences(ex, cur, key)
            row[key] = {
                "max": max(diffs.values()) if diffs else None,
                "mean": sum(diffs.values()) / len(diffs) if diffs else None,
            }
        out[str(run)] = row
    return out


def _table(report: dict) -> str:
    lines = ["| run | " + " | ".join(f"{k}: max rel. diff (step)" for k in report["keys"]) + " |"]
    lines.append("|---" * (len(report["keys"]) + 1) + "|")

    def cells(row: dict) -> str:
        out = []
        for k in report["keys"]:
            s = row[k]
            if s["max"] is None:
                out.append("-")
                continue
            mark = {True: " within", False: " **outside**", None: ""}[s.get("within_spread")]
            out.append(f"{s['max']:.2e} ({s['max_step']}){mark}")
        return " | ".join(out)

    lines.append(f"| repeat of the reference (the spread) | {cells(report['spread'])} |")
    for name, row in report["candidates"].items():
        lines.append(f"| {name} | {cells(row)} |")
    if "exact" in report:
        lines += [
            "",
            f"Distance from the exact-attention run {report['exact']['run']} (max / mean rel. diff):",
            "",
        ]
        lines.append("| run | " + " | ".join(report["keys"]) + " |")
        lines.append("|---" * (len(report["keys"]) + 1) + "|")
        for name, row in report["exact"]["distance"].items():
            got = [row[k] for k in report["keys"]]
            text = [f"{g['max']:.2e} / {g['mean']:.2e}" if g["max"] is not None else "-" for g in got]
            lines.append(f"| {name} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True, help="run directory")
    ap.add_argument(
        "--repeat", type=Path, nargs="+", required=True, help="the reference's configuration, run again"
    )
    ap.add_argument("--candidate", type=Path, nargs="+", default=[], help="run directories to compare")
    ap.add_argument("--exact", type=Path, help="a run with fp32 attention math (the arbiter)")
    ap.add_argument("--keys", nargs="+", default=list(KEYS))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    report = compare(args.reference, args.repeat, args.candidate, tuple(args.keys), args.exact)
    print(_table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
