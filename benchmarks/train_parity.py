"""Train the tiny DMS GPT for a few steps at a given TP/PP layout and record the losses.

Launch with torchrun (one process per GPU; on CPU, gloo + the test CPU shim):

    torchrun --nproc-per-node 2 benchmarks/train_parity.py --tp 2 --pp 1 --out tp2.json

Model, data, teacher logits and noise are identical for every layout (name-seeded master weights,
counter-based noise), so the loss curves must agree up to floating-point reduction order. Loss per
micro-batch = vocab-parallel KD vs fixed teacher logits + exact global compression loss; Adam, lr 1e-3.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--variant", default="adapter")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = None
    if cuda:  # bound to the rank's GPU up front, as the trainer does (NCCL never guesses it)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device)
    if not cuda:
        from dms_megatron.megatron.patches.cpu_training import enable_cpu_training

        enable_cpu_training()
    from megatron.core import parallel_state

    from dms_megatron.megatron import apply_dms, attach_dms_pipeline
    from dms_megatron.megatron.families import local_layer_spec
    from dms_megatron.testing import tiny_gpt
    from dms_megatron.testing.tiny_dms import dms_test_config, run_dms_schedule

    cfg = dms_test_config(variant=args.variant, attention_backend=args.backend)
    spec = apply_dms(local_layer_spec(), cfg)
    model = tiny_gpt.build_tiny_gpt(args.tp, args.pp, seed=7, sequence_parallel=args.sp, layer_spec=spec)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    model.to(device)
    state = attach_dms_pipeline(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for step in range(args.steps):
        state.step = step
        batches = [
            {k: v.to(device) for k, v in b.items()} for b in tiny_gpt.make_batches(2, seed=1000 + step)
        ]
        losses = run_dms_schedule(model, batches, state, 2)
        opt.step()
        history.append(losses)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "layout": vars(args),
                    "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "losses": history,
                },
                f,
                indent=1,
            )
        print(
            f"tp={args.tp} pp={args.pp} sp={args.sp} backend={args.backend}:",
            [round(step[0]["loss"], 6) for step in history],
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
