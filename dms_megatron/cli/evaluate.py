"""Evaluate a DMS checkpoint against the original model and training-free baselines at equal KV
memory, in the same engines (``dms_megatron.inference.evaluate``; GPU when available): perplexity and
KL to the teacher on long held-out text, pass-key retrieval at several lengths, variable tracking.
Writes results.json (with wall seconds per phase under ``timing``), results.md and a quality-vs-memory
plot (results.png).

Every CR is the memory CR: dense KV bytes / KV bytes held, over all layers and KV heads. Policies:
``teacher``, ``dms``, a baseline name alone (``streaming_llm``, ``tova``, ``h2o``, or ``h2o@=dms``):
the baseline at the DMS model's KV memory (label ``h2o@=dms``), or with a CR (``h2o@8``).
``--sweep-crs`` adds ``{baseline}@{cr}`` rows for each of ``--sweep-policies`` (the points of the
baseline curves), in the same lockstep batch.

    # CR 4 and CR 8 checkpoints in one run (one teacher pass, one baseline batch per task)
    dms-evaluate --model exports/cr4 exports/cr8 --name cr4 cr8 \
        --teacher assets/smollm2-135m-instruct --text held_out.txt --out eval/cr4_cr8 \
        --ppl-lengths 2048 4096 8192 --passkey-lengths 2048 4096 7168 --sweep-crs 2 3 4 6 8 12 16
    # one Pareto plot (and merged tables) of several results files against the same baseline curves
    dms-evaluate plot eval/cr4_cr8/results.json eval/other/results.json --out eval/pareto.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BASELINE_NAMES = ["streaming_llm", "tova", "h2o"]
PASSKEY_ANSWER_TOKENS = 6  # tokens generated after each pass-key prompt (inference.evaluate.passkey)
VT_ANSWER_TOKENS = 16  # after each variable-tracking prompt (3 hops)


def check_args(args: argparse.Namespace) -> None:
    """Refuse invalid numeric flags and lengths beyond a model's context before any weights load
    (``SystemExit`` with one ``error:`` line naming the flag, or the config.json that sets the context)."""
    problems = []
    for flag in ("ppl_lengths", "passkey_lengths"):
        bad = [n for n in getattr(args, flag) if n < 1]
        if bad:
            problems.append(f"--{flag.replace('_', '-')} must be >= 1, got {bad}")
    for flag, low in (("vt_length", 1), ("passkey_trials", 1), ("vt_trials", 0), ("chunk", 1)):
        if getattr(args, flag) < low:
            problems.append(f"--{flag.replace('_', '-')} must be >= {low}, got {getattr(args, flag)}")
    for flag in ("stride", "max_rows"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    bad_depths = [d for d in args.depths if not 0 <= d <= 1]
    if bad_depths:
        problems.append(f"--depths must be in [0, 1], got {bad_depths}")
    bad_crs = [c for c in args.sweep_crs if not c >= 1]
    if bad_crs:
        problems.append(f"--sweep-crs must be >= 1, got {bad_crs}")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    if not args.text.is_file():
        raise SystemExit(f"error: --text {args.text}: no such file")
    needs = [("--ppl-lengths", max(args.ppl_lengths), 0)]
    if args.passkey_lengths:
        needs.append(("--passkey-lengths", max(args.passkey_lengths), PASSKEY_ANSWER_TOKENS))
    if args.vt_trials > 0:
        needs.append(("--vt-length", args.vt_length, VT_ANSWER_TOKENS))
    for folder in [*args.model, *([args.teacher] if args.teacher else [])]:
        config = Path(folder) / "config.json"
        if not config.is_file():
            raise SystemExit(f"error: {folder}: no config.json (not an exported HF folder)")
        context = json.loads(config.read_text()).get("max_position_embeddings")
        for flag, length, answer in needs:
            if context is not None and length + answer > context:
                extra = f" + {answer} answer tokens" if answer else ""
                raise SystemExit(
                    f"error: {flag} {length}{extra} exceeds the model context of {context} positions "
                    f"({config})"
                )


def _policies(specs: list[str], refs: tuple[str, ...] = ("",)):
    """Policies from CLI specs; ``dms`` and equal-memory baselines once per checkpoint ``refs``."""
    from dms_megatron.inference.evaluate import EQUAL_MEMORY, Policy

    out = []
    for spec in specs:
        name, at, cr = spec.partition("@")
        if name in ("teacher", "dms"):
            if at:
                raise SystemExit(f"policy {spec!r}: teacher and dms take no CR")
            out += [Policy(name)] if name == "teacher" else [Policy(name, ref=r) for r in refs]
        elif not at or "@" + cr == EQUAL_MEMORY:
            out += [Policy(name, None, ref=r) for r in refs]
        else:
            try:
                out.append(Policy(name, float(cr)))
            except ValueError as exc:
                raise SystemExit(f"policy {spec!r}: {exc}") from None
    return out


def plot_main(argv: list[str]) -> None:
    """``plot a/results.json b/results.json --out pareto.png``: one Pareto plot of several runs."""
    ap = argparse.ArgumentParser(
        prog="dms-evaluate plot",
        description="Merge results.json files (e.g. a CR 4 and a CR 8 checkpoint) into one quality-vs-"
        "memory plot; baseline curves come from every file (sweep points once), each DMS checkpoint is "
        "a labelled marker. Also writes the files' tables into one markdown file next to the plot.",
    )
    ap.add_argument("results", nargs="+", type=Path, help="results.json files of dms-evaluate")
    ap.add_argument("--out", required=True, type=Path, help="the PNG to write (and OUT.md with the tables)")
    args = ap.parse_args(argv)
    from dms_megatron.inference.quality_report import markdown, pareto_plot

    runs = []
    for path in args.results:
        if not path.is_file():
            raise SystemExit(f"{path}: no such file")
        runs.append(json.loads(path.read_text()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pareto_plot(runs, args.out)
    args.out.with_suffix(".md").write_text("\n".join(markdown(r) for r in runs))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "plot":
        return plot_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        required=True,
        nargs="+",
        help="exported HF folder(s) with a dms block; several share the teacher and baseline passes "
        "(rows dms:NAME, h2o@=dms:NAME)",
    )
    ap.add_argument(
        "--name", nargs="+", help="each checkpoint's label in tables and plots (default: its folder name)"
    )
    ap.add_argument(
        "--teacher",
        help="the original model's HF folder (teacher and baselines); default: --model with eviction off, "
        "which is the original only for train.mode=adapter retrofits",
    )
    ap.add_argument("--text", required=True, type=Path, help="held-out text (also the text haystack)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument(
        "--policies",
        nargs="+",
        default=["teacher", "dms", *BASELINE_NAMES],
        help="teacher, dms, a baseline alone (at the DMS model's KV memory) or NAME@CR",
    )
    ap.add_argument(
        "--sweep-crs", nargs="*", type=float, default=[], help="add {baseline}@{cr} rows at these CRs"
    )
    ap.add_argument("--sweep-policies", nargs="+", default=BASELINE_NAMES, choices=BASELINE_NAMES)
    ap.add_argument(
        "--ppl-lengths", nargs="+", type=int, default=[2048], help="perplexity over these prefixes"
    )
    ap.add_argument(
        "--stride", type=int, default=128, help="record the DMS model's KV memory every STRIDE tokens"
    )
    ap.add_argument("--passkey-lengths", nargs="*", type=int, default=[2048], help="none: no pass-key")
    ap.add_argument("--passkey-trials", type=int, default=10, help="prompts per length, depths cycled")
    ap.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.5, 0.9])
    ap.add_argument(
        "--filler",
        choices=["classic", "text", "both"],
        default="classic",
        help="pass-key / variable-tracking haystack: the classic repeated sentences, the --text, or both "
        "(pass-key tasks passkey_classic_N and passkey_text_N; variable tracking on the first)",
    )
    ap.add_argument("--vt-length", type=int, default=1024)
    ap.add_argument("--vt-trials", type=int, default=3, help="0: no variable tracking")
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk (DMS and teacher)")
    ap.add_argument("--max-rows", type=int, default=96, help="baseline rows per lockstep batch (memory)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-verify", action="store_true", help="skip the sha256 manifest check of the weights")
    args = ap.parse_args(argv)
    check_args(args)

    import torch
    from transformers import AutoTokenizer

    from dms_megatron.inference.evaluate import (
        CLASSIC_FILLER,
        Timer,
        passkey,
        perplexity_and_kl,
        sweep,
        variable_tracking,
    )
    from dms_megatron.inference.model import DMSCausalLM
    from dms_megatron.inference.quality_report import markdown, pareto_plot

    names = args.name or [Path(m).name for m in args.model]
    if len(names) != len(args.model) or len(set(names)) != len(names):
        raise SystemExit(f"--name: one distinct name per --model, got {names} for {args.model}")
    refs = ("",) if len(names) == 1 else tuple(names)
    policies = _policies(args.policies, refs)
    known = {p.label for p in policies}
    policies += [p for p in sweep(args.sweep_policies, args.sweep_crs) if p.label not in known]
    timer = Timer(lambda line: print(line, flush=True))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    verify = not args.no_verify
    try:
        model = {
            ref: DMSCausalLM.from_pretrained(path, dtype=dtype, device=device, verify=verify)
            for ref, path in zip(refs, args.model, strict=True)
        }
        teacher = (
            DMSCausalLM.from_pretrained(args.teacher, dtype=dtype, device=device, verify=verify)
            if args.teacher
            else None
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    tok = AutoTokenizer.from_pretrained(args.model[0])
    text = args.text.read_text(encoding="utf-8", errors="replace")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < max(args.ppl_lengths):
        raise SystemExit(
            f"{args.text} has {len(ids)} tokens, fewer than --ppl-lengths {max(args.ppl_lengths)}"
        )
    timer.note(
        f"loaded {' '.join(args.model)}; {len(policies)} policies: {' '.join(p.label for p in policies)}"
    )
    common = {"chunk": args.chunk, "teacher": teacher, "max_rows": args.max_rows, "timer": timer}
    tasks: dict = {}
    args.out.mkdir(parents=True, exist_ok=True)

    def save(final: bool = False) -> dict:
        """results.json after every task (a run cut by a time limit keeps what it measured)."""
        results = {
            "name": " + ".join(names),
            "model": " ".join(args.model),
            "checkpoints": dict(zip(names, args.model, strict=True)),
            "teacher": args.teacher or f"{args.model[0]} (eviction off)",
            "text": str(args.text),
            "policies": [p.label for p in policies],
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "dtype": args.dtype,
            "filler": args.filler,
            "passkey_trials": args.passkey_trials,
            "sweep_crs": args.sweep_crs,
            "complete": final,
            "tasks": tasks,
            "timing": timer.timing,
            "wall_s": round(time.perf_counter() - timer.t0, 3),
        }
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return results

    tasks.update(
        perplexity_and_kl(
            model, policies, ids, args.ppl_lengths, args.chunk, teacher, stride=args.stride, timer=timer
        )
    )
    save()
    longest = max([*args.passkey_lengths, args.vt_length]) if args.passkey_lengths else args.vt_length
    fillers = {
        "classic": CLASSIC_FILLER * (longest // 16 + 1),
        "text": text[: 8 * longest],  # a few characters per token: enough not to repeat
    }
    chosen = {f: fillers[f] for f in (["classic", "text"] if args.filler == "both" else [args.filler])}
    for length in args.passkey_lengths:  # one length at a time, saved after each
        tasks.update(
            passkey(
                model,
                tok,
                policies,
                chosen,
                [length],
                args.depths,
                seed=length,
                trials=args.passkey_trials,
                **common,
            )
        )
        save()
    if args.vt_trials > 0:
        first = next(iter(chosen.values()))
        tasks["variable_tracking"] = variable_tracking(
            model, tok, policies, first, args.vt_length, trials=args.vt_trials, **common
        )
    results = save(final=True)
    (args.out / "results.md").write_text(markdown(results))
    pareto_plot([results], args.out / "results.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
