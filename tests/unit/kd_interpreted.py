"""Runs the Triton KL distillation kernels (``kernels.kd``) under the Triton interpreter on CPU and prints,
as JSON, their largest relative error against ``core.losses.token_kl`` (per-token KL and the student's
gradient) over seeded cases: both directions, temperatures 1 and 2, vocabularies that are not a multiple
of the block, fp32 and fp16 logits, and a vocabulary sharded over two gloo ranks; started by
``test_kd_kernel.py`` in a fresh interpreter."""

from __future__ import annotations

import json
import random
import sys

import interpreter_setup  # noqa: F401  (TRITON_INTERPRET=1 before any kernel exists)
import torch

from dms_megatron.core.losses import token_kl
from dms_megatron.kernels.kd import token_kl_triton


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def case(seed: int) -> dict:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lead = (rng.randint(1, 3), rng.randint(1, 5))
    V = rng.choice([7, 2048, 3000, 5001])
    reverse = seed % 2 == 1
    tau = [1.0, 2.0][(seed // 2) % 2]
    dtype = torch.float16 if seed % 5 == 4 else torch.float32
    zs = (torch.randn(*lead, V, generator=gen) * 3).to(dtype)
    zt = (zs.float() + torch.randn(*lead, V, generator=gen)).to(dtype)
    upstream = torch.rand(*lead, generator=gen)
    a = zs.clone().requires_grad_()
    want = token_kl(a, zt, "teacher_student" if reverse else "student_teacher", tau)
    (want * upstream).sum().backward()
    b = zs.clone().requires_grad_()
    got = token_kl_triton(b, zt, reverse=reverse, temperature=tau)
    (got * upstream).sum().backward()
    return {
        "V": V,
        "reverse": reverse,
        "tau": tau,
        "dtype": str(dtype),
        "shape_ok": tuple(got.shape) == lead and got.dtype == torch.float32,
        "grad_dtype_ok": b.grad.dtype == dtype,
        "kl_rel": rel(got.detach(), want.detach()),
        "grad_rel": rel(b.grad, a.grad),
    }


def _sharded_rank(rank: int, world: int, port: int, queue) -> None:
    """One rank of a vocabulary sharded over ``world`` gloo ranks: its KL and its shard's gradient."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    zs, zt, w = _sharded_inputs()
    V = zs.shape[-1] // world
    x = zs[:, rank * V : (rank + 1) * V].clone().requires_grad_()
    kl = token_kl_triton(x, zt[:, rank * V : (rank + 1) * V], temperature=2.0, group=dist.group.WORLD)
    (kl * w).sum().backward()
    queue.put((rank, kl.detach().tolist(), x.grad.tolist()))  # plain lists: the rank exits next
    dist.destroy_process_group()


def _sharded_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    zs = torch.randn(6, 2 * 2500, generator=gen) * 3
    return zs, zs + torch.randn(zs.shape, generator=gen), torch.rand(6, generator=gen)


def sharded(world: int = 2) -> dict:
    """KL and gradient over a vocabulary sharded on two ranks == the whole-vocabulary torch KL."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sharded_rank, args=(r, world, port, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    got = {r: (torch.tensor(kl), torch.tensor(g)) for r, kl, g in (queue.get(timeout=300) for _ in procs)}
    for proc in procs:
        proc.join(60)
    zs, zt, w = _sharded_inputs()
    x = zs.clone().requires_grad_()
    want = token_kl(x, zt, "student_teacher", 2.0)
    (want * w).sum().backward()
    return {
        "kl_rel_per_rank": [rel(got[r][0], want.detach()) for r in range(world)],
        "grad_rel": rel(torch.cat([got[r][1] for r in range(world)], dim=-1), x.grad),
    }


def main(n: int) -> None:
    rows = [case(seed) for seed in range(n)]
    try:
        token_kl_triton(torch.zeros(2, 5), torch.zeros(2, 6))
        mismatch = False
    except ValueError:
        mismatch = True
    print(
        json.dumps(
            {"cases": rows, "shape_mismatch_rejected": mismatch, "sharded": sharded(), **megatron_entry()}
        )
    )


def megatron_entry() -> dict:
    """The trainer's entry (``megatron.kd.vocab_parallel_kd_loss``, ``backend=dms.kd_backend``)."""
    from dms_megatron.megatron.kd import vocab_parallel_kd_loss

    zs, zt, w = _sharded_inputs()
    mask = w > 0.3
    by = {b: vocab_parallel_kd_loss(zs, zt, mask, "teacher_student", backend=b) for b in ("torch", "triton")}
    try:
        vocab_parallel_kd_loss(zs, zt, mask, backend="cuda")
        refused = False
    except ValueError:
        refused = True
    return {"entry_rel": rel(by["triton"], by["torch"]), "unknown_backend_refused": refused}


if __name__ == "__main__":
    main(int(sys.argv[1]))
