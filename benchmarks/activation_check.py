"""Check the planner's per-layer memory against a real retrofit step at two depths (one process):

    python benchmarks/activation_check.py --out check.json experiment=r1_qwen_32b_cr8 --emulate-tp 8
    python benchmarks/activation_check.py --out check.json experiment=smollm2_paper --layers 15 30

For each depth the preset's model is built with that many layers (random weights, a random token
dataset, one micro-batch per step), one warm-up step runs, then a measured step under
``SavedTensorProbe`` (every storage autograd saves, by region) and, on CUDA, with the peak-memory
counter reset. Per layer = (depth B - depth A) / (B - A), which cancels everything that does not grow
with depth (embedding, LM head, KD loss, CUDA context).

``--emulate-tp N`` builds one rank's shapes of a TP=N layer at TP=1 (heads, KV heads and FFN divided by
N): without sequence parallelism that layer is exactly what one rank of the TP=N run computes and holds,
so one GPU (or the CPU) checks the 32B per-rank layer. ``--vocab`` shrinks the vocabulary (default 4096)
so the LM head and KD buffers of a 152K vocabulary do not crowd out the layers; the per-layer difference
does not depend on it.

Compared with the planner (``dms_megatron.plan``) for the same layout:

* saved bytes per token of one layer, excluding what only the attention backend decides (flex: its
  output and log-sum-exp; the CPU reference: score chunks) -- checkable on CPU;
* on CUDA with the flex backend: all saved bytes, and the growth of ``max_memory_allocated`` per layer
  (parameters, gradients, optimizer state, teacher weights and activations).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
from dms_megatron.runtime import quiet_upstream_noise  # noqa: E402

quiet_upstream_noise()

import torch  # noqa: E402


def compose_config(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="retrofit", overrides=overrides)
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return container


def one_rank_shapes(hf: dict, emulate_tp: int, layers: int, vocab: int | None) -> None:
    """Turn an HF config (in place) into one rank's shapes of a TP=``emulate_tp`` layer, built at TP=1:
    heads, KV heads and FFN divided (head size kept), ``layers`` layers, optionally another vocabulary."""
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if hf[key] % emulate_tp:
            raise SystemExit(f"--emulate-tp {emulate_tp}: {key}={hf[key]} does not divide")
    if "head_dim" not in hf:  # keep the head size when the head count shrinks
        hf["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
    hf["num_attention_heads"] //= emulate_tp
    hf["num_key_value_heads"] //= emulate_tp
    hf["intermediate_size"] //= emulate_tp
    hf["num_hidden_layers"] = layers
    if vocab:
        hf["vocab_size"] = vocab


def layout(base: dict, layers: int, emulate_tp: int, vocab: int | None, data: str, run_dir: str) -> dict:
    """The preset at ``layers`` layers, one rank's shapes of TP=``emulate_tp``, one micro-batch per step."""
    cfg = json.loads(json.dumps(base))
    one_rank_shapes(cfg["model"]["hf_config"], emulate_tp, layers, vocab)
    cfg["model"]["checkpoint"] = None
    # the steady state the planner models: the neuron variant's channel fade (steps 0..N) saves other
    # tensors (constant logits, the faded channel), so measure as after it
    cfg["dms"]["neuron_fade_steps"] = 0
    mbs = cfg["parallel"]["micro_batch_size"]
    cfg["parallel"] = {
        **cfg["parallel"],
        "tp": 1,
        "pp": 1,
        "sequence_parallel": False,
        "global_batch_size": mbs,
    }
    cfg["data"] = {**cfg["data"], "prefixes": [data], "weights": None}
    cfg["train"] = {**cfg["train"], "steps": 2, "save_interval": 2, "warmup_steps": 0}
    cfg["dms"]["cr_ramp_steps"] = 0  # the target CR from step 0 (a ramp longer than the run is refused)
    cfg["logging"] = {**cfg["logging"], "console": False, "wandb_project": None}
    cfg["run_dir"] = run_dir
    return cfg


def write_data(prefix: Path, vocab: int, tokens: int, seed: int = 0) -> None:
    from dms_megatron.training.data import write_token_documents

    gen = torch.Generator().manual_seed(seed)
    docs, n = [], 0
    while n < tokens:
        length = int(torch.randint(256, 4096, (1,), generator=gen))
        docs.append(torch.randint(3, vocab, (length,), generator=gen).tolist())
        n += length + 1
    write_token_documents(prefix, docs, vocab, 2, "random-activation-check")


def measure(cfg_dict: dict) -> dict[str, Any]:
    """One warm-up step, then a probed step; saved bytes by region and (CUDA) the allocated peak."""
    from dms_megatron.config import RetrofitConfig
    from dms_megatron.training.activation_probe import SavedTensorProbe
    from dms_megatron.training.batches import build_gpt_dataset
    from dms_megatron.training.run import preflight
    from dms_megatron.training.setup import build_models, build_optimizer
    from dms_megatron.training.trainer import RetrofitTrainer

    cfg = RetrofitConfig.from_dict(cfg_dict)
    pre = preflight(cfg)
    dataset = build_gpt_dataset(
        cfg.data.prefixes,
        cfg.data.weights,
        cfg.data.seq_length,
        cfg.train.steps * cfg.parallel.global_batch_size,
        cfg.train.seed,
        pre.arch.vocab_size,
        2,
        Path(cfg.run_dir) / "data_cache",
    )
    models = build_models(cfg, pre.arch, pre.meta)
    optimizer, scheduler = build_optimizer(cfg, models.ddp)
    trainer = RetrofitTrainer(cfg, models, optimizer, scheduler, dataset, 1, 2)
    t0 = time.perf_counter()
    trainer.train_step(0)  # optimizer state exists from here on
    warm_s = time.perf_counter() - t0
    params = [p for m in (models.student, models.teacher) if m is not None for p in m.parameters()]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    probe = SavedTensorProbe(params)
    t0 = time.perf_counter()
    with probe, probe.core_attention():
        result = trainer.train_step(1)
    step_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "layers": pre.arch.num_layers,
        "tokens": cfg.parallel.micro_batch_size * cfg.data.seq_length,
        "saved_bytes": probe.totals(),
        "saved_storages": probe.table(),
        "warmup_step_s": warm_s,
        "step_s": step_s,
        "kd": result.kd,
        "backend": "flex" if cuda and cfg.dms.attention_backend in ("auto", "flex") else "reference",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "recompute": cfg.parallel.recompute,
    }
    if cuda:
        out["allocated_before_step"] = before
        out["max_allocated"] = torch.cuda.max_memory_allocated()
    del trainer, models, optimizer, scheduler, dataset, result
    gc.collect()
    if cuda:  # diagnostic: what a second model built in this process would start on top of
        out["allocated_after_cleanup"] = torch.cuda.memory_allocated()
    return out


def planner_view(cfg_dict: dict, emulate_tp: int, base: dict, cpu: bool, flex: bool) -> dict[str, Any]:
    """The planner's per-layer numbers for the measured layout, and (equal, checked) for TP=N itself."""
    from dataclasses import replace

    from dms_megatron.config import RetrofitConfig
    from dms_megatron.plan import Assumptions, plan_input_from_config, stage_memory
    from dms_megatron.plan.memory import layer_activation_terms

    inp = plan_input_from_config(RetrofitConfig.from_dict(cfg_dict))
    # what autograd saves without recompute (the probe's view; CPU: torch has no fused RMSNorm) ...
    terms = layer_activation_terms(inp, "none", composite_norms=cpu)
    # ... and what stays resident per layer under the layout's own recompute setting
    resident = sum(layer_activation_terms(inp, composite_norms=cpu).values())
    a = inp.arch
    e, q, kv = inp.act_bytes, a.num_attention_heads * a.head_dim, a.num_query_groups * a.head_dim
    # The attention term is the core's inputs -- q and k after RoPE and the fused QKV output (kept by
    # the view v) -- plus flex's own output and log-sum-exp. Of the decision term, the sigmoid output
    # is saved before the core, the rest (log-keep bias and its inputs) inside it.
    core_inputs = e * (q + kv + q + 2 * kv)
    sigmoid = 4.0 * a.num_query_groups
    # flex saves its output inside the core (the output GEMM's input is a view of it); the CPU reference
    # backend's output is first saved by that GEMM, outside the core
    proj = terms["proj_input"] if flex else 0.0
    outside = sum(terms.values()) - terms["attention"] - terms["dms_decisions"] + sigmoid - proj
    inside = terms["attention"] - core_inputs + terms["dms_decisions"] - sigmoid + proj
    asm = Assumptions()
    one, two = (replace(inp, arch=replace(a, num_layers=n)) for n in (1, 2))
    static = stage_memory(two, asm, 0).static - stage_memory(one, asm, 0).static
    full = RetrofitConfig.from_dict({**base, "parallel": {**base["parallel"], "sequence_parallel": False}})
    real = replace(
        plan_input_from_config(full),
        tp=emulate_tp,
        pp=1,
        dp=1,
        micro_batch_size=1,
        global_batch_size=1,
        seq_length=inp.seq_length,
    )
    real_terms = layer_activation_terms(real, "none", composite_norms=cpu)
    same = abs(sum(real_terms.values()) - sum(terms.values())) < 1e-6
    return {
        "terms_bytes_per_token": terms,
        "saved_bytes_per_token": sum(terms.values()),
        "outside_core_bytes_per_token": outside,
        "core_input_bytes_per_token": core_inputs,
        "core_rest_bytes_per_token": inside,
        "recompute": inp.recompute,
        "resident_bytes_per_token": resident,
        "static_bytes_per_layer": static,
        "equals_tp_layout": same,
    }


def _compare(measured: float, planned: float) -> dict[str, float]:
    return {
        "measured": measured,
        "planner": planned,
        "ratio": measured / planned if planned else float("nan"),
    }


def build_report(
    args: argparse.Namespace, overrides: list[str], runs: dict[int, dict], plan: dict[str, Any]
) -> dict[str, Any]:
    """Per-layer differences of the two depths, each against the planner.

    Saved bytes are compared only without recompute (with it, the probe also sees what the backward
    pass re-saves). On CUDA the allocator is split into the static growth per layer (allocated before
    the measured step: weights, gradients, optimizer state, teacher) and the transient growth (peak
    minus that: activations resident at the peak), each against its planner term."""
    a, b = sorted(runs)
    tokens = runs[a]["tokens"]
    per_layer = {
        r: (runs[b]["saved_bytes"][r] - runs[a]["saved_bytes"][r]) / (b - a) / tokens
        for r in runs[a]["saved_bytes"]
    }
    report: dict[str, Any] = {
        "device": runs[a]["device"],
        "torch": torch.__version__,
        "overrides": overrides,
        "recompute": runs[a]["recompute"],
        "layers": [a, b],
        "emulate_tp": args.emulate_tp,
        "vocab": args.vocab,
        "tokens_per_microbatch": tokens,
        "runs": {str(n): r for n, r in runs.items()},
        "measured_saved_bytes_per_token_per_layer": per_layer,
        "planner": plan,
    }
    if runs[a]["recompute"] == "none":
        report["outside_core"] = _compare(per_layer["layer"], plan["outside_core_bytes_per_token"])
        if runs[a]["backend"] == "flex":
            rest = per_layer["core_other"] + per_layer["core_internal"]
            report["core_input"] = _compare(per_layer["core_input"], plan["core_input_bytes_per_token"])
            report["core_rest"] = _compare(rest, plan["core_rest_bytes_per_token"])
            report["all_saved"] = _compare(sum(per_layer.values()), plan["saved_bytes_per_token"])
    if "max_allocated" in runs[a]:
        gib = 2.0**30

        def grow(key: Callable[[dict], float]) -> float:
            return (key(runs[b]) - key(runs[a])) / (b - a) / gib

        static = grow(lambda r: r["allocated_before_step"])
        transient = grow(lambda r: r["max_allocated"] - r["allocated_before_step"])
        planned_act = plan["resident_bytes_per_token"] * tokens / gib
        planned_static = plan["static_bytes_per_layer"] / gib
        report["static_growth_per_layer_gib"] = _compare(static, planned_static)
        report["activation_growth_per_layer_gib"] = _compare(transient, planned_act)
        report["peak_growth_per_layer_gib"] = _compare(static + transient, planned_static + planned_act)
    return report


def _measure_in_child(args: argparse.Namespace, n: int, overrides: list[str], work: Path) -> dict:
    """One depth in a fresh interpreter: a second model built in the same process inherits memory the
    first one left behind (megatron keeps references), which inflates the static growth per layer."""
    out = work / f"L{n}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--out",
        str(out),
        "--work",
        str(work),
        "--emulate-tp",
        str(args.emulate_tp),
        "--vocab",
        str(args.vocab),
        "--single",
        str(n),
        *overrides,
    ]
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"[activation_check] the {n}-layer run failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, nargs=2, default=(1, 2), metavar=("A", "B"))
    ap.add_argument("--emulate-tp", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=4096, help="0: keep the preset's vocabulary")
    ap.add_argument("--work", default="runs/activation_check")
    ap.add_argument("--single", type=int, default=None, help=argparse.SUPPRESS)  # child: one depth
    ap.add_argument(
        "--replan",
        metavar="REPORT",
        help="recompute the planner side of an earlier report from its measured runs (no model is built)",
    )
    args, overrides = ap.parse_known_args()
    if args.replan:
        old = json.loads(Path(args.replan).read_text())
        overrides = old["overrides"]
        args.emulate_tp = old["emulate_tp"]
        args.vocab = old.get("vocab", args.vocab)  # reports before it was recorded: pass --vocab
    base = compose_config(overrides)
    work = Path(args.work)
    data = work / "data" / "random"

    def cfg_at(n: int) -> dict:
        return layout(base, n, args.emulate_tp, args.vocab or None, str(data), str(work / f"L{n}"))

    if args.replan:
        runs = {int(n): r for n, r in old["runs"].items()}
        a = min(runs)
        if "device" not in runs[a]:
            raise SystemExit(f"{args.replan}: its runs predate --replan (no device/recompute per run)")
        cpu, flex = runs[a]["device"] == "cpu", runs[a]["backend"] == "flex"
        plan = planner_view(cfg_at(a), args.emulate_tp, base, cpu, flex)
        report = build_report(args, overrides, runs, plan)
        report["replanned_from"] = str(args.replan)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({k: report[k] for k in report if k not in ("runs", "planner")}, indent=2))
        return
    if args.single is not None:
        from dms_megatron.training.setup import init_distributed

        init_distributed(1, 1)
        run = measure(cfg_at(args.single))
        Path(args.out).write_text(json.dumps(run, indent=2) + "\n")
        print(f"[activation_check] {args.single} layers: saved {run['saved_bytes']}", flush=True)
        return
    a, b = args.layers
    if not 0 < a < b:
        raise SystemExit("--layers A B needs 0 < A < B")
    vocab = args.vocab or base["model"]["hf_config"]["vocab_size"]
    seq, mbs = base["data"]["seq_length"], base["parallel"]["micro_batch_size"]
    write_data(data, vocab, 3 * seq * mbs)
    runs = {}
    for n in (a, b):
        print(f"[activation_check] {n} layers (own process) ...", flush=True)
        runs[n] = _measure_in_child(args, n, overrides, work)
    cpu, flex = runs[a]["device"] == "cpu", runs[a]["backend"] == "flex"
    plan = planner_view(cfg_at(a), args.emulate_tp, base, cpu=cpu, flex=flex)
    report = build_report(args, overrides, runs, plan)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in report if k not in ("runs", "planner")}, indent=2))


if __name__ == "__main__":
    main()
