"""SmolLM2-135M retrofit recipes on one GPU, trained side by side and compared with the training-free
baselines at equal KV memory, within one time-limited call:

    python benchmarks/quality_study.py --out OUT --deadline 560 [--train-seconds 300] [--runs NAME ...]

1. the baselines' pass-key retrieval at fixed CRs starts at once (it needs only the original model);
2. the recipes in ``RUNS`` train side by side until they finish or ``--train-seconds`` pass (SIGTERM:
   each saves a checkpoint; an unfinished run is evaluated at its last step and reported as such);
3. each run is exported; ``launch/evaluate.py`` measures teacher, DMS and the baselines at the DMS
   models' KV memory (perplexity/KL at 2K/4K/8K, with fixed-CR sweep rows for the Pareto plot) and the
   DMS models' pass-key retrieval (10 trials per length, classic and text haystacks);
4. ``study.md`` / ``study.json`` (one row per run: command, steps, KD, memory CR, KL, ppl, pass-key),
   ``quality_cr4.json`` / ``quality_cr8.json`` and ``pareto.png`` are written under OUT.

Needs ``checkpoints/smollm2_135m``, ``assets/smollm2-135m-instruct``, the data prefixes of ``COMMON``
and ``assets/shakespeare.txt`` (held out). ``--smoke`` runs the same pipeline in minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "assets/smollm2-135m-instruct"
TEXT = "assets/shakespeare.txt"
COMMON = [
    "experiment=smollm2_cr8",
    "data.prefixes=[data/stdlib,data/prose]",
    "train.save_interval=25",
    "logging.console=false",
    "dms.cr_context=8192",
]
ADAPTER = ["dms.variant=adapter", "train.mode=adapter", "train.lr=2e-4", "train.min_lr=1e-4"]
NEURON = ["dms.variant=neuron", "train.mode=full", "dms.neuron_fade_steps=20"]


def _cr(target: float, ramp: int, steps: int) -> list[str]:
    return [f"dms.target_cr={target}", f"dms.cr_ramp_steps={ramp}", f"train.steps={steps}"]


# name -> (memory CR target at 8K tokens, Hydra overrides after COMMON)
RUNS: dict[str, tuple[float, list[str]]] = {
    "cr4_adapter_w256": (4.0, [*ADAPTER, "dms.window=256", *_cr(4, 80, 100)]),
    "cr8_adapter_w64": (8.0, [*ADAPTER, "dms.window=64", *_cr(8, 100, 120)]),
    "cr8_adapter_w256": (8.0, [*ADAPTER, "dms.window=256", *_cr(8, 100, 120)]),
    "cr4_neuron_full": (
        4.0,
        [*NEURON, "train.lr=5e-5", "train.min_lr=2.5e-5", "dms.window=256", *_cr(4, 90, 130)],
    ),
}
DEFAULT_RUNS = ["cr4_adapter_w256", "cr8_adapter_w64"]
PPL = ["--ppl-lengths", "2048", "4096", "8192"]
PASSKEY = ["--passkey-lengths", "2048", "4096", "7168", "--passkey-trials", "10"]
LONGEST = 8192
SMOKE: list[str] = []
SMOKE_TRAIN = [  # --smoke: tiny steps and texts, to check the pipeline on a CPU
    "train.steps=3",
    "dms.cr_ramp_steps=1",
    "dms.neuron_fade_steps=1",
    "data.seq_length=128",
    "parallel.micro_batch_size=1",
    "parallel.global_batch_size=1",
    "model.dtype=fp32",
    "train.save_interval=3",
    "dms.window=16",
    "dms.cr_context=512",
    "dms.attention_backend=reference",
]


class Clock:
    def __init__(self, deadline: float) -> None:
        self.start, self.deadline = time.time(), deadline

    def elapsed(self) -> float:
        return time.time() - self.start

    def left(self) -> float:
        return self.deadline - self.elapsed()

    def stamp(self, msg: str) -> None:
        print(f"[{self.elapsed():6.0f} s] {msg}", flush=True)


def _run_dir(name: str) -> Path:
    return ROOT / "runs" / "study" / name


def _finished(name: str) -> bool:
    summary = _run_dir(name) / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("finished", False)


def _overrides(name: str) -> list[str]:
    return [*COMMON, *RUNS[name][1], *SMOKE]


def train(names: list[str], clock: Clock, seconds: float, out: Path) -> None:
    """The runs side by side; SIGTERM (checkpoint, resumable) once ``seconds`` have passed."""
    procs = {}
    for i, name in enumerate(n for n in names if not _finished(n)):
        cmd = [sys.executable, "launch/retrofit.py", *_overrides(name), f"run_dir={_run_dir(name)}"]
        log = open(out / f"train_{name}.log", "a")  # noqa: SIM115 (closed below)
        env = dict(os.environ, MASTER_PORT=str(29500 + 17 * i))
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log), log)
        clock.stamp(f"train {name}: started")
        time.sleep(10 if i == 0 else 1)  # the first run builds the dataset index cache
    stop = clock.elapsed() + seconds
    while procs:
        for name, (proc, log) in list(procs.items()):
            if proc.poll() is not None:
                log.close()
                del procs[name]
                clock.stamp(f"train {name}: exit {proc.returncode}, finished={_finished(name)}")
        if procs and clock.elapsed() > stop:
            for proc, _ in procs.values():
                proc.send_signal(signal.SIGTERM)
            for name, (proc, log) in procs.items():
                proc.wait(timeout=180)
                log.close()
                clock.stamp(f"train {name}: stopped at the time limit (checkpoint saved, resumable)")
            procs = {}
        time.sleep(2)


def export(name: str, out: Path) -> str | None:
    run = _run_dir(name)
    ckpts = sorted((run / "checkpoints").glob("iter_*"))
    if not ckpts:
        return None
    dest = ROOT / "exports" / "study" / name
    cmd = [sys.executable, "launch/convert.py", "export", "--ckpt", str(ckpts[-1]), "--out", str(dest)]
    subprocess.run([*cmd, "--force", "--quiet"], cwd=ROOT, check=True, capture_output=True)
    for f in ("metrics.jsonl", "summary.json", "cr_curve.png"):
        if (run / f).is_file():
            shutil.copy(run / f, out / f"{name}_{f}")
    return str(dest)


def evaluate(tag: str, args: list[str], out: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "launch/evaluate.py",
        "--teacher",
        TEACHER,
        "--text",
        TEXT,
        "--out",
        str(out / tag),
    ]
    log = open(out / f"eval_{tag}.log", "w")  # noqa: SIM115 (the child owns it)
    return subprocess.Popen([*cmd, "--vt-trials", "0", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait(procs: dict[str, subprocess.Popen], clock: Clock) -> dict[str, dict | None]:
    """Wait for evaluations until the deadline; results.json per tag (None: failed or cut)."""
    done: dict[str, dict | None] = {}
    for tag, proc in procs.items():
        try:
            proc.wait(timeout=max(1.0, clock.left()))
        except subprocess.TimeoutExpired:
            proc.kill()
            clock.stamp(f"eval {tag}: cut at the deadline")
        path = Path(proc.args[proc.args.index("--out") + 1]) / "results.json"
        done[tag] = json.loads(path.read_text()) if path.is_file() else None
        clock.stamp(f"eval {tag}: {'done' if done[tag] else 'no results (see its log)'}")
    return done


def _row(name: str, quality: dict | None, passkey: dict | None) -> dict:
    metrics = [json.loads(x) for x in (_run_dir(name) / "metrics.jsonl").read_text().splitlines()]
    row: dict = {
        "run": name,
        "target_memory_cr": RUNS[name][0],
        "steps": metrics[-1]["step"],
        "kd_first": metrics[0]["loss/kd"],
        "kd_last": metrics[-1]["loss/kd"],
        "train_memory_cr_8k": metrics[-1].get("cr/memory"),
    }
    if quality is not None:
        ppl = quality["tasks"][f"perplexity_{LONGEST}"]
        dms = ppl.get(f"dms:{name}", ppl.get("dms"))
        row |= {"memory_cr_8k": dms["memory_cr"], "kl_8k": dms["kl_to_teacher"], "ppl_8k": dms["perplexity"]}
        row["teacher_ppl_8k"] = ppl["teacher"]["perplexity"]
    if passkey is not None:
        for task, table in passkey["tasks"].items():
            if task.startswith("passkey_"):
                dms = table.get(f"dms:{name}", table.get("dms"))
                if dms is not None:
                    row[task] = f"{dms.get('found', round(dms['accuracy'] * dms['trials']))}/{dms['trials']}"
    row["command"] = "python launch/retrofit.py " + " ".join(_overrides(name))
    return row


def _markdown(rows: list[dict]) -> str:
    keys = sorted(
        {k for r in rows for k in r if k != "command"},
        key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99,
    )
    lines = ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
    for r in rows:
        cells = (f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Commands:", ""] + [f"- `{r['run']}`: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    global SMOKE, LONGEST, PPL, PASSKEY
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--deadline", type=float, default=560, help="seconds this call may use")
    ap.add_argument("--train-seconds", type=float, default=250, help="training stops after this long")
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=list(RUNS))
    ap.add_argument("--smoke", action="store_true", help="tiny steps and texts: check the pipeline on a CPU")
    args = ap.parse_args()
    if args.smoke:
        SMOKE, LONGEST = SMOKE_TRAIN, 512
        PPL = ["--ppl-lengths", "256", "512"]
        PASSKEY = ["--passkey-lengths", "256", "--passkey-trials", "2"]
    args.out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.deadline)
    # 1. the baselines' pass-key at fixed CRs (original model only), meanwhile
    fixed = [f"{b}@{cr}" for cr in (4, 8) for b in ("streaming_llm", "tova", "h2o")]
    base = {
        "baselines_passkey": evaluate(
            "baselines_passkey",
            [
                "--model",
                TEACHER,
                "--policies",
                "teacher",
                *fixed,
                "--ppl-lengths",
                PPL[1],
                *PASSKEY,
                "--filler",
                "classic",
            ],
            args.out,
        )
    }
    clock.stamp("eval baselines_passkey: started")
    # 2. training
    train(args.runs, clock, args.train_seconds, args.out)
    # 3. export and evaluate
    with ThreadPoolExecutor() as pool:
        exported = dict(zip(args.runs, pool.map(lambda n: export(n, args.out), args.runs), strict=True))
    names = [n for n, path in exported.items() if path]
    clock.stamp(f"exported {names}")
    models = ["--model", *(exported[n] for n in names), "--name", *names]
    evals = {
        "equal_memory": evaluate(
            "equal_memory",
            [
                *models,
                "--policies",
                "teacher",
                "dms",
                "streaming_llm",
                "tova",
                "h2o",
                *PPL,
                "--passkey-lengths",
                "--sweep-crs",
                "2",
                "4",
                "8",
                "16",
            ],
            args.out,
        ),
        "dms_passkey": evaluate(
            "dms_passkey",
            [*models, "--policies", "teacher", "dms", "--ppl-lengths", PPL[1], *PASSKEY, "--filler", "both"],
            args.out,
        ),
    }
    done = wait({**evals, **base}, clock)
    rows = [_row(n, done["equal_memory"], done["dms_passkey"]) for n in names]
    (args.out / "study.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "study.md").write_text(_markdown(rows))
    print((args.out / "study.md").read_text())
    results = [args.out / t / "results.json" for t in ("equal_memory", "dms_passkey", "baselines_passkey")]
    results = [str(p) for p in results if p.is_file()]
    if results:
        cmd = [sys.executable, "launch/evaluate.py", "plot", *results, "--out", str(args.out / "pareto.png")]
        subprocess.run(cmd, cwd=ROOT, check=False)
    clock.stamp("done")


if __name__ == "__main__":
    main()
