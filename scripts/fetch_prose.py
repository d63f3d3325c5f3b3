"""English training prose from Debian documentation packages, tokenised into a Megatron dataset:
the reStructuredText sources of the Python documentation (``python3.11-doc``) and of part of the Linux
kernel documentation (``linux-doc-6.1``), about 4.5M SmolLM2 tokens. No network beyond the Debian
mirror ``apt-get download`` uses; nothing is installed.

    python scripts/fetch_prose.py [--out data/prose] [--tokenizer assets/smollm2-135m-instruct] \
        [--debs python3.11-doc_*.deb linux-doc-6.1_*.deb]

Idempotent: an existing ``OUT.json`` is kept. Held-out evaluation text (Shakespeare) is separate:
``scripts/fetch_shakespeare.py``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("python3.11-doc", "linux-doc-6.1")
# parts of the kernel documentation that are prose (not API listings), about 1.6M tokens
LINUX_PARTS = (
    "admin-guide",
    "process",
    "filesystems",
    "core-api",
    "driver-api/driver-model",
    "scheduler",
    "mm",
)


def _sources(root: Path) -> list[Path]:
    docs = root / "usr" / "share" / "doc"
    python = sorted(docs.glob("python3*/html/_sources"))
    linux = sorted(docs.glob("linux-doc-*/html/_sources"))
    if not python or not linux:
        raise SystemExit(f"no documentation sources under {docs}: are the packages {PACKAGES}?")
    return [python[0], *(linux[0] / part for part in LINUX_PARTS if (linux[0] / part).is_dir())]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "prose", help="output prefix")
    ap.add_argument("--tokenizer", default=str(ROOT / "assets" / "smollm2-135m-instruct"))
    ap.add_argument("--debs", nargs="+", type=Path, help="downloaded .deb files (default: apt-get download)")
    args = ap.parse_args(argv)
    if args.out.with_suffix(".json").is_file():
        print(f"{args.out}.json exists")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        debs = args.debs
        if not debs:
            if shutil.which("apt-get") is None:
                raise SystemExit("apt-get not found: download the packages elsewhere and pass --debs")
            subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, check=True)
            debs = sorted(tmp_path.glob("*.deb"))
        tree = tmp_path / "x"
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
        sources = _sources(tree)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            str(ROOT / "launch" / "preprocess.py"),
            "--quiet",
            "--tokenizer",
            args.tokenizer,
        ]
        cmd += ["--output-prefix", str(args.out), "--input", *map(str, sources)]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
