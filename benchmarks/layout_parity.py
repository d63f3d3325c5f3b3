"""The real trainer at several parallel layouts from one random model and one random dataset: loss curves.

    python benchmarks/layout_parity.py --out runs/layout_parity --steps 8 \
        --layouts tp1 tp2sp tp2sp_full -- experiment=smollm2_paper model.dtype=fp32 ...

A random Hugging Face model is built from the composed ``model.hf_config`` (seeded; transformers) and
imported with ``launch/convert.py import``, so every layout starts from the same weights, teacher
included; random token documents are the data. Each layout is one ``torchrun`` of ``launch/retrofit.py``
(one process per GPU; on CPU gloo). The report has, per layout, the metrics of every step and the
largest relative difference to the first layout of KD, compression loss, achieved CR and grad norm.

What it answers on a GPU machine that the CPU tests cannot: sequence parallelism with ``LocalNorm``,
NCCL, flex attention and megatron's recompute on CUDA give the curve of the TP=1 run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (processes, overrides)
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "tp1": (1, ["parallel.tp=1", "parallel.pp=1", "parallel.sequence_parallel=false"]),
    # run-to-run noise of the device itself
    "tp1_again": (1, ["parallel.tp=1", "parallel.pp=1", "parallel.sequence_parallel=false"]),
    "tp2": (2, ["parallel.tp=2", "parallel.pp=1", "parallel.sequence_parallel=false"]),
    "tp2sp": (2, ["parallel.tp=2", "parallel.pp=1", "parallel.sequence_parallel=true"]),
    "tp2sp_full": (
        2,
        ["parallel.tp=2", "parallel.pp=1", "parallel.sequence_parallel=true", "parallel.recompute=full"],
    ),
    "tp2sp_selective": (
        2,
        ["parallel.tp=2", "parallel.pp=1", "parallel.sequence_parallel=true", "parallel.recompute=selective"],
    ),
    "pp2": (2, ["parallel.tp=1", "parallel.pp=2", "parallel.sequence_parallel=false"]),
    # the 32B layouts of one 8-GPU node (and its 4-GPU half), sequence parallel as the presets
    "tp2sp_pp2": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"]),
    "tp4sp_pp2": (8, ["parallel.tp=4", "parallel.pp=2", "parallel.sequence_parallel=true"]),
    "tp8sp": (8, ["parallel.tp=8", "parallel.pp=1", "parallel.sequence_parallel=true"]),
}
for _name in ("tp2sp_pp2", "tp8sp"):  # the same layout again: the device's own run-to-run spread
    LAYOUTS[f"{_name}_again"] = LAYOUTS[_name]
TIMING = ("step_time_s", "throughput/tokens_per_s", "throughput/tflops_per_gpu")
MEMORY = ("memory/max_allocated_gb", "memory/max_allocated_gb_any_rank")  # rank 0's, every rank's
KEYS = ("loss/kd", "loss/compression", "cr/decision_rate", "grad_norm")
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def random_hf_model(hf_config: dict, folder: Path, seed: int, init_std: float) -> None:
    """A seeded random model of the preset's architecture, saved as a Hugging Face folder. ``init_std``
    (``initializer_range``): transformers' 0.02 gives near-uniform next-token distributions and a KD loss
    of ~1e-6, too small to compare layouts by; 0.1 gives peaked ones."""
    import torch
    import transformers as tf

    arch = hf_config["architectures"][0]
    family = next((f for f, cls in CLASSES.items() if cls == arch), None)
    if family is None:
        raise SystemExit(f"no random-model recipe for {arch} (known: {sorted(CLASSES.values())})")
    config = tf.AutoConfig.for_model(family, **{k: v for k, v in hf_config.items() if k != "architectures"})
    config.architectures = [arch]
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = getattr(tf, arch)(config)
    model.save_pretrained(folder)


def compare(rows: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Largest relative difference of each key, every layout against the first, over the common steps."""
    names = list(rows)
    ref = rows[names[0]]
    out = {}
    for name in names[1:]:
        pairs = list(zip(ref, rows[name], strict=False))
        out[name] = {
            k: max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for a, b in pairs) for k in KEYS if k in ref[0]
        }
        out[name]["steps"] = len(pairs)
    return out


def _timing(rows: list[dict]) -> dict[str, float | None]:
    import statistics

    later = rows[1:] or rows
    out: dict[str, float | None] = {
        k: statistics.median(r[k] for r in later) for k in TIMING if all(k in r for r in later)
    }
    out.update({k: rows[-1].get(k) for k in MEMORY})
    return out


def _summarise(name: str, rows: list[dict]) -> None:
    last = rows[-1]
    summary = ", ".join(f"{k} {last[k]:.6g}" for k in KEYS if k in last)
    print(f"[layout_parity] {name} ({len(rows)} steps): {summary}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="work folder (model, data, runs, report.json)")
    ap.add_argument("--layouts", nargs="+", default=["tp1", "tp2sp"], choices=sorted(LAYOUTS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--init-std", type=float, default=0.1, help="initializer_range of the random model")
    ap.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each layout's checkpoints "
        "(default: deleted after its run; a 32B-shaped 8-layer one is ~80 GB with Adam state)",
    )
    ap.add_argument(
        "--slurm-preempt",
        choices=sorted(LAYOUTS),
        help="then this layout again through "
        "sbatch slurm/*.sh and the Slurm stand-ins, preempted (SIGUSR1) mid-run and requeued",
    )
    ap.add_argument("--preempt-after", type=int, help="steps logged before the signal (default: half)")
    ap.add_argument("--slurm-seconds", type=float, default=1800, help="time limit of the Slurm run")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every layout")
    args = ap.parse_args()
    from activation_check import compose_config, write_data

    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = compose_config(args.overrides)
    hf_config = base["model"]["hf_config"]
    hf_dir, ckpt, data = work / "hf", work / "megatron", work / "data" / "random"
    if not (ckpt / "dms_megatron.json").is_file():
        print(f"[layout_parity] random model ({hf_config['architectures'][0]}) -> {ckpt}", flush=True)
        random_hf_model(hf_config, hf_dir, args.seed, args.init_std)
        convert = [sys.executable, str(ROOT / "launch" / "convert.py"), "import", "--hf", str(hf_dir)]
        subprocess.run([*convert, "--out", str(ckpt), "--force", "--quiet"], check=True)
    seq, gbs = base["data"]["seq_length"], base["parallel"]["global_batch_size"]
    write_data(data, hf_config["vocab_size"], 2 * seq * gbs * args.steps, seed=args.seed)
    common = [
        *args.overrides,
        f"model.checkpoint={ckpt}",
        f"data.prefixes=[{data}]",
        "data.weights=null",
        f"train.steps={args.steps}",
        # a preset's ramp cut to these few steps (a ramp longer than the run is refused)
        f"dms.cr_ramp_steps={min(base['dms']['cr_ramp_steps'], args.steps)}",
        f"train.save_interval={args.steps}",
        "train.resume=none",
        "logging.console=false",
        "logging.wandb_project=null",
    ]
    rows: dict[str, list[dict]] = {}
    for name in args.layouts:
        procs, layout = LAYOUTS[name]
        run_dir = work / "runs" / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
        cmd += [str(ROOT / "launch" / "retrofit.py"), *common, *layout, f"run_dir={run_dir}"]
        print(f"[layout_parity] {name}: {' '.join(layout)}", flush=True)
        log = work / f"{name}.log"
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0:
            sys.stdout.write(log.read_text()[-6000:])
            raise SystemExit(f"[layout_parity] {name} failed (exit {proc.returncode}); log: {log}")
        rows[name] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        _summarise(name, rows[name])
        if not args.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    report: dict = {"overrides": args.overrides, "steps": args.steps, "layouts": args.layouts}
    logs = [work / f"{name}.log" for name in args.layouts]
    if args.slurm_preempt:
        from slurm_preemption import preempted_run

        name = f"{args.slurm_preempt}_slurm_preempted"
        procs, layout = LAYOUTS[args.slurm_preempt]
        run_dir = work / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        # resumable (train.resume=auto, the default); checkpoints only where preempted and at the end
        slurm = [o for o in common if not o.startswith(("train.resume=", "train.save_interval="))]
        slurm += [*layout, f"train.save_interval={args.steps}", "train.keep_last=1"]
        after = args.preempt_after or max(args.steps // 2, 1)
        rows[name], report["slurm_preemption"] = preempted_run(
            work, procs, slurm, run_dir, after, args.slurm_seconds
        )
        _summarise(name, rows[name])
        if args.slurm_preempt in rows:  # the same layout uninterrupted: the resumed steps must match it
            report["slurm_preemption"]["max_relative_difference_to_" + args.slurm_preempt] = compare(
                {args.slurm_preempt: rows[args.slurm_preempt], name: rows[name]}
            )[name]
        logs.append(Path(report["slurm_preemption"]["log"]))
        if not args.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    from slurm_preemption import device_guess_warnings

    report["nccl_device_guess_warnings"] = device_guess_warnings(logs)
    report["max_relative_difference_to_" + args.layouts[0]] = compare(rows)
    report["metrics"] = {
        n: [{k: r.get(k) for k in ("step", *KEYS, *TIMING, *MEMORY)} for r in v] for n, v in rows.items()
    }
    # step time and throughput: the median over the steps after the first (compilation, warm-up); peak
    # memory at the last step: the logging rank's and the largest over all ranks
    report["timing"] = {n: _timing(v) for n, v in rows.items()}
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["max_relative_difference_to_" + args.layouts[0]], indent=2))
    print(json.dumps(report["timing"], indent=2))


if __name__ == "__main__":
    main()
