"""Throughput of one DMS retrofit step vs one vanilla Megatron training step, same model, same batch,
same process (one GPU or a torchrun group):

    python benchmarks/step_throughput.py --out step.json experiment=smollm2_paper train.steps=40 \
        dms.cr_ramp_steps=10

* retrofit: ``RetrofitTrainer.train_step`` (teacher forward + DMS student forward/backward in one 1F1B
  schedule, KD + compression loss, distributed-optimizer step); packed documents (THD);
* vanilla: megatron's stock local-spec GPT (``DotProductAttention``, which materialises the scores),
  next-token cross-entropy on the same token batches (unpacked, causal; megatron's own
  vocabulary-parallel loss, so any TP / PP layout runs, as the retrofit step does), same DDP + distributed
  optimizer + clipping; ``--vanilla-attention local sdpa`` (the default) also times the same vanilla
  step with a fused attention (``SDPACoreAttention``: torch SDPA, what TE's fused attention gives a
  cluster run), and reports the DMS step against each.

Reports the median step time over ``--measure`` steps after ``--warmup`` steps, tokens/s, model
TFLOP/s per GPU (retrofit: 4x forward FLOPs, teacher included; vanilla: 3x) and peak memory.

``--emulate-tp N --layers L [--vocab V]``: one rank's shapes of a TP=N model built at TP=1 with L layers
(random weights and data), e.g. the R1-Distill-Qwen-32B layer at TP=8 (5 / 1 heads, FFN 3456) on one
GPU: ``--emulate-tp 8 --layers 4 --vocab 19008 experiment=r1_qwen_32b_cr8 parallel.global_batch_size=1``.

``--dms-variant NAME=OVERRIDE[,OVERRIDE...]`` (repeatable): more retrofit steps with those Hydra
overrides on top, timed in the same process on the same batches after the base one, e.g.
``kd_triton=dms.kd_backend=triton``; reported as ``NAME`` and ``NAME_over_dms_retrofit_step_time`` (a
host-bound step's time moves with the machine: compare changes inside one process). A variant that fails
in a one-process run is reported under ``variant_errors`` and the other runs go on.

``--start-step N``: time steps N, N+1, ... of the schedule (e.g. a typical step past the neuron channel
fade, ``dms.neuron_fade_steps``, whose extra ops last only the run's first steps; the steps before N are
not run, so the weights are the initial ones: timing only).

``--profile DIR``: afterwards, ``--profile-steps`` more steps of each under torch.profiler: a Chrome
trace per step kind and ``profile.json`` / ``profile.txt`` with the time per named region of the
retrofit step (teacher forward, student forward, KD loss, compression loss, optimizer, ...), the
backward per autograd node, the top ops and the host syncs per step
(``dms_megatron.training.step_profile``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from dms_megatron.runtime import quiet_upstream_noise  # noqa: E402

quiet_upstream_noise()

import torch  # noqa: E402


def _compose(overrides: list[str], args: argparse.Namespace) -> tuple[dict, object]:
    from activation_check import compose_config, one_rank_shapes, write_data

    from dms_megatron.config import RetrofitConfig

    container = compose_config(overrides)
    if args.emulate_tp:
        hf = container["model"]["hf_config"]
        one_rank_shapes(hf, args.emulate_tp, args.layers, args.vocab or None)
        container["model"]["checkpoint"] = None  # random weights: the time does not depend on them
        container["parallel"] = {**container["parallel"], "tp": 1, "pp": 1, "sequence_parallel": False}
        data = Path(container["run_dir"]) / "data" / "random"
        seq, gbs = container["data"]["seq_length"], container["parallel"]["global_batch_size"]
        steps = args.start_step + args.warmup + args.measure + args.profile_steps + 1
        write_data(data, hf["vocab_size"], seq * gbs * steps)
        container["data"] = {**container["data"], "prefixes": [str(data)], "weights": None}
    return container, RetrofitConfig.from_dict(container)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_steps(step_fn, warmup: int, measure: int, start: int = 0) -> list[float]:
    times = []
    for i in range(warmup + measure):
        _sync()
        t0 = time.perf_counter()
        step_fn(start + i)
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _vanilla(
    cfg, arch, dataset, slicer, warmup: int, measure: int, attention: str = "local", start: int = 0
) -> tuple:
    """Step times of the vanilla model with ``attention`` (local | sdpa), and its step function."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from dms_megatron.runtime import TORCH_DTYPES
    from dms_megatron.training.setup import _build, build_optimizer, connect_schedule, load_weights, wrap_ddp

    dtype = TORCH_DTYPES[cfg.model.dtype]
    spec = None
    if attention == "sdpa":
        from dms_megatron.megatron.families import layer_spec
        from dms_megatron.megatron.sdpa_attention import with_sdpa_core_attention

        spec = with_sdpa_core_attention(layer_spec(arch))
    model = _build(arch, cfg, None, dtype, spec=spec)
    if cfg.model.checkpoint:
        load_weights(model, cfg.model.checkpoint, False)
    ddp = wrap_ddp(model)
    optimizer, scheduler = build_optimizer(cfg, ddp)
    connect_schedule(ddp, optimizer)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    s = cfg.data.seq_length

    def step(i: int) -> None:
        batches = []
        for idx in slicer.indices(i):
            samples = [dataset[j] for j in idx]
            batches.append({k: torch.stack([x[k] for x in samples]).to(device) for k in ("tokens", "labels")})

        def forward_step(it, m):
            b = next(it)
            pos = torch.arange(s, device=device).unsqueeze(0).expand_as(b["tokens"])
            # with labels megatron's last stage returns the per-token loss of its own vocabulary-parallel
            # cross-entropy (any TP / PP, as a stock Megatron training step computes it)
            out = m(input_ids=b["tokens"], position_ids=pos, attention_mask=None, labels=b["labels"])

            def loss_func(per_token):
                loss = per_token.float().mean()
                return loss, {"lm": loss.detach()}

            return out, loss_func

        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[ddp],
            num_microbatches=len(batches),
            seq_length=s,
            micro_batch_size=cfg.parallel.micro_batch_size,
            forward_only=False,
        )
        optimizer.step()
        scheduler.step(increment=1)

    times = _time_steps(step, warmup, measure, start)
    return times, step


def _profile(name: str, step_fn, first_step: int, steps: int, folder: Path | None, rank: int) -> dict | None:
    if folder is None:
        return None
    from dms_megatron.training.step_profile import format_summary, profile_steps

    folder.mkdir(parents=True, exist_ok=True)
    summary = profile_steps(step_fn, first_step, steps, folder / f"{name}_rank{rank}.trace.json.gz")
    if rank == 0:
        print(format_summary(name, summary), flush=True)
    return summary


def _variants(specs: list[str]) -> dict[str, list[str]]:
    """``NAME=OVERRIDE[,OVERRIDE...]`` -> {NAME: [OVERRIDE, ...]}; a clear error for a malformed one."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        extra = [o for o in rest.split(",") if o]
        if not sep or not name or not extra or any("=" not in o for o in extra) or name in out:
            raise SystemExit(
                f"--dms-variant {spec!r}: expected a new NAME=OVERRIDE[,OVERRIDE...], e.g. "
                "kd_triton=dms.kd_backend=triton"
            )
        if name in ("dms_retrofit", "vanilla") or name.startswith("vanilla_"):
            raise SystemExit(f"--dms-variant {spec!r}: {name!r} names another run of this benchmark")
        out[name] = extra
    return out


def _allocated_gb() -> float | None:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _use_triton_launch(path: Path) -> None:
    from dms_megatron.kernels import triton_dms

    settings = json.loads(path.read_text())
    unknown = sorted(set(settings) - {"fwd", "dkdv", "dq"})
    if unknown:
        raise SystemExit(f"{path}: unknown kernels {unknown} (fwd, dkdv, dq)")
    for kernel, opts in settings.items():
        triton_dms.LAUNCH_OVERRIDES[kernel] = {
            key: tuple(val) if key == "blocks" else val for key, val in opts.items()
        }
    print(f"triton attention launch settings from {path}: {triton_dms.LAUNCH_OVERRIDES}", flush=True)


def _hydra_overrides(rest: list[str]) -> list[str]:
    """The arguments argparse left over, without the ``--`` that may separate them from the flags."""
    return [o for o in rest if o != "--"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--measure", type=int, default=15)
    ap.add_argument(
        "--start-step",
        type=int,
        default=0,
        help="the run's step the warm-up starts at (the schedule's; e.g. past the neuron channel fade, "
        "whose extra ops last only its first steps): timing only, earlier steps are not run",
    )
    ap.add_argument(
        "--profile", default=None, help="folder for a torch.profiler breakdown of both step kinds"
    )
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument(
        "--emulate-tp",
        type=int,
        default=0,
        help="time one rank's shapes of a TP=N model at TP=1 (random weights and data); with --layers",
    )
    ap.add_argument("--layers", type=int, default=4, help="with --emulate-tp: layers to build")
    ap.add_argument("--vocab", type=int, default=0, help="with --emulate-tp: vocabulary (0: the preset's)")
    ap.add_argument(
        "--dms-variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDE[,OVERRIDE...]",
        help="also time the retrofit step with these Hydra overrides on top (same process, same batches, "
        "after the base step), e.g. kd_triton=dms.kd_backend=triton; repeatable",
    )
    ap.add_argument(
        "--vanilla-attention",
        nargs="+",
        default=["local", "sdpa"],
        choices=["local", "sdpa"],
        help="vanilla steps to time: megatron's local DotProductAttention and/or fused SDPA",
    )
    ap.add_argument(
        "--triton-launch",
        default=None,
        help="JSON of the fused Triton attention's launch settings per kernel (attention_tune.py "
        "--settings-out) used by every step of this process instead of the defaults",
    )
    args, overrides = ap.parse_known_args()
    overrides = _hydra_overrides(overrides)
    if args.triton_launch:
        _use_triton_launch(Path(args.triton_launch))
    import torch.distributed as dist
    from megatron.core import parallel_state

    from dms_megatron.training.batches import StepSlice, build_gpt_dataset
    from dms_megatron.training.metrics import forward_flops_per_token, retrofit_flops_per_token, throughput
    from dms_megatron.training.run import preflight
    from dms_megatron.training.setup import build_models, build_optimizer, init_distributed
    from dms_megatron.training.trainer import RetrofitTrainer

    variants = _variants(args.dms_variant)
    container, cfg = _compose(overrides, args)
    variant_cfgs = {name: _compose(overrides + extra, args)[1] for name, extra in variants.items()}
    pre = preflight(cfg)
    dp = init_distributed(cfg.parallel.tp, cfg.parallel.pp)
    profile_dir = Path(args.profile) if args.profile else None
    steps = args.start_step + args.warmup + args.measure + (args.profile_steps if profile_dir else 0)
    dataset = build_gpt_dataset(
        cfg.data.prefixes,
        cfg.data.weights,
        cfg.data.seq_length,
        steps * cfg.parallel.global_batch_size,
        cfg.train.seed,
        pre.arch.vocab_size,
        pre.eos_token_id or 0,
        Path(cfg.run_dir) / "data_cache",
    )
    first = args.start_step + args.warmup + args.measure
    retrofit_runs = {}  # report name -> (times, peak memory GB, profile)
    resident: dict[str, dict] = {}  # GPU memory still allocated before each run (what an earlier left)
    variant_errors: dict[str, str] = {}  # a variant that failed (one process: the others still run)

    def retrofit_run(name: str, run_cfg) -> None:
        resident[name] = {"allocated_before_build_gb": _allocated_gb()}
        models = build_models(run_cfg, pre.arch, pre.meta)
        optimizer, scheduler = build_optimizer(run_cfg, models.ddp)
        trainer = RetrofitTrainer(run_cfg, models, optimizer, scheduler, dataset, dp, pre.eos_token_id)
        resident[name]["allocated_after_build_gb"] = _allocated_gb()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times = _time_steps(trainer.train_step, args.warmup, args.measure, args.start_step)
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        prof = _profile(name, trainer.train_step, first, args.profile_steps, profile_dir, dist.get_rank())
        retrofit_runs[name] = (times, mem, prof)
        print(f"{name}: median step {statistics.median(times):.4f} s, peak memory {mem} GB", flush=True)

    for name, run_cfg in {"dms_retrofit": cfg, **variant_cfgs}.items():
        try:
            retrofit_run(name, run_cfg)
        except Exception as exc:  # reported; with several ranks it is raised
            if name == "dms_retrofit" or dist.get_world_size() > 1:
                raise
            variant_errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: failed ({variant_errors[name]}); the other runs go on", flush=True)
        _free()  # the models sit in reference cycles (config hooks); free them before the next run
    dms_times, dms_mem, dms_profile = retrofit_runs.pop("dms_retrofit")
    slicer = StepSlice(
        cfg.parallel.global_batch_size,
        cfg.parallel.micro_batch_size,
        parallel_state.get_data_parallel_rank(),
        dp,
    )
    vanilla_runs = {}  # report name -> (times, peak memory GB, profile)
    for attention in args.vanilla_attention:
        name = "vanilla" if attention == "local" else f"vanilla_{attention}"
        resident[name] = {"allocated_before_build_gb": _allocated_gb()}
        times, step = _vanilla(
            cfg, pre.arch, dataset, slicer, args.warmup, args.measure, attention, args.start_step
        )
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        prof = _profile(name, step, first, args.profile_steps, profile_dir, dist.get_rank())
        vanilla_runs[name] = (times, mem, prof)
        del step
        _free()
    tokens = cfg.parallel.global_batch_size * cfg.data.seq_length
    world = dist.get_world_size()
    fwd = forward_flops_per_token(pre.arch, cfg.data.seq_length)
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "world_size": world,
        "config": {k: container[k] for k in ("parallel", "data", "dms", "train")},
        "tokens_per_step": tokens,
        "start_step": args.start_step,
        "variant_errors": variant_errors,
    }
    retrofit_flops = retrofit_flops_per_token(pre.arch, cfg.data.seq_length)
    runs = [("dms_retrofit", dms_times, retrofit_flops, dms_mem)]
    runs += [(name, times, retrofit_flops, mem) for name, (times, mem, _) in retrofit_runs.items()]
    runs += [(name, times, 3 * fwd, mem) for name, (times, mem, _) in vanilla_runs.items()]
    for name, times, flops, mem in runs:
        med = statistics.median(times)
        tp = throughput(tokens, med, flops, world)
        report[name] = {
            "step_s_median": med,
            "step_s_all": times,
            "tokens_per_s": tp.tokens_per_s,
            "tflops_per_gpu": tp.tflops_per_gpu,
            "mfu": tp.mfu,
            "flops_per_token": flops,
            "max_memory_gb": mem,
            **resident.get(name, {}),
        }
    for name in vanilla_runs:  # dms_over_vanilla_step_time, dms_over_vanilla_sdpa_step_time
        report[f"dms_over_{name}_step_time"] = (
            report["dms_retrofit"]["step_s_median"] / report[name]["step_s_median"]
        )
    for name in retrofit_runs:  # e.g. kd_triton_over_dms_retrofit_step_time
        report[f"{name}_over_dms_retrofit_step_time"] = (
            report[name]["step_s_median"] / report["dms_retrofit"]["step_s_median"]
        )
        report[name]["overrides"] = variants[name]
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        if profile_dir is not None:
            from dms_megatron.training.step_profile import format_summary

            profiles = {
                "dms_retrofit": dms_profile,
                **{k: v[2] for k, v in retrofit_runs.items()},
                **{k: v[2] for k, v in vanilla_runs.items()},
            }
            (profile_dir / "profile.json").write_text(json.dumps(profiles, indent=2) + "\n")
            (profile_dir / "profile.txt").write_text(
                "\n\n".join(format_summary(k, v) for k, v in profiles.items() if v) + "\n"
            )
        for name in ("dms_retrofit", *retrofit_runs, *vanilla_runs):
            r = report[name]
            print(
                f"{name:13s} step {r['step_s_median'] * 1e3:8.1f} ms  {r['tokens_per_s']:10.0f} tok/s  "
                f"{r['tflops_per_gpu']:6.1f} TFLOP/s/GPU  MFU {r['mfu']:.3f}  mem {r['max_memory_gb']} GB "
                f"(allocated before build {r.get('allocated_before_build_gb')} GB)"
            )
        for name in vanilla_runs:
            print(f"DMS step / {name} step: {report[f'dms_over_{name}_step_time']:.2f}x")
        for name in retrofit_runs:
            print(f"{name} step / DMS step: {report[f'{name}_over_dms_retrofit_step_time']:.2f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
