"""The CPU harness itself: shim guard, runner error reporting, and TP/PP/SP parity of the tiny GPT.

One spawned 4-rank job computes every layout in turn (rebuilding megatron's parallel state each time), so
the ~7 s per-rank import cost is paid once: TP1/PP1 (the reference; 4 data-parallel replicas), TP2, TP2+SP,
PP2, TP2xPP2 and TP2xPP2+SP, all with the same master weights and the same 2 micro-batches.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import torch
from runner import run_distributed

from dms_megatron.megatron.patches.cpu_training import check_cpu_patch_targets

Layout = tuple[int, int, bool]  # (tp, pp, sequence_parallel)

REFERENCE: Layout = (1, 1, False)
LAYOUTS: list[Layout] = [(2, 1, False), (2, 1, True), (1, 2, False), (2, 2, False), (2, 2, True)]
WORLD_SIZE = 4
NUM_MICROBATCHES = 2
SEED = 1234
LOSS_RTOL = 1e-5
GRAD_ATOL = 1e-5


def _layout_id(layout: Layout) -> str:
    tp, pp, sp = layout
    return f"tp{tp}-pp{pp}" + ("-sp" if sp else "")


# ---------------------------------------------------------------------------------------------------------
# rank jobs (module level so spawn can import them; tiny_gpt imported inside: it pulls in GPTModel)
# ---------------------------------------------------------------------------------------------------------


def _shim_probe() -> dict[str, Any]:
    """What the shim does to CUDA-placement calls, observed inside a rank."""
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as transformer_utils

    from dms_megatron.megatron.patches.cpu_training import cpu_training_enabled, enable_cpu_training

    enable_cpu_training()  # second call: must be a no-op
    modes = torch.overrides._get_current_function_mode_stack()
    x = torch.ones(3)
    state = torch.cuda.get_rng_state()
    a = torch.rand(2)
    torch.cuda.set_rng_state(state)
    b = torch.rand(2)
    mask = fused_softmax.get_default_causal_mask(4)
    return {
        "installed": cpu_training_enabled(),
        "mode_count": sum(type(m).__name__ == "CudaToCpuMode" for m in modes),
        "zeros_cuda": str(torch.zeros(2, device="cuda").device),
        "zeros_cuda1": str(torch.zeros(2, device="cuda:1").device),
        "zeros_torch_device": str(torch.zeros(2, device=torch.device("cuda", 0)).device),
        "zeros_int": str(torch.zeros(2, device=0).device),
        "tensor_cuda_is_self": x.cuda() is x,
        "to_cuda": str(x.to("cuda").device),
        "to_cuda_kw": str(x.to(device="cuda", dtype=torch.float64).device),
        "type": x.type(),
        "type_bf16": x.bfloat16().type(),
        "current_device": str(torch.cuda.current_device()),
        "rng_roundtrip": torch.equal(a, b),
        "stream_ops": torch.cuda.current_stream().wait_stream(torch.cuda.Stream()) is None,
        "mask": mask.tolist(),
        "mask_same_fn": fused_softmax.get_default_causal_mask is transformer_utils.get_default_causal_mask,
    }


def _layout_job(
    rank: int, world_size: int, layouts: list[Layout], num_microbatches: int, seed: int
) -> dict[str, Any]:
    """Build the tiny GPT in every layout, run the schedule, and return losses and full grads per layout."""
    from dms_megatron.testing import tiny_gpt

    batches = tiny_gpt.make_batches(num_microbatches, seed=seed)
    out: dict[str, Any] = {"probe": _shim_probe() if rank == 0 else None, "layouts": {}, "megatron_init": {}}
    for tp in (1, 2):  # megatron's own CPU init: TP=2 shards, gathered, must equal the TP=1 weights
        model = tiny_gpt.build_tiny_gpt(tp, 1, seed=seed, master_weights=False)
        out["megatron_init"][tp] = tiny_gpt.gather_full_params(model)
        if tp == 2:
            out["tp2_strides"] = {
                name: (int(p.partition_dim), int(p.partition_stride))
                for name, p in model.named_parameters()
                if getattr(p, "tensor_model_parallel", False)
            }
    for tp, pp, sp in layouts:
        model = tiny_gpt.build_tiny_gpt(tp, pp, seed=seed, sequence_parallel=sp)
        losses = tiny_gpt.forward_backward(model, batches, num_microbatches)
        grads = tiny_gpt.gather_full_grads(model)
        out["layouts"][(tp, pp, sp)] = {"losses": losses, "grads": grads}
    return out


def _failing_job(rank: int, world_size: int, bad_rank: int) -> int:
    if rank == bad_rank:
        raise ValueError(f"deliberate failure on rank {rank}")
    return rank


def _dirty_job(rank: int, world_size: int) -> int:
    """Leave behind the process state a careless job could (a pooled rank must undo all of it)."""
    from megatron.core import parallel_state

    from dms_megatron.testing import tiny_gpt

    tiny_gpt.init_parallel(world_size, 1, seed=1)  # parallel state and RNG tracker left initialised
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    os.environ["DMS_POOL_PROBE"] = "dirty"
    os.chdir("/")
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    parallel_state.get_tensor_model_parallel_world_size = lambda: 99  # a monkeypatch never undone
    return os.getpid()


def _probe_job(rank: int, world_size: int) -> dict[str, Any]:
    """What a previous job left behind in this rank, as far as a job can see."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mcore_random

    return {
        "pid": os.getpid(),
        "model_parallel": parallel_state.model_parallel_is_initialized(),
        "rng_tracker": mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED,
        "patched": parallel_state.get_tensor_model_parallel_world_size.__name__,
        "seed": torch.initial_seed(),
        "dtype": torch.get_default_dtype(),
        "env": os.environ.get("DMS_POOL_PROBE"),
        "rank_env": (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]),
        "cwd": os.getcwd(),
        "sigusr1_default": signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL,
    }


# ---------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layout_runs() -> list[dict[str, Any]]:
    """Per-rank results of the single 4-rank job covering the reference and every layout."""
    return run_distributed(
        _layout_job, WORLD_SIZE, [REFERENCE, *LAYOUTS], NUM_MICROBATCHES, SEED, timeout=300.0
    )


def _merged(runs: list[dict[str, Any]], layout: Layout) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses (last-stage ranks must agree exactly) and full grads (replicas must agree exactly)."""
    from dms_megatron.testing.tiny_gpt import merge_rank_grads

    per_rank = [run["layouts"][layout] for run in runs]
    loss_lists = [r["losses"] for r in per_rank if r["losses"]]
    assert loss_lists, f"no last-stage rank reported losses for {layout}"
    for losses in loss_lists[1:]:
        assert losses == loss_lists[0], f"last-stage replicas disagree on the loss for {layout}"
    return loss_lists[0], merge_rank_grads([r["grads"] for r in per_rank], atol=0.0)


# ---------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------


def test_check_cpu_patch_targets() -> None:
    check_cpu_patch_targets()  # every upstream name the CPU mode patches exists with the expected parameters


def test_runner_reraises_rank_exception_with_traceback() -> None:
    with pytest.raises(ValueError, match="deliberate failure on rank 1") as info:
        run_distributed(_failing_job, 2, 1, timeout=120.0)
    cause = str(info.value.__cause__)
    assert "rank 1 of 2 failed" in cause
    assert "_failing_job" in cause and "Traceback" in cause
    assert any("rank 1 of 2" in note for note in getattr(info.value, "__notes__", []))


def test_shim_behaviour_inside_rank(layout_runs: list[dict[str, Any]]) -> None:
    probe = layout_runs[0]["probe"]
    assert probe["installed"]
    assert probe["mode_count"] == 1  # enable_cpu_training() is idempotent
    for key in ("zeros_cuda", "zeros_cuda1", "zeros_torch_device", "zeros_int", "to_cuda", "to_cuda_kw"):
        assert probe[key] == "cpu", key
    assert probe["tensor_cuda_is_self"]
    assert probe["type"] == "torch.cuda.FloatTensor"
    assert probe["type_bf16"] == "torch.cuda.BFloat16Tensor"
    assert probe["current_device"] == "cpu"
    assert probe["rng_roundtrip"]
    assert probe["stream_ops"]
    assert probe["mask_same_fn"]
    assert probe["mask"] == torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1).tolist()


def test_reference_is_sane(layout_runs: list[dict[str, Any]]) -> None:
    losses, grads = _merged(layout_runs, REFERENCE)  # 4 data-parallel replicas agree bit for bit
    assert len(losses) == NUM_MICROBATCHES
    assert all(4.0 < loss < 7.0 for loss in losses), losses  # ~ln(128) = 4.85 at init
    assert len(grads) == 3 + 4 * 6  # embedding, output, final norm, 4 x (2 norms, qkv, proj, fc1, fc2)
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads.values())


def test_unshard_matches_megatron_cpu_init(layout_runs: list[dict[str, Any]]) -> None:
    """Megatron's own TP=2 CPU init, gathered with partition_dim/stride, equals its TP=1 init exactly."""
    strides = layout_runs[0]["tp2_strides"]
    assert strides["decoder.layers.0.mlp.linear_fc1.weight"] == (0, 2)  # SwiGLU: [gate; up] per rank
    assert strides["decoder.layers.0.mlp.linear_fc2.weight"] == (1, 1)
    assert strides["decoder.layers.0.self_attention.linear_qkv.weight"] == (0, 1)
    for run in layout_runs:
        full_tp1, full_tp2 = run["megatron_init"][1], run["megatron_init"][2]
        assert sorted(full_tp1) == sorted(full_tp2)
        for name, weight in full_tp1.items():
            assert torch.equal(full_tp2[name], weight), name


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_layout_matches_reference(layout_runs: list[dict[str, Any]], layout: Layout) -> None:
    ref_losses, ref_grads = _merged(layout_runs, REFERENCE)
    losses, grads = _merged(layout_runs, layout)
    torch.testing.assert_close(
        torch.tensor(losses, dtype=torch.float64),
        torch.tensor(ref_losses, dtype=torch.float64),
        rtol=LOSS_RTOL,
        atol=0.0,
    )
    assert sorted(grads) == sorted(ref_grads)
    loss_diff = max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))
    grad_diff = max((grads[n] - g).abs().max().item() for n, g in ref_grads.items())
    grad_max = max(g.abs().max().item() for g in ref_grads.values())
    print(
        f"{_layout_id(layout)}: losses {losses} max|dloss| {loss_diff:.3g} max|dgrad| {grad_diff:.3g}"
        f" (max|grad| {grad_max:.3g})"
    )
    for name, ref in ref_grads.items():
        assert grads[name].shape == ref.shape, name
        torch.testing.assert_close(
            grads[name], ref, rtol=0.0, atol=GRAD_ATOL, msg=lambda m, n=name: f"grad of {n}: {m}"
        )


def test_pooled_rank_looks_fresh_to_the_next_job() -> None:
    """runner pools ranks across jobs: what one job changes must be gone for the next."""
    dirty_pids = run_distributed(_dirty_job, 2, timeout=120.0)
    probes = run_distributed(_probe_job, 2, timeout=120.0)
    for rank, probe in enumerate(probes):
        assert not probe["model_parallel"] and not probe["rng_tracker"]
        assert probe["patched"] == "get_tensor_model_parallel_world_size"
        assert probe["seed"] != 0  # reseeded from the OS, as in a fresh process
        assert probe["dtype"] == torch.float32
        assert probe["env"] is None and probe["cwd"] == os.getcwd()
        assert probe["rank_env"] == (str(rank), str(rank), "2")
        assert probe["sigusr1_default"]
    assert probes[0]["seed"] != probes[1]["seed"]
    if os.environ.get("DMS_MEGATRON_FRESH_RANKS") != "1":  # pooled: the probe ran where the dirt was left
        assert [p["pid"] for p in probes] == dirty_pids
