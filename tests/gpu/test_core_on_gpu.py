"""Core math on CUDA: identical noise to CPU, reference attention and KL agree with the CPU results."""

from __future__ import annotations

import torch

from dms_megatron.core import NoiseKey, dms_attention_reference, logistic_noise, token_kl, uniform_from_hash


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
    from torch.profiler import ProfilerActivity, profile

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

    def launches(fn) -> int:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")

    core = launches(lambda: logistic_noise(key, (4, 3, 2048), device="cuda"))
    fused = launches(lambda: kernel_noise.logistic_noise(key, (4, 3, 2048), device="cuda"))
    print(f"noise kernels per draw: core torch ops {core}, kernels.noise {fused}")
    assert fused <= 6 < core
