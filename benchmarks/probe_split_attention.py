"""Building blocks of a DMS attention split into two library attentions (CUDA), timed one by one.

The DMS score adds a per-key bias only to keys older than the window. Split at the window, the old part
is a causal attention shifted by window + 1 whose bias fits in extra q / k channels (head dim D + 8), and
the band is a sliding-window attention without bias; the two merge by log-sum-exp. Whether that beats
the fused Triton kernel depends on what the libraries do with those shapes; this measures it:

- ``sdpa_default``: SDPA causal at head dim D (PyTorch's own backend choice), the reference;
- ``cudnn_D`` / ``cudnn_D+8``: the cuDNN attention op (causal, log-sum-exp returned) at D and D + 8,
  forward and forward + backward (its backward op called on the forward's output and log-sum-exp);
- ``flash_D+8``: FlashAttention-2 (PyTorch's) causal at D + 8;
- ``cudnn_D_vD+8``: the cuDNN op with q / k at head dim D and v at D + 8 (the bias carried on the
  value side: v scaled by e^bias plus one channel of e^bias, the old part's normaliser);
- ``flash_band``: FlashAttention-2 sliding window (left = window, right = 0) at D;
- ``cudnn_D_keybias``: the cuDNN op at head dim D, causal, with a per-key additive bias ``[B, H, 1, T]``
  broadcast over the queries (stride 0), the way the old part could carry the DMS bias without extra
  channels: forward and forward + backward, its error against a float64 reference at 512 tokens, and the
  peak memory over the inputs (a materialised ``[T, T]`` bias would show there);
- ``flash_varlen_D+8`` / ``cudnn_varlen_D+8``: the old part over packed documents of ``--doc-length``
  tokens ([total, H, d] with cumulative lengths): FlashAttention-2's variable-length form (what the split
  uses with documents) and the cuDNN op's (``_cudnn_attention_forward`` / ``_backward`` with
  ``cum_seq``; its layout and log-sum-exp shape are recorded, and its output compared with FA2's).

    python benchmarks/probe_split_attention.py --shapes 5x1x128,32x8x128 --seqs 8192 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F


def _cudnn(q, k, v, scale):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, True, False, scale=scale
    )
    return out


def _cudnn_fb(q, k, v, g, scale):
    o, lse, cq, ck, mq, mk, seed, offset, _ = _cudnn(q, k, v, scale)
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        g, q, k, v, o, lse, seed, offset, None, cq, ck, mq, mk, 0.0, True, scale=scale
    )


def _flash(q, k, v, scale, left):
    """FlashAttention-2 on [B, T, H, D]: causal, ``left`` keys back (-1: all)."""
    return torch.ops.aten._flash_attention_forward(
        q, k, v, None, None, q.shape[1], k.shape[1], 0.0, True, False,
        scale=scale, window_size_left=left, window_size_right=0,
    )  # fmt: skip


def _flash_fb(q, k, v, g, scale, left):
    o, lse, rng, unused, _ = _flash(q, k, v, scale, left)
    return torch.ops.aten._flash_attention_backward(
        g, q, k, v, o, lse, None, None, q.shape[1], k.shape[1], 0.0, True, rng, unused,
        scale=scale, window_size_left=left, window_size_right=0,
    )  # fmt: skip


def _varlen_rows(Hq: int, Hkv: int, d: int, T: int, doc_length: int, scale: float, timed) -> None:
    """The old part over packed documents at head dim d: FA2 and cuDNN variable-length forms."""
    dev, dt = "cuda", torch.bfloat16
    lengths = [min(doc_length, T - s) for s in range(0, T, doc_length)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=dev, dtype=torch.int32)
    longest = max(lengths)
    q, g = (torch.randn(T, Hq, d, device=dev, dtype=dt) for _ in range(2))
    k, v = (torch.randn(T, Hkv, d, device=dev, dtype=dt) for _ in range(2))

    def flash():
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, longest, longest, 0.0, True, False, scale=scale
        )

    def flash_fb():
        o, lse, rng, unused, _ = flash()
        return torch.ops.aten._flash_attention_backward(
            g, q, k, v, o, lse, cu, cu, longest, longest, 0.0, True, rng, unused, scale=scale
        )

    timed(f"flash_varlen_{d}", flash, flash_fb)
    G = Hq // Hkv
    kx, vx = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)

    def cudnn():
        return torch.ops.aten._cudnn_attention_forward(
            q, kx, vx, None, cu, cu, longest, longest, True, 0.0, True, False, scale=scale
        )

    def cudnn_fb():
        o, lse, cq, ck, mq, mk, seed, offset, _ = cudnn()
        return torch.ops.aten._cudnn_attention_backward(
            g,
            q,
            kx,
            vx,
            o,
            lse,
            seed,
            offset,
            None,
            cq,
            ck,
            mq,
            mk,
            0.0,
            True,
            scale=scale,
        )  # fmt: skip  (None: no bias; an empty tensor counts as a bias and fails, 2026-12-06)

    extra = {}
    try:
        o_c, lse_c, *_ = cudnn()
        o_f, lse_f, *_ = flash()
        extra = {
            "cudnn_out_shape": list(o_c.shape),
            "cudnn_lse_shape": list(lse_c.shape),
            "flash_lse_shape": list(lse_f.shape),
            "max_abs_out_vs_flash": float((o_c.float() - o_f.float()).abs().max()),
        }
    except Exception as exc:
        extra = {"cudnn_error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    print(json.dumps({"Hq": Hq, "Hkv": Hkv, "d": d, "T": T, "doc_length": doc_length, **extra}), flush=True)
    timed(f"cudnn_varlen_{d}", cudnn, cudnn_fb, extra)


def _keybias(q, k, v, bias, scale):
    """cuDNN causal attention with a per-key bias [B, H, 1, T] broadcast over the queries."""
    full = bias.expand(-1, -1, q.shape[2], -1)
    op = torch.ops.aten._scaled_dot_product_cudnn_attention
    return op(q, k, v, full, True, 0.0, True, False, scale=scale)


def _keybias_fb(q, k, v, bias, g, scale):
    o, lse, cq, ck, mq, mk, seed, offset, _ = _keybias(q, k, v, bias, scale)
    full = bias.expand(-1, -1, q.shape[2], -1)
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        g, q, k, v, o, lse, seed, offset, full, cq, ck, mq, mk, 0.0, True, scale=scale
    )


def _keybias_error(H: int, D: int, scale: float) -> dict:
    """Output and dQ / dK / dV of the key-bias call against float64 at 512 tokens (relative max error)."""
    T, dev = 512, "cuda"
    q, k, v, g = (torch.randn(1, H, T, D, device=dev, dtype=torch.float64) for _ in range(4))
    bias = torch.randn(1, H, 1, T, device=dev, dtype=torch.float64) * 3
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    s = torch.einsum("bhtd,bhsd->bhts", leaves[0], leaves[1]) * scale + bias
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=dev).tril(), float("-inf"))
    ref_out = torch.softmax(s, -1) @ leaves[2]
    ref = [ref_out.detach(), *torch.autograd.grad(ref_out, leaves, g)]
    lo = [x.to(torch.bfloat16) for x in (q, k, v)]
    b16 = bias.to(torch.bfloat16)
    out = _keybias(*lo, b16, scale)[0]
    grads = _keybias_fb(*lo, b16, g.to(torch.bfloat16), scale)
    errs = {}
    for name, got, want in zip(["out", "dq", "dk", "dv"], [out, *grads[:3]], ref, strict=True):
        errs[name] = float((got.double() - want).abs().max() / want.abs().max())
    return errs


def probe(Hq: int, Hkv: int, D: int, T: int, window: int, do_bench, doc_length: int = 2048) -> list[dict]:
    dev, dt = "cuda", torch.bfloat16
    scale = D**-0.5
    rows = []

    def bhtd(h, d):
        return torch.randn(1, h, T, d, device=dev, dtype=dt)

    def timed(name, fwd, fb, extra=None):
        row = {"Hq": Hq, "Hkv": Hkv, "D": D, "T": T, "part": name, **(extra or {})}
        try:
            fwd()
            fb()
            torch.cuda.synchronize()
            row["fwd_ms"] = do_bench(fwd)
            row["fwd_bwd_ms"] = do_bench(fb)
        except Exception as exc:  # an unsupported shape is a result: recorded
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)

    q, k, v, g = bhtd(Hq, D), bhtd(Hkv, D), bhtd(Hkv, D), bhtd(Hq, D)
    qr, kr, vr = (x.detach().requires_grad_() for x in (q, k, v))

    def sdpa_fb():
        F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, enable_gqa=True).backward(g)

    timed(
        "sdpa_default",
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        sdpa_fb,
    )
    G = Hq // Hkv
    for d in (D, D + 8):
        qd, gd = bhtd(Hq, d), bhtd(Hq, d)
        kd, vd = bhtd(Hkv, d), bhtd(Hkv, d)
        for label, kk, vv in (
            ("gqa", kd, vd),
            ("expanded", kd.repeat_interleave(G, 1), vd.repeat_interleave(G, 1)),
        ):
            if label == "gqa" and G == 1:
                continue
            timed(
                f"cudnn_{d}_{label}",
                lambda qd=qd, kk=kk, vv=vv: _cudnn(qd, kk, vv, scale),
                lambda qd=qd, kk=kk, vv=vv, gd=gd: _cudnn_fb(qd, kk, vv, gd, scale),
            )
        t = [x.transpose(1, 2) for x in (qd, kd, vd, gd)]  # [B, T, H, d] views
        timed(
            f"flash_{d}",
            lambda t=t: _flash(t[0], t[1], t[2], scale, -1),
            lambda t=t: _flash_fb(t[0], t[1], t[2], t[3], scale, -1),
        )
    # the old part with the bias on the value side instead (q / k at D, v at D + 8: v scaled by e^bias
    # plus one channel of e^bias, whose output is the old part's normaliser): does cuDNN stay fast?
    kx, vx = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # also the key-bias call's
    vw, gw = bhtd(Hq, D + 8), bhtd(Hq, D + 8)
    timed(
        f"cudnn_{D}_v{D + 8}",
        lambda: _cudnn(q, kx, vw, scale),
        lambda: _cudnn_fb(q, kx, vw, gw, scale),
    )
    t = [x.transpose(1, 2) for x in (q, k, v, g)]
    timed(
        "flash_band",
        lambda: _flash(t[0], t[1], t[2], scale, window),
        lambda: _flash_fb(t[0], t[1], t[2], t[3], scale, window),
    )
    bias = torch.randn(1, Hq, 1, T, device=dev, dtype=dt)
    extra: dict = {}
    try:
        extra["error_vs_float64_T512"] = _keybias_error(Hq, D, scale)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _keybias_fb(q, kx, vx, bias, g, scale)
        torch.cuda.synchronize()
        extra["peak_mib_over_inputs"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except Exception as exc:
        extra["keybias_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    timed(
        f"cudnn_{D}_keybias",
        lambda: _keybias(q, kx, vx, bias, scale),
        lambda: _keybias_fb(q, kx, vx, bias, g, scale),
        extra,
    )
    _varlen_rows(Hq, Hkv, D + 8, T, doc_length, scale, timed)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="5x1x128,32x8x128,9x3x64", help="Hq x Hkv x D, comma separated")
    ap.add_argument("--seqs", default="8192", help="sequence lengths, comma separated")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--doc-length", type=int, default=2048, help="tokens per packed document (varlen parts)")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_split_attention.py needs a CUDA GPU")
    from triton.testing import do_bench

    def bench(fn):
        return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))

    head = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "window": args.window,
        "doc_length": args.doc_length,
    }
    print(json.dumps(head), flush=True)
    rows = []
    for T in (int(s) for s in args.seqs.split(",")):
        for shape in args.shapes.split(","):
            Hq, Hkv, D = (int(x) for x in shape.split("x"))
            rows += probe(Hq, Hkv, D, T, args.window, bench, args.doc_length)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({**head, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
