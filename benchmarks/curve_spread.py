"""Loss curves of retrofit runs against the GPU's own run-to-run spread.

    python benchmarks/curve_spread.py --reference runs/curves/flex_a --repeat runs/curves/flex_b \
        --candidate runs/curves/triton runs/curves/triton_graph --out spread.json

Each folder is a ``launch/retrofit.py`` run directory (its ``metrics.jsonl``). The reference and the repeat
are the same configuration run twice: how far apart they drift, step by step, is the spread a GPU run
has by itself (atomics, split-K reductions, the hard eviction decisions amplifying last-bit
differences). Each candidate (another attention backend, the teacher's CUDA graph, ...) is compared with
the reference the same way. Per key (default ``loss/kd``, ``loss/compression``, ``cr/memory``): the
relative difference per step, its maximum over the run and the first step it exceeds 1e-6. A candidate
is ``within_spread`` for a key when its largest difference from the reference is no more than the
repeat's (so two runs of the reference would not tell them apart).
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


def compare(reference: Path, repeat: Path, candidates: list[Path], keys: tuple[str, ...] = KEYS) -> dict:
    """The spread of the repeat and of each candidate against the reference, per key."""
    ref = read_curve(reference)
    rep = read_curve(repeat)
    report: dict = {"reference": str(reference), "repeat": str(repeat), "keys": list(keys), "spread": {}}
    for key in keys:
        report["spread"][key] = _summary(relative_differences(ref, rep, key))
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
    return report


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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True, help="run directory")
    ap.add_argument("--repeat", type=Path, required=True, help="the reference's configuration, run again")
    ap.add_argument("--candidate", type=Path, nargs="+", default=[], help="run directories to compare")
    ap.add_argument("--keys", nargs="+", default=list(KEYS))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    report = compare(args.reference, args.repeat, args.candidate, tuple(args.keys))
    print(_table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
