"""Tokenise text into a Megatron indexed dataset for DMS retrofitting.

    dms-preprocess --input corpus/ more.jsonl --tokenizer assets/smollm2-135m-instruct \
        --output-prefix data/corpus

Inputs: text files (one document each: .txt .md .rst .py), JSONL files (one document per record,
field --json-key, default "text"), or folders holding either. Writes PREFIX.bin / PREFIX.idx
(megatron's indexed dataset) and PREFIX.json (tokenizer, vocabulary and its sha256, EOS id, counts).
Binary inputs, text that is not UTF-8 (unless --encoding) and malformed JSONL lines are refused with
the file and line named.
"""

from __future__ import annotations

import argparse
import time

from dms_megatron.runtime import quiet_upstream_noise

quiet_upstream_noise()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="files or folders")
    ap.add_argument(
        "--tokenizer", required=True, help="HF folder with the model's tokenizer (and config.json)"
    )
    ap.add_argument("--output-prefix", required=True)
    ap.add_argument("--json-key", default="text")
    ap.add_argument(
        "--encoding", default=None, help="decode inputs with this codec (e.g. latin-1); default: strict UTF-8"
    )
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.encoding is not None:
        import codecs

        try:
            codecs.lookup(args.encoding)
        except LookupError:
            raise SystemExit(f"error: --encoding {args.encoding!r}: unknown codec") from None

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from dms_megatron.training.data import preprocess

    console = Console(stderr=True)
    start = time.time()
    with Progress(
        TextColumn("tokenising"),
        BarColumn(),
        TextColumn("{task.completed:,} tokens"),
        TimeElapsedColumn(),
        console=console,
        disable=args.quiet,
    ) as bar:
        task = bar.add_task("tok", total=None)
        try:
            info = preprocess(
                args.input,
                args.tokenizer,
                args.output_prefix,
                args.json_key,
                progress=lambda n: bar.advance(task, n),
                encoding=args.encoding,
            )
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    rate = info.num_tokens / max(time.time() - start, 1e-9)
    print(
        f"{info.num_documents:,} documents, {info.num_tokens:,} tokens ({info.dtype}, {rate:,.0f} tokens/s), "
        f"{info.skipped_empty} empty skipped -> {args.output_prefix}.{{bin,idx,json}}"
    )


if __name__ == "__main__":
    main()
