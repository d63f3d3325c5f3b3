"""SmolLM2-135M retrofit recipes on one GPU, trained side by side and compared with the training-free
baselines at equal KV memory, in one time-limited call or two (``--phase train``, then ``--phase
evaluate`` on the same machine):

    python benchmarks/quality_study.py --out OUT --deadline 560 [--train-seconds 300] [--runs NAME ...]
        [--phase all|train|evaluate] [--matched NAME ...]

1. train: the recipes in ``RUNS`` train side by side until they finish or ``--train-seconds`` pass
   (SIGTERM: each saves a checkpoint; an unfinished run is evaluated at its last step, reported so);
2. evaluate: each run is exported; ``launch/evaluate.py`` measures, one process after another (side
   by side on one GPU they starved each other: 170 s to load the checkpoints instead of 6 s),
   (a) teacher, the ``--matched`` DMS models and every baseline at each one's KV memory (perplexity /
   KL at 2K/4K/8K, with fixed-CR sweep rows for the Pareto plot), (b) pass-key retrieval of the same
   policies (10 trials per length, 2K/4K/7K, one process per length, so a deadline keeps the shorter
   lengths; ``--filler``: the classic haystack by default, the text one or both; each baseline row
   holds the memory the DMS model held on that prompt), (c) the other runs (teacher and DMS only);
3. ``study.md`` / ``study.json`` (one row per run: command, steps, KD, memory CR, KL, ppl, pass-key),
   ``quality_cr<N>.json`` per matched run (the evaluate.py results restricted to that model; the run's
   name instead of ``cr<N>`` when two matched runs share a target) and
   ``pareto.png`` are written under OUT.

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
    "experiment=smollm2_cr4",  # every run sets what differs from this preset
    "data.prefixes=[data/stdlib,data/prose]",
    # a full-model save costs ~6.4 s (H100, 2026-12-06: 15 saves were 96 s of a 376-step run of 0.52-s
    # steps); the study's time limit stops a run with SIGTERM, which saves a checkpoint anyway
    "train.save_interval=100",
    "logging.console=false",
    "dms.cr_context=8192",
]
ADAPTER = ["dms.variant=adapter", "train.mode=adapter", "train.lr=2e-4", "train.min_lr=1e-4"]
NEURON = ["dms.variant=neuron", "train.mode=full", "dms.neuron_fade_steps=20"]


def _cr(target: float, ramp: int, steps: int) -> list[str]:
    return [f"dms.target_cr={target}", f"dms.cr_ramp_steps={ramp}", f"train.steps={steps}"]


def _seq(n: int) -> list[str]:
    """Sequences of n tokens, 16K tokens a step in one micro-batch (as 8 x 2048)."""
    rows = 16384 // n
    return [f"data.seq_length={n}", f"parallel.micro_batch_size={rows}", f"parallel.global_batch_size={rows}"]


FULL = ["dms.variant=adapter", "train.mode=full", "train.lr=1e-5", "train.min_lr=5e-6"]
FULL.append("train.adapter_lr_mult=20")


# name -> (memory CR asked for at 8K tokens, Hydra overrides after COMMON). The training target sits
# ~10% above the CR asked for: the decision rate learnt on the training text evicts less on held-out
# text (measured: training projection 4.16 -> 3.94 on Shakespeare, 7.19 -> 6.61).
RUNS: dict[str, tuple[float, list[str]]] = {
    "cr4_adapter_w256": (4.0, [*ADAPTER, "dms.window=256", *_cr(4.4, 90, 150)]),
    "cr8_adapter_w256": (8.0, [*ADAPTER, "dms.window=256", *_cr(8.8, 130, 180)]),
    "cr8_adapter_w256_t86": (8.0, [*ADAPTER, "dms.window=256", *_cr(8.6, 150, 220)]),
    "cr8_adapter_w64": (8.0, [*ADAPTER, "dms.window=64", *_cr(8, 100, 120)]),
    "cr4_adapter_w256_long": (4.0, [*ADAPTER, "dms.window=256", *_cr(4.4, 200, 300)]),
    # twice the steps at a gentler ramp; the same on 4K-token sequences (as many tokens per step)
    "cr8_adapter_w256_long": (8.0, [*ADAPTER, "dms.window=256", *_cr(8.6, 290, 370)]),
    "cr8_adapter_w256_seq4k": (8.0, [*ADAPTER, "dms.window=256", *_seq(4096), *_cr(8.6, 290, 370)]),
    # every weight trained (separate frozen teacher): base weights at lr 1e-5, the adapters at 20x that
    "cr8_adapter_full_seq4k": (8.0, [*FULL, "dms.window=256", *_seq(4096), *_cr(8.6, 290, 370)]),
    # 4K sequences lowered the KL at 8K from 0.047 to 0.034 (2026-12-04): the evaluation's own length next,
    # at a training target closer to 8 (4K / 8K training projects the memory CR at 8K less optimistically:
    # 8.57 -> 8.36 held out); the full-model run is slower a step, so a shorter schedule
    "cr8_adapter_w256_seq8k": (8.0, [*ADAPTER, "dms.window=256", *_seq(8192), *_cr(8.4, 290, 370)]),
    "cr8_adapter_full_seq8k": (8.0, [*FULL, "dms.window=256", *_seq(8192), *_cr(8.4, 240, 300)]),
    # 8K sequences held out 7.74x / 7.14x where training projected 8.42 / 8.03 (2026-12-05): every weight
    # trained gave the lowest KL (0.026, 0.39x H2O), so the same at a training target ~13% higher
    "cr8_full_seq8k_t92": (8.0, [*FULL, "dms.window=256", *_seq(8192), *_cr(9.2, 240, 300)]),
    # t92 reached 8.79 on the training text at step 300 (2026-12-05; held-out text evicts ~10% less):
    # a training target of 10 to hold >= 8x on held-out text
    "cr8_full_seq8k_t10": (8.0, [*FULL, "dms.window=256", *_seq(8192), *_cr(10.0, 240, 300)]),
    # t10 held 8.64x out (2026-12-06) at KL 0.41x H2O's but lost the 7K pass-key (2/10, teacher 6): a
    # gentler, longer ramp to the same target, and the target cut towards the 8x actually needed (9.4)
    # over the longer schedule; alone, 500 steps of 0.52 s + 5 saves fit one study call (a cut run resumes)
    "cr8_full_seq8k_t10_long": (8.0, [*FULL, "dms.window=256", *_seq(8192), *_cr(10.0, 400, 500)]),
    # 2026-12-06 (483-485 of 500 steps, side by side): t94 held 8.91x out, KL 0.36x H2O, pass-key 10/10/5
    # at 2K/4K/7K (teacher 10/10/6); t10 9.18x, KL 0.38x
    "cr8_full_seq8k_t94_long": (8.0, [*FULL, "dms.window=256", *_seq(8192), *_cr(9.4, 400, 500)]),
    # t94 missed KL <= 1/3 of H2O's by 0.002; KL was still falling after its ramp (KD 0.036 at step 400,
    # ~0.029 at 460-483) and a lower CR lowers DMS's KL faster than the baselines' (t10 -> t94: -6% vs
    # -2.5%): the same ramp, a target nearer the 8x needed, and a 200-step steady phase (alone, 600 steps
    # of 0.52 s + 3 saves fit one study call)
    "cr8_full_seq8k_t9_long": (
        8.0,
        [*FULL, "dms.window=256", *_seq(8192), *_cr(9.0, 400, 600), "train.save_interval=200"],
    ),
    # t9_long held 8.35x out at KL 0.361x H2O's (2026-12-07): four rounds of schedule changes have left
    # the ratio at 0.36-0.38x. Next, side by side (two runs at ~0.8 s a step: 500 steps fit one study
    # call): the KL the evaluation measures, KL(teacher || student), as the training loss (the default,
    # the DMS reference's, is KL(student || teacher)); a smaller window (the always-kept part of the
    # memory; more of it chosen by DMS); the base weights at twice the learning rate (adapters at 2e-4)
    "cr8_full_seq8k_t9_kl_ts": (
        8.0,
        [*FULL, "dms.window=256", "dms.kl_direction=teacher_student", *_seq(8192), *_cr(9.0, 400, 500)],
    ),
    "cr8_full_seq8k_t9_w128": (8.0, [*FULL, "dms.window=128", *_seq(8192), *_cr(9.0, 400, 500)]),
    "cr8_full_seq8k_t9_lr2e-5": (
        8.0,
        [
            *FULL[:2],
            "train.lr=2e-5",
            "train.min_lr=1e-5",
            "train.adapter_lr_mult=10",
            "dms.window=256",
            *_seq(8192),
            *_cr(9.0, 400, 500),
        ],
    ),
    # 2026-12-07, ninth round (500 steps, side by side): kl_ts 8.45x, KL 0.386x H2O's; w128 8.14x, 0.452x:
    # neither beats t9_long. KD of t9_long was still falling over its 200 steps at the target (0.032 ->
    # 0.029 per 50 steps): the same recipe with 500 steps at the target (alone, 900 steps of ~0.37 s +
    # 3 saves fit one study call)
    "cr8_full_seq8k_t9_900": (
        8.0,
        [*FULL, "dms.window=256", *_seq(8192), *_cr(9.0, 400, 900), "train.save_interval=300"],
    ),
    # 2026-12-07, tenth round (stopped at step 874 of 900 by the call's limit): 8.75x held out, KL 0.0255,
    # 0.331x H2O's, pass-key 10/10/10: every CR-8 target met; the smollm2_cr8 preset
    "cr8_adapter_seq4k_lr5e-4": (
        8.0,
        [
            *ADAPTER[:2],
            "train.lr=5e-4",
            "train.min_lr=2.5e-4",
            "dms.window=256",
            *_seq(4096),
            *_cr(8.4, 290, 370),
        ],
    ),
    "cr4_neuron_full": (
        4.0,
        [*NEURON, "train.lr=5e-5", "train.min_lr=2.5e-5", "dms.window=256", *_cr(4.4, 90, 150)],
    ),
}
# the presets smollm2_cr4 / smollm2_cr8 are cr4_adapter_w256_long / cr8_full_seq8k_t9_900
DEFAULT_RUNS = [
    "cr4_adapter_w256_long",
    "cr8_full_seq8k_t9_900",
]
DEFAULT_MATCHED = DEFAULT_RUNS
PPL = ["--ppl-lengths", "2048", "4096", "8192"]
PASSKEY_LENGTHS = ["2048", "4096", "7168"]  # one evaluation process per length, side by side
PASSKEY = ["--passkey-trials", "10"]
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
    """The run's Hydra overrides. A run that names no sequence length trains on 8 x 2048 tokens (the
    preset's own 4 x 4096 would not fit its micro-batch setting: one micro-batch per step, since
    SmolLM2's step is launch-bound)."""
    own = RUNS[name][1]
    if not any(o.startswith("data.seq_length=") for o in own):
        own = [*_seq(2048), *own]
    return [*COMMON, *own, *SMOKE]


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
    """Wait for evaluations until the deadline; results.json per tag (None: failed or nothing measured;
    one cut by the deadline keeps the tasks it finished)."""
    done: dict[str, dict | None] = {}
    for tag, proc in procs.items():
        try:
            proc.wait(timeout=max(1.0, clock.left()))
        except subprocess.TimeoutExpired:
            proc.kill()
            clock.stamp(f"eval {tag}: cut at the deadline")
        path = Path(proc.args[proc.args.index("--out") + 1]) / "results.json"
        done[tag] = json.loads(path.read_text()) if path.is_file() else None
        state = "no results (see its log)" if done[tag] is None else f"{len(done[tag]['tasks'])} tasks"
        clock.stamp(f"eval {tag}: {state}")
    return done


def _only(results: dict, name: str) -> dict:
    """``results`` restricted to one checkpoint's rows: teacher, its DMS row, the baselines matched to
    it and the fixed-CR sweep rows (labels lose the ``:name`` suffix; evaluate.py adds none when it
    evaluated one checkpoint, so then every row is that checkpoint's)."""
    single = list(results["checkpoints"]) == [name]
    keep = {}
    for label in results["policies"]:
        base, _, ref = label.partition(":")
        mine = ref == name or (single and ref == "")
        if label == "teacher" or mine or (ref == "" and "@=" not in base and base != "dms"):
            keep[label] = base if mine else label
    tasks = {
        task: {keep[k]: v for k, v in table.items() if k in keep} for task, table in results["tasks"].items()
    }
    return results | {
        "name": name,
        "model": results["checkpoints"][name],
        "checkpoints": {name: results["checkpoints"][name]},
        "policies": list(keep.values()),
        "tasks": tasks,
    }


def _merged(parts: list[dict | None]) -> dict | None:
    """evaluate.py results of several processes over the same checkpoints as one: every task, every
    phase's wall time (None where none measured anything)."""
    parts = [r for r in parts if r is not None]
    if not parts:
        return None
    tasks: dict = {}
    for r in parts:  # the first process's table of a task wins (pass-key runs also measure a short ppl)
        tasks |= {k: v for k, v in r["tasks"].items() if k not in tasks}
    merged = parts[0] | {"tasks": tasks}
    merged["timing"] = {}
    for r in parts:
        merged["timing"] |= {k: v for k, v in r.get("timing", {}).items() if k not in merged["timing"]}
    return merged


def winners(quality: dict | None, names: list[str]) -> list[str]:
    """One run per memory-CR target: the lowest KL at the longest length among the runs that reach the
    target there (none does: the one that compresses most). All of ``names`` without measurements."""
    if quality is None or f"perplexity_{LONGEST}" not in quality["tasks"]:
        return names
    table = quality["tasks"][f"perplexity_{LONGEST}"]
    picked = []
    for target in sorted({RUNS[n][0] for n in names}):
        rows = {n: table[f"dms:{n}"] for n in names if RUNS[n][0] == target and f"dms:{n}" in table}
        if not rows:
            continue
        reached = {n: r for n, r in rows.items() if r["memory_cr"] >= target}
        if reached:
            picked.append(min(reached, key=lambda n: reached[n]["kl_to_teacher"]))
        else:
            picked.append(max(rows, key=lambda n: rows[n]["memory_cr"]))
    return picked or names


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
    if quality is not None and name not in quality.get("checkpoints", {name: None}):
        quality = None  # measured other checkpoints only (e.g. the pass-key of the winners)
    if passkey is not None and name not in passkey.get("checkpoints", {name: None}):
        passkey = None
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


def _evaluate_all(args: argparse.Namespace, clock: Clock) -> None:
    with ThreadPoolExecutor() as pool:
        exported = dict(zip(args.runs, pool.map(lambda n: export(n, args.out), args.runs), strict=True))
    names = [n for n, path in exported.items() if path]
    clock.stamp(f"exported {names}")
    matched = [n for n in args.matched if n in names]
    others = [n for n in names if n not in matched]

    def models(group: list[str]) -> list[str]:
        return ["--model", *(exported[n] for n in group), "--name", *group]

    baselines = ["streaming_llm", "tova", "h2o"]
    sweep = ["--sweep-crs", "2", "4", "8", "16"] if args.sweep else []
    # evaluate.py always measures a perplexity: the pass-key processes take a short one (512 tokens)
    short, big = ["--ppl-lengths", str(min(512, int(PPL[1])))], ["--max-rows", "192"]  # 10 trials x 19 rows
    done: dict[str, dict | None] = {}

    def run(tag: str, job: list[str]) -> None:  # one after another: side by side they starve each other
        if clock.left() < 30:
            clock.stamp(f"eval {tag}: skipped, the deadline is near")
            return
        done.update(wait({tag: evaluate(tag, job, args.out)}, clock))

    if matched:
        run("equal_memory", [*models(matched), "--policies", "teacher", "dms", *baselines, *PPL,
                             "--passkey-lengths", *sweep])  # fmt: skip
    keyed = winners(done.get("equal_memory"), matched) if args.passkey_winners else matched
    if matched and args.passkey:
        clock.stamp(f"pass-key for {keyed}")
    passkey = [*PASSKEY, "--filler", args.filler]
    for length in PASSKEY_LENGTHS if keyed and args.passkey else []:
        job = [*models(keyed), "--policies", "teacher", "dms", *baselines, *short, *passkey, *big]
        run(f"passkey_{length}", [*job, "--passkey-lengths", length])
    if others:
        run("others", [*models(others), "--policies", "teacher", "dms", *PPL, *passkey, "--passkey-lengths",
                       *PASSKEY_LENGTHS])  # fmt: skip
    done["passkey"] = _merged([done.pop(f"passkey_{n}", None) for n in PASSKEY_LENGTHS])
    quality = {n: done.get("equal_memory") if n in matched else done.get("others") for n in names}
    keys = {n: done.get("passkey") if n in matched else done.get("others") for n in names}
    rows = [_row(n, quality[n], keys[n]) for n in names]
    (args.out / "study.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "study.md").write_text(_markdown(rows))
    print((args.out / "study.md").read_text())
    for n in matched:  # one evaluate.py JSON per matched checkpoint: perplexity/KL and pass-key merged
        parts = [done.get("equal_memory"), done.get("passkey")]
        merged = _merged([_only(r, n) for r in parts if r is not None and n in r["checkpoints"]])
        if merged is not None:
            targets = [RUNS[m][0] for m in matched]
            tag = f"cr{RUNS[n][0]:g}" if targets.count(RUNS[n][0]) == 1 else n
            (args.out / f"quality_{tag}.json").write_text(json.dumps(merged, indent=2) + "\n")
    tags = ["equal_memory", *(f"passkey_{n}" for n in PASSKEY_LENGTHS), "others"]
    results = [args.out / t / "results.json" for t in tags]
    results = [str(p) for p in results if p.is_file()]
    if results:
        cmd = [sys.executable, "launch/evaluate.py", "plot", *results, "--out", str(args.out / "pareto.png")]
        subprocess.run(cmd, cwd=ROOT, check=False)


def main() -> None:
    global SMOKE, LONGEST, PPL, PASSKEY, PASSKEY_LENGTHS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--deadline", type=float, default=560, help="seconds this call may use")
    ap.add_argument("--train-seconds", type=float, default=250, help="training stops after this long")
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=list(RUNS))
    ap.add_argument(
        "--matched",
        nargs="*",
        default=DEFAULT_MATCHED,
        choices=list(RUNS),
        help="runs evaluated against every baseline at their own KV memory (the others: teacher and DMS)",
    )
    ap.add_argument("--phase", default="all", choices=["all", "train", "evaluate"])
    ap.add_argument("--passkey", action=argparse.BooleanOptionalAction, default=True, help="pass-key task")
    ap.add_argument(
        "--passkey-winners",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pass-key only for the best matched run of each memory-CR target (see winners())",
    )
    ap.add_argument("--ppl-lengths", nargs="+", default=None, help="perplexity / KL lengths (2K 4K 8K)")
    ap.add_argument(
        "--passkey-lengths", nargs="+", default=None, help="pass-key prompt lengths, in this order (2K 4K 7K)"
    )
    ap.add_argument(
        "--sweep", action=argparse.BooleanOptionalAction, default=True, help="fixed-CR baseline rows (Pareto)"
    )
    ap.add_argument(
        "--filler",
        default="classic",
        choices=["classic", "text", "both"],
        help="pass-key haystack (the text one separates nothing at 135M: the teacher finds 0/10)",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny steps and texts: check the pipeline on a CPU")
    args = ap.parse_args()
    if args.smoke:
        SMOKE, LONGEST = SMOKE_TRAIN, 512
        PPL = ["--ppl-lengths", "256", "512"]
        PASSKEY_LENGTHS, PASSKEY = ["256"], ["--passkey-trials", "2"]
    if args.ppl_lengths:
        PPL = ["--ppl-lengths", *args.ppl_lengths]
        LONGEST = int(args.ppl_lengths[-1])
    if args.passkey_lengths:
        PASSKEY_LENGTHS = list(args.passkey_lengths)
    args.out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.deadline)
    if args.phase in ("all", "train"):
        train(args.runs, clock, args.train_seconds, args.out)
    if args.phase in ("all", "evaluate"):
        _evaluate_all(args, clock)
    clock.stamp("done")


if __name__ == "__main__":
    main()
