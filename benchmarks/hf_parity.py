"""An exported DMS checkpoint loaded with ``AutoModelForCausalLM.from_pretrained(trust_remote_code=True)``
generates the same greedy tokens, holding the same number of tokens per (layer, KV head), as our batched
engine, on a long real prompt (fp32, GPU when available).

    python benchmarks/hf_parity.py --model exports/cr8 --text assets/shakespeare.txt --out hf_parity.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dms_megatron.inference.batch_engine import BatchEngine
    from dms_megatron.inference.engine import Request
    from dms_megatron.inference.model import DMSCausalLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[1000, 3000])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(args.text.read_text()[:200_000], add_special_tokens=False)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32).to(
        device
    )
    ours = DMSCausalLM.from_pretrained(args.model, dtype=torch.float32, device=device)
    report = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "runs": [],
    }
    for n in args.prompt_tokens:
        prompt = ids[5000 : 5000 + n]
        t0 = time.perf_counter()
        out = hf.generate(
            torch.tensor([prompt], device=device), max_new_tokens=args.new_tokens, do_sample=False,
            return_dict_in_generate=True,
        )  # fmt: skip
        t_hf = time.perf_counter() - t0
        hf_tokens = out.sequences[0, n:].tolist()
        cache = out.past_key_values
        engine = BatchEngine(ours, num_blocks=ours.arch.num_layers * ours.hkv * (n // 16 + 8), max_batch=1)
        (res,) = engine.generate([Request(prompt, max_new_tokens=args.new_tokens)])
        held_hf = cache.tokens_held()[:, 0].tolist()  # [layer, head]
        ours_held = [[int(x) for x in r] for r in res.metrics["tokens_held"]]
        row = {
            "prompt_tokens": n,
            "same_tokens": hf_tokens == res.tokens,
            "first_difference": next(
                (i for i, (a, b) in enumerate(zip(hf_tokens, res.tokens, strict=False)) if a != b), None
            ),
            "hf_memory_cr": cache.memory_cr(),
            "engine_memory_cr": res.metrics["memory_cr"],
            "held_equal": held_hf == ours_held,
            "held_max_abs_difference": max(
                abs(a - b)
                for ra, rb in zip(held_hf, ours_held, strict=True)
                for a, b in zip(ra, rb, strict=True)
            ),
            "hf_generate_s": t_hf,
        }
        print(json.dumps(row), flush=True)
        report["runs"].append(row)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
