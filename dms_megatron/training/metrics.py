"""Run observability: FLOP accounting, a JSONL metrics file, a lazy W&B sink, a console line, the
eviction-rate heatmap and the CR plot. Only the logging rank (the last pipeline stage's rank 0)
creates a ``MetricsLogger``; the others log nothing.

Metric names (shared by JSONL and W&B): ``loss/kd``, ``loss/compression``, ``cr/target`` (the memory
CR aimed at, at ``dms.cr_context`` tokens), ``cr/memory`` (the memory CR this step's decisions give at
that length: tokens seen / tokens held over all layers and KV heads, the always-kept window included),
``cr/memory_train_len`` (the same at the training sequence length), ``cr/decision_rate`` and
``cr/decision_target`` (diagnostics: 1 / kept fraction of decisions, reached and asked for), ``lr``,
``grad_norm``, ``throughput/tokens_per_s``, ``throughput/tflops_per_gpu``, ``throughput/mfu``,
``memory/max_allocated_gb`` (and, from the step loop, ``memory/max_allocated_gb_any_rank``). The
memory CRs are computed from the step's eviction rate with ``core.losses.memory_cr`` (exact for the
total when decisions do not depend on position); the KV memory
a served model really holds is measured by ``launch/evaluate.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dms_megatron.config import DMSConfig
from dms_megatron.core.losses import memory_cr
from dms_megatron.families import ModelArch

H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, dense bf16 tensor core peak


def forward_flops_per_token(arch: ModelArch, seq_len: int) -> float:
    """Matmul FLOPs of one forward pass per token (2 per multiply-add), causal attention averaged
    over positions, output layer included."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    projections = h * q + 2 * h * kv + q * h  # q, k, v, o
    mlp = 3 * h * f  # gate, up, down
    attention = 2 * q * (seq_len + 1) / 2  # QK^T and PV over (s+1)/2 keys on average
    per_layer = 2 * (projections + mlp + attention)
    return arch.num_layers * per_layer + 2 * h * arch.vocab_size


def retrofit_flops_per_token(arch: ModelArch, seq_len: int) -> float:
    """A DMS distillation step: student forward + backward (3x forward) plus teacher forward (1x)."""
    return 4 * forward_flops_per_token(arch, seq_len)


def cr_metrics(decision_cr: float, decision_target: float, target_cr: float, dms: DMSConfig, seq_len: int):
    """The ``cr/*`` metrics of one step (module docstring) from its decision-rate CR."""
    context = dms.cr_context or seq_len
    return {
        "cr/target": target_cr,
        "cr/memory": memory_cr(decision_cr, context, dms.window),
        "cr/memory_train_len": memory_cr(decision_cr, seq_len, dms.window),
        "cr/decision_rate": decision_cr,
        "cr/decision_target": decision_target,
    }


@dataclass
class Throughput:
    tokens_per_s: float
    tflops_per_gpu: float
    mfu: float


def throughput(
    tokens: int,
    seconds: float,
    flops_per_token: float,
    num_gpus: int,
    peak_tflops: float = H100_BF16_DENSE_TFLOPS,
) -> Throughput:
    tps = tokens / max(seconds, 1e-12)
    tflops = tps * flops_per_token / max(num_gpus, 1) / 1e12
    return Throughput(tps, tflops, tflops / peak_tflops)


class MetricsLogger:
    """JSONL always; W&B when ``wandb_project`` is set (imported lazily; ``WANDB_MODE=offline`` works)."""

    def __init__(
        self,
        run_dir: str | Path,
        wandb_project: str | None = None,
        run_name: str | None = None,
        group: str | None = None,
        config: Mapping[str, Any] | None = None,
        console: Any = True,
        resume_step: int | None = None,
    ) -> None:
        """``console``: True (own rich console), False, or a rich ``Console`` to share (progress bars).
        ``resume_step``: steps completed by the checkpoint resumed from; later records (an interrupted
        run's tail, redone after the resume) are dropped. Records are keyed by completed steps (1-based)."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 (closed in close())
        self._wandb = None
        self._console = None
        if console is True:
            from rich.console import Console

            self._console = Console()
        elif console:
            self._console = console
        if wandb_project:
            import wandb

            self._wandb = wandb.init(
                project=wandb_project,
                name=run_name,
                group=group,
                dir=str(self.run_dir),
                config=dict(config or {}),
            )

    def log(self, step: int, metrics: Mapping[str, float], rates: Any = None) -> None:
        """One step's scalars; ``rates`` (``[layers, kv_heads]`` eviction rates) adds the heatmap."""
        record = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            payload: dict[str, Any] = dict(metrics)
            if rates is not None:
                payload.update(self._wandb_rates(rates))
            self._wandb.log(payload, step=step)
        if self._console is not None:
            keys = ("loss/kd", "loss/compression", "cr/target", "cr/memory", "throughput/tokens_per_s")
            shown = "  ".join(f"{k.split('/')[-1]} {metrics[k]:.4g}" for k in keys if k in metrics)
            # soft_wrap: one line per step also when stdout is a file (a Slurm log), not 80-column wraps
            self._console.print(f"[bold]step {step}[/bold]  {shown}", soft_wrap=True)

    def _wandb_rates(self, rates: Any) -> dict[str, Any]:
        import numpy as np
        import wandb

        arr = np.asarray(rates, dtype=np.float32)
        image = (np.clip(arr, 0, 1) * 255).astype(np.uint8)  # rows: layers, columns: KV heads
        table = wandb.Table(
            columns=["layer", "kv_head", "eviction_rate"],
            data=[[i, j, float(arr[i, j])] for i in range(arr.shape[0]) for j in range(arr.shape[1])],
        )
        return {
            "eviction/heatmap": wandb.Image(image, caption="eviction rate: layers x KV heads"),
            "eviction/table": table,
        }

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_cr_curve(metrics_path: str | Path, out_png: str | Path) -> Path:
    """PNG of target vs achieved CR (and the KD loss) over steps, from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if "cr/target" in r]
    if not rows:
        raise ValueError(f"{metrics_path} has no cr/target records to plot")
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["cr/target"] for r in rows], label="target CR", color="black", linestyle="--")
    if all("cr/memory" in r for r in rows):
        ax.plot(steps, [r["cr/memory"] for r in rows], label="memory CR (at the target's context)")
    if all("cr/memory_train_len" in r for r in rows):
        ax.plot(steps, [r["cr/memory_train_len"] for r in rows], label="memory CR (training length)")
    if all("cr/decision_rate" in r for r in rows):
        ax.plot(steps, [r["cr/decision_rate"] for r in rows], label="decision rate", alpha=0.5, linestyle=":")
    ax.set_xlabel("step")
    ax.set_ylabel("compression ratio (target: memory CR)")
    if all("loss/kd" in r for r in rows):
        ax2 = ax.twinx()
        ax2.plot(steps, [r["loss/kd"] for r in rows], color="tab:red", alpha=0.5, label="KD loss")
        ax2.set_ylabel("KD loss")
        ax2.legend(loc="lower right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
