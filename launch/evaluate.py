"""Evaluate a DMS checkpoint against the original model and training-free baselines at equal CR, in the
same engine (CPU reference path): perplexity and KL to the teacher on long held-out text, pass-key
retrieval at several lengths and depths, variable tracking. Writes results.json, results.md and a plot.

    python launch/evaluate.py --model exports/smollm2_cr8 --text held_out.txt --out eval/cr8 \
        --policies teacher dms streaming_llm@8 tova@8 h2o@8 --ppl-lengths 2048 4096 \
        --passkey-lengths 2048 4096 --depths 0.1 0.5 0.9
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _policies(specs: list[str]):
    from dms_megatron.inference.evaluate import Policy

    out = []
    for spec in specs:
        name, _, cr = spec.partition("@")
        if name not in ("teacher", "dms") and not cr:
            raise SystemExit(f"policy {spec!r}: baselines need a CR, e.g. {name}@8")
        out.append(Policy(name, float(cr) if cr else 1.0))
    return out


def _markdown(results: dict) -> str:
    lines = []
    for task, table in results["tasks"].items():
        metrics = sorted({k for row in table.values() for k in row})
        lines += [
            f"### {task}",
            "",
            "| policy | " + " | ".join(metrics) + " |",
            "|---" * (len(metrics) + 1) + "|",
        ]
        for policy, row in table.items():
            cells = [
                f"{row[m]:.4g}" if isinstance(row.get(m), float) else str(row.get(m, "")) for m in metrics
            ]
            lines.append(f"| {policy} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False)
    for ax, (task, table) in zip(axes[0], tasks.items(), strict=True):
        metric = next(m for m in ("perplexity", "accuracy", "found") if m in next(iter(table.values())))
        ax.bar(list(table), [row[metric] for row in table.values()])
        ax.set_title(f"{task}: {metric}")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="exported HF folder with a dms block")
    ap.add_argument("--text", required=True, type=Path, help="held-out text (also the pass-key filler)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--policies", nargs="+", default=["teacher", "dms", "streaming_llm@8", "tova@8", "h2o@8"])
    ap.add_argument("--ppl-lengths", nargs="+", type=int, default=[2048])
    ap.add_argument("--passkey-lengths", nargs="+", type=int, default=[2048])
    ap.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.5, 0.9])
    ap.add_argument("--vt-length", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from dms_megatron.inference.evaluate import passkey, perplexity_and_kl, variable_tracking
    from dms_megatron.inference.model import DMSCausalLM

    policies = _policies(args.policies)
    model = DMSCausalLM.from_pretrained(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    text = args.text.read_text(encoding="utf-8", errors="replace")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < max(args.ppl_lengths):
        raise SystemExit(
            f"{args.text} has {len(ids)} tokens, fewer than --ppl-lengths {max(args.ppl_lengths)}"
        )
    t0 = time.perf_counter()
    tasks = {}
    for n in args.ppl_lengths:
        tasks[f"perplexity_{n}"] = perplexity_and_kl(model, policies, ids[:n], args.chunk)
        print(f"perplexity at {n} tokens done ({time.perf_counter() - t0:.0f} s)", flush=True)
    filler = text[:20000]
    tasks["passkey"] = passkey(
        model, tok, policies, filler, args.passkey_lengths, args.depths, chunk=args.chunk
    )
    tasks["variable_tracking"] = variable_tracking(
        model, tok, policies, filler, args.vt_length, chunk=args.chunk
    )
    results = {"model": str(args.model), "text": str(args.text), "policies": args.policies, "tasks": tasks}
    results["wall_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(_markdown(results))
    _plot(results, args.out / "results.png")
    print(_markdown(results))


if __name__ == "__main__":
    main()
