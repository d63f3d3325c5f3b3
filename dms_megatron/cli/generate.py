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
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--no-dms", action="store_true", help="eviction off (the original model)")
    ap.add_argument("--max-batch", type=int, default=32, help="batch mode: requests decoded together")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on GPU")
    ap.add_argument(
        "--backend", default="auto", help="paged decode kernel: auto, reference, triton, flash_attn"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import torch
    from rich.console import Console
    from transformers import AutoTokenizer

    from dms_megatron.inference.engine import Request
    from dms_megatron.inference.model import DMSCausalLM

    args = _args(argv)
    console = Console()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    model = DMSCausalLM.from_pretrained(args.model, dtype=dtype, device=device)
    if args.no_dms:
        model.dms = None
    tok = AutoTokenizer.from_pretrained(args.model)
    config = json.loads((Path(args.model) / "config.json").read_text())
    eos = config.get("eos_token_id")
    stop = tuple(eos if isinstance(eos, list) else ([eos] if eos is not None else []))

    def request(text: str) -> Request:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return Request(ids, args.max_new_tokens, args.temperature, args.top_p, stop, args.seed)

    if args.prompts_file:
        _batch(args, model, tok, console, [request(p) for p in _read_prompts(args.prompts_file)])
        return
    _conversation(args, model, tok, console, request, stop)


def _read_prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def _batch(args, model, tok, console, requests) -> None:
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

        engine = BatchEngine(
            model, args.num_blocks, args.block_size, max_batch=args.max_batch, backend=args.backend,
            on_token=on_token,
        )  # fmt: skip
        results = engine.generate(requests)
    prompts = _read_prompts(args.prompts_file)
    lines = []
    for p, r in zip(prompts, results, strict=True):
        lines.append({"prompt": p, "text": tok.decode(r.tokens), **r.__dict__})
        shown = r.error or f"{tok.decode(r.tokens)!r} (memory CR {r.metrics['memory_cr']:.2f})"
        console.print(f"[bold]{p[:60]!r}[/bold] -> {shown}")
    console.print(f"[dim]decode {engine.last_batch['decode_tokens_per_s']:.1f} tokens/s over the batch[/dim]")
    if args.out:
        args.out.write_text("".join(json.dumps(x) + "\n" for x in lines))


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
    turns = [args.prompt] if args.prompt else None
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
