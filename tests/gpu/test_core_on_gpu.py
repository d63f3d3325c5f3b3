"""Core math on CUDA: identical noise to CPU, reference attention and KL agree with the CPU results."""

from __future__ import annotations

import torch

from dms_megatron.core import NoiseKey, dms_attention_reference, logistic_noise, token_kl, uniform_from_hash


def cuda_launches(fn) -> int:
    """CUDA kernels ``fn()`` launches (counted on its second call: the first compiles)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")


def test_noise_uniforms_bit_identical_and_noise_within_ulps_on_cpu_and_gpu():
    key = NoiseKey(seed=42, step=1000, micro_batch=3, dp_rank=5, layer=63)
    kw = {"head_offset": 8, "position_offset": 8192}
    u_cpu = uniform_from_hash(key, (4, 8, 8192), **kw)
    u_gpu = uniform_from_hash(key, (4, 8, 8192), device="cuda", **kw)
    assert torch.equal(u_cpu, u_gpu.cpu())  # integer hashing: identical bits
    cpu = logistic_noise(key, (4, 8, 8192), **kw)
    gpu = logistic_noise(key, (4, 8, 8192), device="cuda", **kw).cpu()
    diff = (cpu - gpu).abs()
    ulp = torch.finfo(torch.float32).eps * cpu.abs().clamp(min=1.0)
    print(
        f"noise CPU vs GPU: max |diff| {diff.max():.3e}, differing elements {(diff > 0).float().mean():.4%}"
    )
    assert torch.all(diff <= 4 * ulp)  # fp32 log differs by ulps between CPU and CUDA libm
    again = logistic_noise(key, (4, 8, 8192), device="cuda", **kw).cpu()
    assert torch.equal(gpu, again)  # same device: exactly reproducible


def test_reference_attention_matches_cpu_in_fp64():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 300, 32, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 300, 32, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, 300, 32, generator=gen, dtype=torch.float64)
    lg = torch.randn(2, 2, 300, generator=gen, dtype=torch.float64) * 3
    doc = torch.tensor([0] * 100 + [1] * 150 + [2] * 50)
    args = [t.cuda().requires_grad_() for t in (q, k, v, lg)]
    out = dms_attention_reference(*args, window=16, doc_ids=doc.cuda(), chunk_size=64)
    ref = dms_attention_reference(q, k, v, lg, window=16, doc_ids=doc)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert all(torch.isfinite(a.grad).all() for a in args)


def test_kl_matches_cpu():
    gen = torch.Generator().manual_seed(0)
    zs = torch.randn(64, 49152, generator=gen).bfloat16()
    zt = torch.randn(64, 49152, generator=gen).bfloat16()
    for direction in ("student_teacher", "teacher_student"):
        cpu = token_kl(zs, zt, direction=direction)
        gpu = token_kl(zs.cuda(), zt.cuda(), direction=direction)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)


def test_noise_kernel_equals_the_core_torch_ops_on_cuda_in_few_launches():
    """``kernels.noise`` (one Triton launch for the hash) draws the core's torch-op noise bit for bit on
    CUDA, offsets past 2**32 included, and launches a handful of kernels where the core launches ~190."""
    from dms_megatron.kernels import noise as kernel_noise

    key = NoiseKey(seed=7, step=321, micro_batch=1, dp_rank=2, layer=29)
    for shape, kw in (
        ((4, 3, 2048), {"head_offset": 3}),
        ((2, 5, 8192), {"sample_offset": 2**33 + 1, "position_offset": 2**35 + 5}),
        ((1, 1, 7), {}),
    ):
        want_u = uniform_from_hash(key, shape, device="cuda", **kw)
        assert torch.equal(kernel_noise.uniform_from_hash(key, shape, device="cuda", **kw), want_u)
        want = logistic_noise(key, shape, device="cuda", **kw)
        assert torch.equal(kernel_noise.logistic_noise(key, shape, device="cuda", **kw), want)

    core = cuda_launches(lambda: logistic_noise(key, (4, 3, 2048), device="cuda"))
    fused = cuda_launches(lambda: kernel_noise.logistic_noise(key, (4, 3, 2048), device="cuda"))
    print(f"noise kernels per draw: core torch ops {core}, kernels.noise {fused}")
    assert fused <= 6 < core


def test_kd_kernels_equal_the_torch_kl_in_bf16_and_time_them():
    """``kernels.kd`` (``dms.kd_backend=triton``) == ``core.losses.token_kl`` on bf16 logits of a 49K
    vocabulary (SmolLM2's), KL and student gradient, both directions; prints both paths' forward +
    backward time (median of ``triton.testing.do_bench``)."""
    import triton.testing

    from dms_megatron.core.losses import token_kl
    from dms_megatron.kernels.kd import token_kl_triton

    gen = torch.Generator(device="cuda").manual_seed(3)
    zs = (torch.randn(4096, 49152, device="cuda", generator=gen) * 2).bfloat16()
    zt = (zs.float() + torch.randn(zs.shape, device="cuda", generator=gen)).bfloat16()
    w = torch.rand(4096, device="cuda", generator=gen)
    for reverse in (False, True):
        direction = "teacher_student" if reverse else "student_teacher"
        a, b = zs.clone().requires_grad_(), zs.clone().requires_grad_()
        want = token_kl(a, zt, direction)
        (want * w).sum().backward()
        got = token_kl_triton(b, zt, reverse=reverse)
        (got * w).sum().backward()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
        err = (b.grad.float() - a.grad.float()).abs().max() / a.grad.float().abs().max()
        assert err < 1e-2, err  # both round the fp32 gradient to bf16

        x = zs.clone().requires_grad_()

        def step(loss, x=x, w=w) -> None:
            x.grad = None
            (loss(x) * w).sum().backward()

        def torch_kl(x, d=direction):
            return token_kl(x, zt, d)

        def triton_kl(x, r=reverse):
            return token_kl_triton(x, zt, reverse=r)

        t_torch = triton.testing.do_bench(lambda f=torch_kl: step(f))
        t_triton = triton.testing.do_bench(lambda f=triton_kl: step(f))
        print(f"KD fwd+bwd 4096 x 49152 bf16 {direction}: torch {t_torch:.3f} ms, triton {t_triton:.3f} ms")


def test_fused_decisions_equal_the_core_ops_on_cuda_in_few_launches():
    """``kernels.decisions`` on CUDA == ``relaxed_decisions`` + ``shifted_log_keep`` (values and the
    logits' gradient within float rounding, the same hard decisions), in a few launches each way where
    the torch ops launch ~20."""
    from torch.profiler import ProfilerActivity, profile

    from dms_megatron.core.gating import relaxed_decisions
    from dms_megatron.core.shift import same_doc_as_next, shifted_log_keep
    from dms_megatron.kernels.decisions import fused_decisions

    gen = torch.Generator(device="cuda").manual_seed(4)
    B, H, T, tau = 2, 3, 4099, 0.1
    logits = torch.randn(B, H, T, device="cuda", generator=gen) * 3
    uniforms = torch.rand(B, H, T, device="cuda", generator=gen).clamp(1e-6, 1 - 1e-6)
    noise = torch.log(uniforms) - torch.log1p(-uniforms)  # core.noise.logistic_from_uniform
    doc_ids = torch.arange(T, device="cuda") // 700
    same = same_doc_as_next(doc_ids.expand(B, T))
    g = torch.randn(B, H, T, device="cuda", generator=gen)

    def torch_ops(x):
        dec, relaxed = relaxed_decisions(x, torch.log(uniforms) - torch.log1p(-uniforms), tau)
        return dec, shifted_log_keep(relaxed, doc_ids)

    results = []
    for fn in (
        torch_ops,
        lambda x: fused_decisions(x, noise, tau, same),
        lambda x: fused_decisions(x, None, tau, same, uniforms=uniforms),
    ):
        x = logits.clone().requires_grad_(True)
        dec, lk = fn(x)
        ((dec + lk) * g).sum().backward()
        results.append((dec, lk, x.grad))
    (dec_t, lk_t, gx_t), *fused_results = results
    for dec_f, lk_f, gx_f in fused_results:  # noise given, and drawn from its uniforms in the kernel
        assert torch.equal(dec_f.round(), dec_t.round())
        torch.testing.assert_close(dec_f, dec_t, atol=1e-6, rtol=0)
        torch.testing.assert_close(lk_f, lk_t, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx_f, gx_t, atol=1e-4, rtol=1e-4)

    def launches(fn) -> int:
        x = logits.clone().requires_grad_(True)
        fn(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            dec, lk = fn(x)
            (dec.sum() + lk.sum()).backward()
            torch.cuda.synchronize()
        return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")

    core = launches(torch_ops)
    fused = launches(lambda x: fused_decisions(x, None, tau, same, uniforms=uniforms))
    print(f"decision kernels forward + backward: core torch ops {core}, kernels.decisions {fused}")
    assert fused < core


def test_training_rotary_equals_megatrons_rope_in_bf16_in_two_launches():
    """``rotary_with_grad`` (the DMS attention's RoPE of packed sequences on CUDA) equals megatron's
    unfused RoPE bit for bit in bf16, output and q / k gradients, in one kernel each way where
    megatron's takes ~12 per q or k."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from dms_megatron.kernels.fused_elementwise import rotary_tables, rotary_with_grad

    gen = torch.Generator().manual_seed(0)
    T, HQ, HK, D = 4096, 9, 3, 64
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    half = torch.outer(torch.randint(0, 8192, (T,), generator=gen).float(), inv)
    freqs = torch.cat((half, half), -1).reshape(T, 1, 1, D).cuda()
    q = torch.randn(T, 1, HQ, D, generator=gen).cuda().bfloat16().requires_grad_()
    k = torch.randn(T, 1, HK, D, generator=gen).cuda().bfloat16().requires_grad_()
    gq = torch.randn(T, 1, HQ, D, generator=gen).cuda().bfloat16()
    gk = torch.randn(T, 1, HK, D, generator=gen).cuda().bfloat16()

    def megatron():
        out = _apply_rotary_pos_emb_bshd(q, freqs), _apply_rotary_pos_emb_bshd(k, freqs)
        return out, torch.autograd.grad(out, (q, k), (gq, gk))

    tables = rotary_tables(freqs, torch.bfloat16)

    def fused():
        qo, ko = rotary_with_grad(q.view(T, HQ, D), k.view(T, HK, D), *tables)
        grads = torch.autograd.grad((qo, ko), (q, k), (gq.view(T, HQ, D), gk.view(T, HK, D)))
        return (qo.view(q.shape), ko.view(k.shape)), grads

    (want, want_g), (got, got_g) = megatron(), fused()
    for name, a, b in zip(("q", "k", "dq", "dk"), (*got, *got_g), (*want, *want_g), strict=True):
        assert torch.equal(a, b), (name, (a.float() - b.float()).abs().max().item())

    n_megatron, n_fused = cuda_launches(megatron), cuda_launches(fused)
    print(f"rotary kernels forward + backward (q and k): megatron {n_megatron}, fused {n_fused}")
    assert n_fused <= 4 < n_megatron
