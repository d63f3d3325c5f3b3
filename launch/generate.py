"""Generate with a DMS checkpoint (an exported HF folder) on the CPU reference engine, streaming tokens
and the live compression ratio of the KV cache.

    python launch/generate.py --model runs/demo/export --prompt "def fibonacci(n):"
    python launch/generate.py --model runs/demo/export --interactive          # multi-turn, one cache
    python launch/generate.py --model runs/demo/export --prompts-file p.jsonl --out results.jsonl

``--prompts-file``: JSONL with a "prompt" field per line (batch mode; metrics per request in --out).
``--no-dms`` runs the same weights with eviction off (the teacher, for comparison).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="exported HF folder (launch/convert.py export)")
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
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import torch
    from rich.console import Console
    from transformers import AutoTokenizer

    from dms_megatron.inference.engine import Engine, Request, sample, validate
    from dms_megatron.inference.model import DecodeSession, DMSCausalLM
    from dms_megatron.inference.paged_cache import BlockPool

    args = _args(argv)
    console = Console()
    model = DMSCausalLM.from_pretrained(args.model)
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
        prompts = [
            json.loads(line)["prompt"] for line in args.prompts_file.read_text().splitlines() if line.strip()
        ]
        engine = Engine(model, args.num_blocks, args.block_size)
        results = engine.generate([request(p) for p in prompts])
        lines = []
        for p, r in zip(prompts, results, strict=True):
            lines.append({"prompt": p, "text": tok.decode(r.tokens), **r.__dict__})
            shown = r.error or f"{tok.decode(r.tokens)!r} (CR {r.metrics['effective_cr']:.2f})"
            console.print(f"[bold]{p[:60]!r}[/bold] -> {shown}")
        if args.out:
            args.out.write_text("".join(json.dumps(x) + "\n" for x in lines))
        return

    pool = BlockPool(args.num_blocks, args.block_size, model.d)
    session = DecodeSession(model, pool)
    gen = torch.Generator().manual_seed(args.seed)
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
        try:
            validate(Request(req.prompt, req.max_new_tokens), model)
            if session.position + len(req.prompt) + req.max_new_tokens > model.arch.max_position_embeddings:
                raise ValueError("the conversation would exceed the model context")
        except ValueError as exc:
            console.print(f"[red]error:[/red] {exc}")
            continue
        logits = session.prefill(req.prompt)[-1]
        for i in range(req.max_new_tokens):
            token = sample(logits, req, gen)
            console.print(tok.decode([token]), end="", highlight=False, soft_wrap=True)
            if token in stop:
                break
            if i + 1 < req.max_new_tokens:
                logits = session.step(token)
        held = int(session.held().sum())
        console.print(
            f"\n[dim]tokens seen {session.position}, KV held {held} across layers x heads, "
            f"effective CR {session.effective_cr():.2f}, "
            f"free blocks {pool.free_blocks}/{pool.num_blocks}[/dim]"
        )


if __name__ == "__main__":
    main()
