"""Generate with a DMS checkpoint (an exported HF folder) on the compressed-cache engine (GPU when
available, else CPU), streaming tokens and the live compression ratio of the KV cache.

    dms-generate --model runs/demo/export --prompt "def fibonacci(n):"
    dms-generate --model runs/demo/export --interactive          # multi-turn, one cache
    dms-generate --model runs/demo/export --prompts-file p.jsonl --out results.jsonl

``--prompts-file``: JSONL with a "prompt" field per line (batch mode: continuous batching of up to
``--max-batch`` requests, a live table of each one's text and CR; metrics per request in --out).
Live CR = memory CR = tokens seen x (layers x KV heads) / KV tokens held (the factor the KV bytes shrank),
also on the final line.
``--no-dms`` runs the same weights with eviction off (the teacher, for comparison).

Flags, the prompts file and the prompt's length against the model context are checked before the
weights load; each problem exits non-zero with one ``error:`` line. The weights are checked against the
export's sha256 manifest (``--no-verify``: skip).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="exported HF folder (dms-convert export)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompts-file", type=Path)
    src.add_argument("--interactive", action="store_true")
    ap.add_argument("--out", type=Path, help="batch mode: JSONL of results and metrics")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-blocks", type=int, default=4096, help="KV blocks in the shared pool")
    ap.add_argument(
        "--kv-budget-gib",
        type=float,
        default=None,
        help="batch mode: KV memory for the window rings of --max-batch rows plus the pool (instead of "
        "--num-blocks); requests are admitted by the blocks they really hold",
    )
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--no-dms", action="store_true", help="eviction off (the original model)")
    ap.add_argument("--max-batch", type=int, default=32, help="batch mode: requests decoded together")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on GPU")
    ap.add_argument(
        "--backend",
        default="auto",
        help="decode attention: auto (fused on CUDA, reference on CPU), reference, triton (pages by kernel, "
        "ring in torch), flash_attn, fused (pages and window ring in one kernel)",
    )
    ap.add_argument("--no-verify", action="store_true", help="skip the sha256 manifest check of the weights")
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse flags no request can run with (``SystemExit`` with one ``error:`` line)."""
    problems = []
    if args.prompt is not None and not args.prompt.strip():
        problems.append("--prompt is empty")
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0 or args.temperature == float("inf"):
        problems.append(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {args.top_p}")
    for flag in ("num_blocks", "block_size", "max_batch"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.kv_budget_gib is not None and not args.kv_budget_gib > 0:
        problems.append(f"--kv-budget-gib must be > 0, got {args.kv_budget_gib}")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


def main(argv: list[str] | None = None) -> None:
    import torch
    from rich.console import Console
    from transformers import AutoTokenizer

    from dms_megatron.inference.engine import Request
    from dms_megatron.inference.model import DMSCausalLM

    args = _args(argv)
    check_args(args)
    prompts = _read_prompts(args.prompts_file) if args.prompts_file else None
    config_path = Path(args.model) / "config.json"
    if not config_path.is_file():
        raise SystemExit(f"error: --model {args.model}: no config.json (not an exported HF folder)")
    config = json.loads(config_path.read_text())
    context = int(config.get("max_position_embeddings", 0)) or None
    console = Console()
    tok = AutoTokenizer.from_pretrained(args.model)
    eos = config.get("eos_token_id")
    stop = tuple(eos if isinstance(eos, list) else ([eos] if eos is not None else []))

    def request(text: str) -> Request:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return Request(ids, args.max_new_tokens, args.temperature, args.top_p, stop, args.seed)

    if args.prompt is not None and context is not None:
        n = len(request(args.prompt).prompt)
        if n + args.max_new_tokens > context:
            raise SystemExit(
                f"error: the prompt ({n} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds the "
                f"model context of {context} positions ({config_path})"
            )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    try:
        model = DMSCausalLM.from_pretrained(args.model, dtype=dtype, device=device, verify=not args.no_verify)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.no_dms:
        model.dms = None
    if prompts is not None:
        _batch(args, model, tok, console, prompts, [request(p) for p in prompts])
        return
    _conversation(args, model, tok, console, request, stop)


def _read_prompts(path: Path) -> list[str]:
    """The "prompt" field of each non-blank JSONL line; errors name the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SystemExit(f"error: --prompts-file {path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise SystemExit(f"error: --prompts-file {path}: not UTF-8 text ({exc.reason})") from None
    prompts = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"error: {path}:{line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise SystemExit(f'error: {path}:{line_no}: not a JSON object with a string "prompt" field')
        prompts.append(record["prompt"])
    if not prompts:
        raise SystemExit(f"error: --prompts-file {path} holds no prompts")
    return prompts


def _batch(args, model, tok, console, prompts: list[str], requests) -> None:
    """All requests through the continuous-batching engine; a live table of each one's text and CR."""
    from rich.live import Live
    from rich.table import Table

    from dms_megatron.inference.batch_engine import BatchEngine

    state = {i: ([], 1.0) for i in range(len(requests))}

    def table() -> Table:
        t = Table("#", "live CR", "generated", expand=True)
        for i, (toks, cr) in state.items():
            t.add_row(str(i), f"{cr:.2f}", tok.decode(toks)[-80:].replace("\n", " "))
        return t

    with Live(table(), console=console, refresh_per_second=8, transient=True) as live:

        def on_token(i: int, token: int, cr: float) -> None:
            state[i] = (state[i][0] + [token], cr)
            live.update(table())

        pool = (
            {"num_blocks": args.num_blocks}
            if args.kv_budget_gib is None
            else {"kv_budget_gib": args.kv_budget_gib}
        )
        try:
            engine = BatchEngine(
                model, block_size=args.block_size, max_batch=args.max_batch, backend=args.backend,
                on_token=on_token, **pool,
            )  # fmt: skip
        except ValueError as exc:  # a budget too small for one row
            raise SystemExit(f"error: {exc}") from None
        results = engine.generate(requests)
    lines = []
    for p, r in zip(prompts, results, strict=True):
        lines.append({"prompt": p, "text": tok.decode(r.tokens), **r.__dict__})
        shown = r.error or f"{tok.decode(r.tokens)!r} (memory CR {r.metrics['memory_cr']:.2f})"
        console.print(f"[bold]{p[:60]!r}[/bold] -> {shown}")
    b = engine.last_batch
    console.print(
        f"[dim]decode {b['decode_tokens_per_s']:.1f} tokens/s over the batch; KV pool "
        f"{b['pool_blocks']} blocks (peak {b['peak_pool_blocks_used']} used), up to {b['peak_rows']} "
        f"rows at once, {b['preemptions']} preemptions[/dim]"
    )
    if args.out:
        args.out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    if all(r.error for r in results):
        raise SystemExit(f"error: all {len(results)} requests failed (first: {results[0].error})")


def _conversation(args, model, tok, console, request, stop) -> None:
    """One compressed cache across turns (``--prompt``: one turn); tokens stream with the live CR."""
    import torch
    from rich.live import Live
    from rich.text import Text

    from dms_megatron.inference.compressed_cache import CompressedKV
    from dms_megatron.inference.engine import Request, sample, validate
    from dms_megatron.inference.model import kv_crs

    cache = CompressedKV(model, args.num_blocks, args.block_size, backend=args.backend)
    row = cache.add_row()
    gen = torch.Generator().manual_seed(args.seed)
    streams = cache.L * cache.H
    turns = [args.prompt] if args.prompt is not None else None
    while True:
        if turns is not None:
            if not turns:
                break
            text = turns.pop(0)
        else:
            try:
                text = input("you> ")
            except EOFError:
                break
            if not text.strip():
                continue
        req = request(text)
        seen = int(cache.seen[row])
        try:
            validate(Request(req.prompt, req.max_new_tokens), model)
            if seen + len(req.prompt) + req.max_new_tokens > model.arch.max_position_embeddings:
                raise ValueError("the conversation would exceed the model context")
        except ValueError as exc:
            if turns is not None:  # --prompt: one turn, nothing to go on with
                raise SystemExit(f"error: {exc}") from None
            console.print(f"[red]error:[/red] {exc}")
            continue
        ids = torch.tensor(req.prompt, device=model.device)
        logits = cache.prefill_chunked(row, ids)
        out: list[int] = []

        def view(out: list[int] = out) -> Text:
            seen, held = int(cache.seen[row]), int(cache.held()[:, row].sum())
            line = Text(tok.decode(out))
            line.append(
                f"\n[live CR {seen * streams / max(held, 1):.2f}: {seen} tokens seen, {held} KV held]", "dim"
            )
            return line

        with Live(view(), console=console, refresh_per_second=8, transient=True) as live:
            for i in range(req.max_new_tokens):
                token = sample(logits.float().cpu(), req, gen)
                out.append(token)
                live.update(view())
                if token in stop or i + 1 == req.max_new_tokens:
                    break
                cache.reserve()
                logits = cache.decode(torch.tensor([token], device=model.device))[0]
        console.print(tok.decode(out), highlight=False, soft_wrap=True)
        held = cache.held()[:, row].float()
        console.print(
            f"[dim]tokens seen {int(cache.seen[row])}, KV held {int(held.sum())} across layers x heads, "
            f"memory CR {kv_crs(float(cache.seen[row]), held)['memory_cr']:.2f}, "
            f"blocks in use {cache.allocated_blocks()}/{cache.num_blocks}[/dim]"
        )


if __name__ == "__main__":
    main()
