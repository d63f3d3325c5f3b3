"""Evaluate a DMS checkpoint against the original model and training-free baselines at equal CR, in the
same engine (``dms_megatron.inference.evaluate``; GPU when available): perplexity and KL to the
teacher on long held-out text, pass-key retrieval at several lengths and depths, variable tracking.
Writes results.json, results.md and a plot.

    python launch/evaluate.py --model exports/smollm2_cr8 --text held_out.txt --out eval/cr8 \
        --policies teacher dms streaming_llm@8 tova@8 h2o@8 --ppl-lengths 2048 4096 8192 \
        --passkey-lengths 2048 4096 7168 --depths 0 0.25 0.5 0.75 1
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
    ap.add_argument(
        "--teacher",
        help="the original model's HF folder (teacher and baselines); default: --model with eviction off, "
        "which is the original only for train.mode=adapter retrofits",
    )
    ap.add_argument("--text", required=True, type=Path, help="held-out text (also the pass-key filler)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--policies", nargs="+", default=["teacher", "dms", "streaming_llm@8", "tova@8", "h2o@8"])
    ap.add_argument(
        "--ppl-lengths", nargs="+", type=int, default=[2048], help="perplexity over these prefixes"
    )
    ap.add_argument("--passkey-lengths", nargs="+", type=int, default=[2048])
    ap.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.5, 0.9])
    ap.add_argument(
        "--filler",
        choices=["classic", "text"],
        default="classic",
        help="pass-key / variable-tracking haystack: the classic repeated sentences or the --text",
    )
    ap.add_argument("--vt-length", type=int, default=1024)
    ap.add_argument("--vt-trials", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk (DMS and teacher)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from dms_megatron.inference.evaluate import CLASSIC_FILLER, passkey, perplexity_and_kl, variable_tracking
    from dms_megatron.inference.model import DMSCausalLM

    policies = _policies(args.policies)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    model = DMSCausalLM.from_pretrained(args.model, dtype=dtype, device=device)
    teacher = DMSCausalLM.from_pretrained(args.teacher, dtype=dtype, device=device) if args.teacher else None
    tok = AutoTokenizer.from_pretrained(args.model)
    text = args.text.read_text(encoding="utf-8", errors="replace")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < max(args.ppl_lengths):
        raise SystemExit(
            f"{args.text} has {len(ids)} tokens, fewer than --ppl-lengths {max(args.ppl_lengths)}"
        )
    t0 = time.perf_counter()
    tasks = perplexity_and_kl(model, policies, ids, args.ppl_lengths, args.chunk, teacher)
    print(f"perplexity at {args.ppl_lengths} tokens done ({time.perf_counter() - t0:.0f} s)", flush=True)
    filler = CLASSIC_FILLER * 20 if args.filler == "classic" else text[:20000]
    tasks.update(
        passkey(
            model, tok, policies, filler, args.passkey_lengths, args.depths, chunk=args.chunk, teacher=teacher
        )
    )
    print(f"pass-key at {args.passkey_lengths} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    tasks["variable_tracking"] = variable_tracking(
        model, tok, policies, filler, args.vt_length, trials=args.vt_trials, chunk=args.chunk, teacher=teacher
    )
    results = {
        "model": str(args.model),
        "teacher": str(args.teacher) if args.teacher else f"{args.model} (eviction off)",
        "text": str(args.text),
        "policies": args.policies,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "dtype": args.dtype,
        "filler": args.filler,
        "tasks": tasks,
    }
    results["wall_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(_markdown(results))
    _plot(results, args.out / "results.png")
    print(_markdown(results))


if __name__ == "__main__":
    main()
