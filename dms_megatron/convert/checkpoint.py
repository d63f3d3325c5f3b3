"""HF safetensors <-> Megatron distributed checkpoints, at any TP/PP, tensor by tensor.

Both directions run on every rank of a ``tp * pp`` process group (``torch.distributed`` initialised;
``launch/convert.py`` starts the processes). Each rank builds only its own pipeline stage and reads
from the HF files only the tensors its stage needs, one full tensor at a time, so host memory per
process stays near one stage's shard plus one full tensor: a 32B model never needs 64 GB in one
process.

Layout of a Megatron checkpoint written here::

    DIR/dms_megatron.json      architecture, DMS config, source, versions (what export needs)
    DIR/<torch_dist files>     megatron dist_checkpointing (reshardable to any TP/PP)

Outputs are staged in ``.<name>.partial`` and renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dms_megatron.config import DMSConfig
from dms_megatron.convert import hf_io
from dms_megatron.convert.file_records import check_files, record_files
from dms_megatron.convert.mapping import (
    hf_names,
    hf_shapes,
    hf_to_mcore_tensor,
    mcore_names,
    mcore_to_hf_tensors,
)
from dms_megatron.families import ModelArch, arch_from_hf_config
from dms_megatron.hf import install_remote_code
from dms_megatron.runtime import package_versions

log = logging.getLogger(__name__)
META = "dms_megatron.json"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _versions() -> dict[str, str]:
    return package_versions(("megatron-core", "transformers", "safetensors", "dms_megatron"))


def _init_parallel(tp: int, pp: int) -> None:
    from megatron.core import parallel_state

    if not dist.is_initialized():
        raise RuntimeError(
            "conversion must run inside an initialised torch.distributed group (launch/convert.py)"
        )
    if dist.get_world_size() != tp * pp:
        raise ValueError(
            f"conversion at tp={tp}, pp={pp} needs {tp * pp} processes, got {dist.get_world_size()}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def build_stage(
    arch: ModelArch, tp: int, pp: int, dms: DMSConfig | None, dtype: torch.dtype
) -> torch.nn.Module:
    """Initialise parallel state and build this rank's stage (CPU init: shards of one master)."""
    from dms_megatron.megatron.families import build_gpt_stage, layer_spec, transformer_config
    from dms_megatron.megatron.patches.cpu_convert import cpu_megatron

    _init_parallel(tp, pp)
    config = transformer_config(arch, tp, pp, params_dtype=dtype, pipeline_dtype=dtype)
    with cpu_megatron():
        return build_gpt_stage(arch, config, layer_spec(arch, dms))


def _layer_offset(model: torch.nn.Module) -> int:
    layers = getattr(model.decoder, "layers", [])
    return int(layers[0].layer_number) - 1 if len(layers) else 0


def global_name(local: str, offset: int) -> str:
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", local, count=1)


def _tp_layout(param: torch.Tensor) -> tuple[int, int] | None:
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim), int(getattr(param, "partition_stride", 1))
    return None


def shard(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """This rank's TP shard: the full tensor split into ``stride * world`` chunks, chunks rank::world."""
    chunks = full.chunk(stride * world, dim=dim)
    return torch.cat([chunks[s * world + rank] for s in range(stride)], dim=dim)


def unshard(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([pieces[r][s] for s in range(stride) for r in range(len(shards))], dim=dim)


def _source_name(name: str, arch: ModelArch) -> str:
    # tied embeddings under PP: the last stage holds a copy of the embedding as output_layer.weight
    return (
        "embedding.word_embeddings.weight"
        if name == "output_layer.weight" and arch.tie_word_embeddings
        else name
    )


def _pad_vocab(name: str, full: torch.Tensor, rows: int) -> torch.Tensor:
    if name in ("embedding.word_embeddings.weight", "output_layer.weight") and full.shape[0] < rows:
        return torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
    return full


def check_hf_tensors(reader: hf_io.HFReader, arch: ModelArch, adapter: bool) -> bool:
    """Validate names and shapes of an HF folder. Returns whether it carries DMS adapter weights."""
    have = set(reader.names())
    base = set(hf_names(arch, adapter=False))
    with_adapter = set(hf_names(arch, adapter=True)) - base
    has_adapter = bool(with_adapter & have)
    if has_adapter and not with_adapter <= have:
        missing = sorted(with_adapter - have)
        raise ValueError(
            f"incomplete DMS adapter weights: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    want = base | (with_adapter if has_adapter else set())
    missing = sorted(want - have)
    extra = sorted(have - want - ({"lm_head.weight"} if arch.tie_word_embeddings else set()))
    if missing or extra:
        raise ValueError(
            f"{reader.path}: tensor names do not match {arch.architecture} ({arch.num_layers} layers): "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            f"unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''}"
        )
    emb = reader.shape("model.embed_tokens.weight")
    if emb != (arch.vocab_size, arch.hidden_size):
        raise ValueError(
            f"model.embed_tokens.weight has shape {emb} but config.json says vocab_size="
            f"{arch.vocab_size}, hidden_size={arch.hidden_size} (vocabulary mismatch)"
        )
    expected = hf_shapes(arch, has_adapter)
    wrong = [f"{n}: {reader.shape(n)} (expected {s})" for n, s in expected.items() if reader.shape(n) != s]
    if wrong:
        raise ValueError(f"{len(wrong)} tensors have unexpected shapes: " + "; ".join(wrong[:6]))
    return has_adapter


def _checked_source(
    hf_dir: str | Path, tp: int, pp: int, dms: DMSConfig | None
) -> tuple[hf_io.HFReader, ModelArch, bool]:
    """Open an HF folder and validate it for an import at ``tp`` x ``pp`` (architecture, layout, tensor
    names and shapes). Returns the reader, the architecture and whether it carries adapter weights."""
    reader = hf_io.HFReader(hf_dir)
    arch = arch_from_hf_config(reader.config)
    arch.check_parallel(tp, pp)
    return reader, arch, check_hf_tensors(reader, arch, dms is not None and dms.variant == "adapter")


def check_import(
    hf_dir: str | Path, out_dir: str | Path, tp: int, pp: int, dms: DMSConfig | None, force: bool
) -> None:
    """Every check ``import_hf`` makes before building a model, without megatron or a process group:
    the CLI runs it before starting any rank, so bad input fails in a second."""
    reader, _, _ = _checked_source(hf_dir, tp, pp, dms)
    reader.close()
    hf_io.prepare_output(out_dir, force)


def import_hf(
    hf_dir: str | Path,
    out_dir: str | Path,
    tp: int = 1,
    pp: int = 1,
    dms: DMSConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """HF folder -> Megatron distributed checkpoint (call on every rank of a tp*pp group)."""
    from megatron.core import dist_checkpointing, parallel_state

    reader, arch, has_adapter = _checked_source(hf_dir, tp, pp, dms)
    final, staging = hf_io.prepare_output(out_dir, force)
    model = build_stage(arch, tp, pp, dms, dtype)
    rank, tp_rank = dist.get_rank(), parallel_state.get_tensor_model_parallel_rank()
    offset = _layer_offset(model)
    params = list(model.named_parameters())
    bar = _progress(progress and rank == 0, len(params), "import")
    with torch.no_grad():
        for local, param in params:
            name = global_name(local, offset)
            if "self_attention.adapter." in name and not has_adapter:
                bar.advance()
                continue  # fresh adapter (zero-initialised projection): importing a base model
            full = hf_to_mcore_tensor(_source_name(name, arch), reader.get, arch, adapter=has_adapter)
            hf_io.check_finite(f"{_source_name(name, arch)} (imported from {hf_dir})", full)
            layout = _tp_layout(param)
            full_rows = param.shape[0] * (tp if layout and layout[0] == 0 else 1)
            full = _pad_vocab(name, full, full_rows)
            piece = full if layout is None else shard(full, layout[0], layout[1], tp_rank, tp)
            if piece.shape != param.shape:
                raise ValueError(
                    f"{name}: HF gives {tuple(full.shape)}, rank shard {tuple(param.shape)} expected"
                )
            param.copy_(piece.to(param.dtype))
            bar.advance()
    bar.close()
    reader.close()
    if rank == 0:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    dist.barrier()
    from dms_megatron.megatron.patches.cpu_convert import cpu_megatron

    with cpu_megatron():
        dist_checkpointing.save(model.sharded_state_dict(), str(staging))
    dist.barrier()
    if rank == 0:
        meta = {
            "format": "dms_megatron/megatron-dist-checkpoint/v1",
            "arch": arch.to_dict(),
            "hf_config": reader.config,
            "dms": None if dms is None else asdict(dms),
            "source": {
                "hf_dir": str(Path(hf_dir).resolve()),
                "tp": tp,
                "pp": pp,
                "dtype": str(dtype),
                "files_sha256": {
                    f: hf_io.sha256_file(Path(hf_dir) / f) for f in sorted(set(reader.weight_map.values()))
                },
            },
            "versions": _versions(),
        }
        (staging / META).write_text(json.dumps(meta, indent=2) + "\n")
        record_files(staging)
        hf_io.publish(staging, final)
        log.info("imported %s -> %s (tp=%d, pp=%d)", hf_dir, final, tp, pp)
    dist.barrier()
    return final


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / META
    if not path.is_file():
        raise ValueError(f"{ckpt_dir} is not a dms_megatron checkpoint (no {META})")
    return json.loads(path.read_text())


def load_stage(
    ckpt_dir: str | Path, tp: int, pp: int, dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, dict]:
    """Build this rank's stage at (tp, pp) and load a checkpoint saved at any layout."""
    from megatron.core import dist_checkpointing

    meta = read_meta(ckpt_dir)
    check_files(ckpt_dir)  # before torch unpickles anything in it
    arch = ModelArch(**meta["arch"])
    dms = None if meta["dms"] is None else DMSConfig(**meta["dms"])
    dtype = dtype or getattr(torch, meta["source"]["dtype"].replace("torch.", ""))
    model = build_stage(arch, tp, pp, dms, dtype)
    from dms_megatron.megatron.patches.cpu_convert import cpu_megatron

    with cpu_megatron():
        state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt_dir))
    model.load_state_dict(state, strict=False)
    return model, meta


def export_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    tp: int = 1,
    pp: int = 1,
    tokenizer_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Megatron checkpoint -> HF safetensors shards (one per PP stage) + index + config + tokenizer."""
    from megatron.core import parallel_state

    final, staging = hf_io.prepare_output(out_dir, force)
    model, meta = load_stage(ckpt_dir, tp, pp)
    arch = ModelArch(**meta["arch"])
    dms = meta["dms"]
    if dms is not None:
        DMSConfig(**dms).exported_block()  # fail before any work if the block cannot be written
    adapter = dms is not None and dms["variant"] == "adapter"
    rank = dist.get_rank()
    tp_rank, tp_group = (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_group(),
    )
    stage = parallel_state.get_pipeline_model_parallel_rank()
    offset = _layer_offset(model)
    if rank == 0:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    dist.barrier()
    tensors: dict[str, torch.Tensor] = {}
    # one dtype for the whole export (HF convention): the checkpoint's; megatron keeps some params
    # (e.g. the local spec's norms) in fp32 whatever params_dtype says
    out_dtype = getattr(torch, meta["source"]["dtype"].replace("torch.", ""))
    params = list(model.named_parameters())
    bar = _progress(progress and rank == 0, len(params), "export")
    for local, param in params:
        name = global_name(local, offset)
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            bar.advance()
            continue  # tied: the embedding is the output layer
        full = param.detach()
        layout = _tp_layout(param)
        if layout is not None and tp > 1:
            parts = [torch.empty_like(full) for _ in range(tp)]
            dist.all_gather(parts, full.contiguous(), group=tp_group)
            full = unshard(parts, layout[0], layout[1])
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            full = full[: arch.vocab_size]
        for hf_name, t in mcore_to_hf_tensors(name, full, arch, adapter=adapter):
            hf_io.check_finite(hf_name, t)  # a diverged run exports nothing
            tensors[hf_name] = t.to(out_dtype).clone()
        bar.advance()
    bar.close()
    shard_name = f"model-{stage + 1:05d}-of-{pp:05d}.safetensors"
    if tp_rank == 0:
        hf_io.write_shard(staging / shard_name, tensors)
        (staging / f".{shard_name}.names.json").write_text(json.dumps(sorted(tensors)))
    dist.barrier()
    if rank == 0:
        _finish_export(staging, final, meta, arch, pp, tokenizer_dir, ckpt_dir)
    dist.barrier()
    return final


def _finish_export(
    staging: Path, final: Path, meta: dict, arch: ModelArch, pp: int, tokenizer_dir, ckpt_dir
) -> None:
    weight_map, total = {}, 0
    shards = [f"model-{s + 1:05d}-of-{pp:05d}.safetensors" for s in range(pp)]
    for shard_name in shards:
        names_file = staging / f".{shard_name}.names.json"
        for n in json.loads(names_file.read_text()):
            weight_map[n] = shard_name
        names_file.unlink()
        total += (staging / shard_name).stat().st_size
    want = set(hf_names(arch, adapter=meta["dms"] is not None and meta["dms"]["variant"] == "adapter"))
    if set(weight_map) != want:
        raise RuntimeError(f"export produced {len(weight_map)} tensors, expected {len(want)}")
    hf_io.write_index(staging, weight_map, total)
    config = dict(meta["hf_config"])
    config.pop("quantization_config", None)
    config["torch_dtype"] = meta["source"]["dtype"].replace("torch.", "")
    if meta["dms"] is not None:  # the one schema of the block: core.dms_rules.DMSBlock
        config["dms"] = DMSConfig(**meta["dms"]).exported_block(meta.get("trained_cr")).to_dict()
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if meta["dms"] is not None:  # transformers loading: modeling_dms.py + auto_map (docs/inference.md)
        install_remote_code(staging)
    hf_dir = meta["source"].get("hf_dir")
    tok_src = Path(tokenizer_dir) if tokenizer_dir else (Path(hf_dir) if hf_dir else None)
    copied = hf_io.copy_tokenizer_files(tok_src, staging) if tok_src is not None and tok_src.is_dir() else []
    manifest = {
        "source_checkpoint": str(Path(ckpt_dir).resolve()),
        "tokenizer_from": str(tok_src) if copied else None,
        "tokenizer_files": copied,
        "shards": {s: hf_io.sha256_file(staging / s) for s in shards},
        "versions": _versions(),
    }
    (staging / hf_io.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    hf_io.publish(staging, final)
    log.info("exported %s -> %s", ckpt_dir, final)


class _NullBar:
    def advance(self) -> None:
        pass

    def close(self) -> None:
        pass


class _RichBar:
    def __init__(self, total: int, label: str) -> None:
        from rich.progress import Progress

        self._p = Progress(transient=False)
        self._p.start()
        self._task = self._p.add_task(label, total=total)

    def advance(self) -> None:
        self._p.advance(self._task)

    def close(self) -> None:
        self._p.stop()


def _progress(enabled: bool, total: int, label: str) -> _NullBar | _RichBar:
    return _RichBar(total, label) if enabled else _NullBar()


__all__ = ["check_import", "export_hf", "import_hf", "load_stage", "mcore_names", "read_meta"]
