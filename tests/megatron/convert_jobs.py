"""Helpers and rank-side jobs for the conversion tests: tiny HF models of each family, and Megatron
logits at any TP/PP from a converted checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from runner import needs_fresh_process

COMMON = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}


def make_tiny_hf(
    family: str, path: Path, seed: int = 0, max_shard_size: str | None = None, **overrides
) -> Path:
    """Save a randomly initialised tiny HF model of ``family`` (llama tied, qwen2 biases, qwen3 qk-norm)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = {**COMMON, **overrides}
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=100000.0))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=False, rope_theta=10000.0))
        with torch.no_grad():  # random biases (HF initialises them to zero, which would hide mapping bugs)
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=16, tie_word_embeddings=False))
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1, 0.2)
                layer.self_attn.k_norm.weight.normal_(1, 0.2)
    else:
        raise ValueError(family)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return path


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """Full-vocabulary logits ``[b, s, V]`` on global rank 0 (None elsewhere); PP via explicit send/recv."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234)  # forward uses megatron's RNG tracker (CPU-routed by the shim)
    model.eval()
    b, s = tokens.shape
    pos = torch.arange(s).expand(b, s)
    hidden_shape = (s, b, model.config.hidden_size)
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            recv = torch.empty(hidden_shape, dtype=model.config.params_dtype)
            dist.recv(recv, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(recv)
        out = model(input_ids=tokens, position_ids=pos, attention_mask=None)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            result = None
        else:
            tp = ps.get_tensor_model_parallel_world_size()
            if tp > 1:
                parts = [torch.empty_like(out) for _ in range(tp)]
                dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
                out = torch.cat(parts, dim=-1)
            result = out[..., :vocab].float().contiguous()
    # hand the last stage's logits to global rank 0
    last = dist.get_world_size() - 1
    if last != 0:
        buf = torch.empty(b, s, vocab)
        if (
            dist.get_rank() == last
            and ps.get_tensor_model_parallel_rank() == ps.get_tensor_model_parallel_world_size() - 1
        ):
            dist.send(result, dst=0)
        if dist.get_rank() == 0:
            dist.recv(buf, src=last)
            result = buf
    return result if dist.get_rank() == 0 else None


def import_and_logits_job(
    rank: int, world: int, hf_dir: str, ckpt: str, tp: int, pp: int, tokens: torch.Tensor, dms: dict | None
) -> Any:
    from dms_megatron.config import DMSConfig
    from dms_megatron.convert.checkpoint import import_hf, load_stage, read_meta

    cfg = None if dms is None else DMSConfig(**dms)
    import_hf(hf_dir, ckpt, tp, pp, cfg, torch.float32, force=True, progress=False)
    model, _ = load_stage(ckpt, tp, pp)
    return megatron_logits(model, tokens, read_meta(ckpt)["arch"]["vocab_size"])


def load_and_logits_job(rank: int, world: int, ckpt: str, tp: int, pp: int, tokens: torch.Tensor) -> Any:
    from dms_megatron.convert.checkpoint import load_stage, read_meta

    model, _ = load_stage(ckpt, tp, pp)
    return megatron_logits(model, tokens, read_meta(ckpt)["arch"]["vocab_size"])


def export_job(rank: int, world: int, ckpt: str, out: str, tp: int, pp: int) -> None:
    from dms_megatron.convert.checkpoint import export_hf

    export_hf(ckpt, out, tp, pp, force=True, progress=False)


def import_job(
    rank: int, world: int, hf_dir: str, ckpt: str, tp: int, pp: int, dms: dict | None, force: bool
) -> None:
    from dms_megatron.config import DMSConfig
    from dms_megatron.convert.checkpoint import import_hf

    import_hf(
        hf_dir,
        ckpt,
        tp,
        pp,
        None if dms is None else DMSConfig(**dms),
        torch.float32,
        force=force,
        progress=False,
    )


@needs_fresh_process  # replaces dist_checkpointing.save for good
def interrupted_import_job(rank: int, world: int, hf_dir: str, ckpt: str) -> None:
    """Import whose checkpoint save dies half-way (after writing a file), as a killed job would."""
    from megatron.core import dist_checkpointing

    from dms_megatron.convert.checkpoint import import_hf

    def dying_save(state_dict, directory, *args, **kwargs):
        (Path(directory) / f"__{rank}_0.distcp").write_bytes(b"partial")
        raise RuntimeError("simulated crash during checkpoint save")

    dist_checkpointing.save = dying_save
    import_hf(hf_dir, ckpt, world, 1, None, torch.float32, force=False, progress=False)


@needs_fresh_process  # replaces hf_io.write_shard for good
def interrupted_export_job(rank: int, world: int, ckpt: str, out: str) -> None:
    """Export that dies after the first shard file was written."""
    from dms_megatron.convert import checkpoint, hf_io

    real = hf_io.write_shard

    def dying_write(path, tensors):
        real(path, tensors)
        raise RuntimeError("simulated crash during export")

    checkpoint.hf_io.write_shard = dying_write
    checkpoint.export_hf(ckpt, out, 1, world, force=False, progress=False)


def norm_layout_job(rank: int, world: int) -> dict[str, Any]:
    """Build a debug Qwen3 stage (q/k norms) at TP=world with and without SP; every norm's class,
    weight dtype and ``sequence_parallel`` tag."""
    from dms_megatron.convert.checkpoint import _init_parallel
    from dms_megatron.families import load_model_preset
    from dms_megatron.megatron.families import build_gpt_stage, layer_spec, transformer_config
    from dms_megatron.megatron.patches.cpu_convert import cpu_megatron

    arch, _ = load_model_preset("debug_qwen3")
    _init_parallel(world, 1)
    out: dict[str, Any] = {}
    for key, sp in (("sp", True), ("plain", False)):
        config = transformer_config(arch, world, 1, sequence_parallel=sp)
        with cpu_megatron():
            model = build_gpt_stage(arch, config, layer_spec(arch))
        out[key] = {
            name: (type(m).__name__, str(m.weight.dtype), bool(getattr(m.weight, "sequence_parallel", False)))
            for name, m in model.named_modules()
            if "layernorm" in name and hasattr(m, "weight")  # not the IdentityOp slots
        }
    return out
