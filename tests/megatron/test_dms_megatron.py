"""DMS as a Megatron layer-spec plugin: parity across TP / PP / SP, teacher mode == stock model,
the Megatron core attention == the core reference, and build-time errors."""

from __future__ import annotations

from types import SimpleNamespace

import dms_jobs
import pytest
import torch
from runner import run_distributed

from dms_megatron.config import DMSConfig
from dms_megatron.megatron.attention import validate_parallel_layout

# (world, tp, pp, sp)
LAYOUTS = [(1, 1, 1, False), (2, 2, 1, False), (2, 2, 1, True), (2, 1, 2, False), (4, 2, 2, True)]


def _merge(results: list[dict]) -> tuple[list[dict], dict[str, torch.Tensor], torch.Tensor]:
    losses = [r["losses"] for r in results if r["losses"]]
    grads = dms_jobs.merge_grads(results)
    for r in results[1:]:
        assert torch.equal(r["rates"], results[0]["rates"]), "ranks disagree on reduced decision rates"
    return losses[0], grads, results[0]["rates"]


@pytest.fixture(scope="module", params=["adapter", "neuron"])
def layout_results(request) -> dict:
    variant = request.param
    out = {}
    for world, tp, pp, sp in LAYOUTS:
        res = run_distributed(dms_jobs.parity_job, world, tp, pp, sp, {"variant": variant}, timeout=400)
        out[(tp, pp, sp)] = _merge(res)
    return out


@pytest.mark.parametrize(
    "layout", [lay[1:] for lay in LAYOUTS[1:]], ids=lambda lay: f"tp{lay[0]}pp{lay[1]}sp{int(lay[2])}"
)
def test_layout_matches_single_rank(layout_results, layout):
    ref_losses, ref_grads, ref_rates = layout_results[(1, 1, False)]
    losses, grads, rates = layout_results[layout]
    # same noise, same decisions: the reduced per-[layer, head] eviction rates are identical
    assert torch.equal(rates, ref_rates)
    assert 0.0 < float(ref_rates.mean()) < 1.0, "decisions should be mixed for a meaningful test"
    for got, want in zip(losses, ref_losses, strict=True):
        for key in ("kd", "cmp", "loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert ref_losses[0]["cmp"] > 0, "the compression loss must be active (frac below target)"
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    dms_params = [n for n in ref_grads if "adapter" in n]
    if dms_params:
        assert all(ref_grads[n].abs().sum() > 0 for n in dms_params), "adapter got no gradient"


@pytest.mark.parametrize("variant", ["adapter", "neuron"])
def test_per_layer_decisions_match_across_tp(variant):
    dms = {"variant": variant, "decisions_per": "layer"}
    runs = {
        (tp, sp): _merge(run_distributed(dms_jobs.parity_job, tp, tp, 1, sp, dms, timeout=400))
        for tp, sp in ((1, False), (2, False), (2, True))
    }
    ref_losses, ref_grads, ref_rates = runs[(1, False)]
    assert torch.all(ref_rates == ref_rates[:, :1]), "per-layer decisions: all heads of a layer agree"
    for key in ((2, False), (2, True)):
        losses, grads, rates = runs[key]
        assert torch.equal(rates, ref_rates)
        for got, want in zip(losses, ref_losses, strict=True):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"{key}: {name}")


@pytest.mark.parametrize("variant", ["adapter", "neuron"])
def test_recompute_gives_identical_step(variant):
    (res,) = run_distributed(dms_jobs.recompute_job, 1, variant, timeout=300)
    ref = res["none"]
    assert ref["core_calls"] == 4 * 2  # 4 layers x 2 micro-batches
    for mode in ("selective", "full"):
        got = res[mode]
        assert got["core_calls"] == 2 * ref["core_calls"], f"{mode}: the core attention was not recomputed"
        assert got["losses"] == ref["losses"], mode
        assert torch.equal(got["rates"], ref["rates"]), mode
        for name, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-6, atol=1e-7, msg=f"{mode}: {name}")


@pytest.mark.parametrize("variant", ["adapter", "neuron"])
def test_teacher_mode_equals_stock_model(variant):
    (res,) = run_distributed(dms_jobs.teacher_parity_job, 1, variant, timeout=300)
    dms, stock = res["dms"], res["stock"]
    torch.testing.assert_close(dms["logits"], stock["logits"], rtol=1e-6, atol=1e-6)
    assert set(stock["grads"]) <= set(dms["grads"])
    for name, g in stock["grads"].items():
        torch.testing.assert_close(dms["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert all(torch.all(rows == 0) for rows in dms["neuron_rows"])
    if variant == "neuron":
        assert len(dms["neuron_rows"]) == 4 and any(rows.abs().sum() > 0 for rows in stock["neuron_rows"])


def test_sdpa_core_attention_equals_the_stock_local_attention():
    (res,) = run_distributed(dms_jobs.sdpa_vanilla_job, 1, timeout=300)
    stock, sdpa = res["stock"], res["sdpa"]
    assert (stock["core"], sdpa["core"]) == ("DotProductAttention", "SDPACoreAttention")
    torch.testing.assert_close(sdpa["logits"], stock["logits"], rtol=1e-4, atol=1e-5)  # fp32, other sums
    assert set(sdpa["grads"]) == set(stock["grads"]) and stock["grads"]
    for name, g in stock["grads"].items():
        torch.testing.assert_close(sdpa["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_core_attention_equals_reference():
    (res,) = run_distributed(dms_jobs.core_vs_reference_job, 1, timeout=300)
    for key, (got, want) in res.items():
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=key)


def _fake_config(**kw):
    base = {
        "context_parallel_size": 1,
        "fused_single_qkv_rope": False,
        "num_query_groups": 4,
        "num_attention_heads": 8,
    }
    base.update(kw)
    return SimpleNamespace(**base)


def test_build_time_errors():
    with pytest.raises(NotImplementedError, match="context parallel"):
        validate_parallel_layout(_fake_config(context_parallel_size=2), 1)
    with pytest.raises(ValueError, match="fused_single_qkv_rope"):
        validate_parallel_layout(_fake_config(fused_single_qkv_rope=True), 1)
    with pytest.raises(ValueError, match="num_query_groups=4 is not divisible"):
        validate_parallel_layout(_fake_config(), 8)
    validate_parallel_layout(_fake_config(), 4)
    with pytest.raises(ValueError, match=r"dms\.window"):
        DMSConfig(window=-1)
    with pytest.raises(ValueError, match=r"dms\.variant"):
        DMSConfig(variant="qneuron")  # type: ignore[arg-type]


@pytest.mark.parametrize("pp", [1, 2])
def test_compression_gradient_reaches_every_stage(pp):
    active = run_distributed(dms_jobs.compression_only_job, pp, pp, 0.9, timeout=300)
    idle = run_distributed(dms_jobs.compression_only_job, pp, pp, 0.0, timeout=300)
    cmp = [c for r in active for c in r["cmp"]]
    assert cmp and all(c > 0 for c in cmp)
    for r_active, r_idle in zip(active, idle, strict=True):
        adapters = [n for n in r_active["grads"] if "adapter.proj" in n]
        assert adapters, "every stage holds DMS layers"
        # active hinge: every stage's adapters (stage 0 only via the P2P channel) get a gradient
        assert all(r_active["grads"][n] > 0 for n in adapters)
        # target 0: the hinge is flat, so nothing flows
        assert all(r_idle["grads"][n] == 0 for n in adapters)
        # the output layer is not on the compression path
        assert all(v == 0 for n, v in r_active["grads"].items() if "output_layer" in n)


@pytest.mark.parametrize("variant", ["adapter", "neuron"])
def test_packed_documents_equal_separate_runs(variant):
    (res,) = run_distributed(dms_jobs.thd_job, 1, variant, timeout=300)
    torch.testing.assert_close(res["packed"], res["alone"], rtol=1e-5, atol=1e-5)
    # our one-shot per-token RoPE of packed sequences == megatron's per-document THD RoPE
    torch.testing.assert_close(res["packed"], res["megatron_rope"], rtol=1e-6, atol=1e-6)


def test_decision_rates_pool_data_parallel_replicas():
    res = run_distributed(dms_jobs.dp_stats_job, 2, timeout=300)
    assert sorted(r["dp_rank"] for r in res) == [0, 1]
    assert torch.equal(res[0]["reduced"], res[1]["reduced"])
    sums = sum(torch.stack([r["local"][layer][0] for layer in range(4)]).double() for r in res)
    counts = sum(torch.stack([r["local"][layer][1] for layer in range(4)]).double() for r in res)
    torch.testing.assert_close(res[0]["reduced"], sums / counts)
    # same data, different dp_rank noise: the replicas' decisions differ
    assert not torch.equal(res[0]["local"][0][0], res[1]["local"][0][0])


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_input_norm_spec_equals_local_spec(tp):
    """With the input norm inside linear_qkv (the Transformer Engine layout), the adapter reads the
    attention's own input as the pre-norm residual and the model is the same as with the local spec."""
    res = run_distributed(dms_jobs.fused_norm_job, tp, tp, timeout=300)[0]
    local, fused = res["local"], res["fused"]
    assert fused["residual_is_input"] == [True] * 4 and local["residual_is_input"] == [False] * 4
    for a, b in zip(local["losses"], fused["losses"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert set(local["grads"]) == set(fused["grads"])
    for name, g in local["grads"].items():
        torch.testing.assert_close(fused["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("tp", [1, 2])
def test_neuron_fade_starts_at_the_teacher_and_zeroes_the_repurposed_rows(tp):
    res = run_distributed(dms_jobs.neuron_fade_job, tp, tp, timeout=300)[0]
    # channel kept: the student's logits are the stock model's; eviction reads a constant -offset
    torch.testing.assert_close(res["kept"], res["stock"], rtol=1e-6, atol=1e-6)
    assert torch.all(res["kept_logits"] == -5.0)
    # channel removed (the paper's start): logits differ and the channel's logits are far from -offset
    assert not torch.allclose(res["removed"], res["stock"], atol=1e-4)
    assert res["removed_logits_min"] < 5.0
    # zeroing touches exactly the repurposed rows (every layer); then every logit is -offset and the
    # forward equals the channel-removed one without eviction (the channel no longer feeds attention)
    assert res["rows"] == 4 * 2 // tp
    assert set(res["changed"]) == {n for n in res["expected_rows"]}
    for name, rows in res["changed"].items():
        assert rows == res["expected_rows"][name][: len(rows)] and len(rows) == len(
            res["expected_rows"][name]
        )
    assert torch.all(res["zeroed_logits"] == -5.0)
    torch.testing.assert_close(res["zeroed"], res["removed_no_eviction"], rtol=1e-6, atol=1e-6)
