"""Training batches: megatron's GPT datasets (blends, packing) -> per-step micro-batches -> packed (THD)
model inputs whose document boundaries the DMS attention, the one-token shift, the losses and the
compression statistics all honour.

Sampling is a pure function of the step: global batch ``step`` is samples ``[step * G, (step + 1) * G)``
of the (shuffled, blended) dataset; data-parallel rank ``r`` takes the ``r``-th contiguous slice of
``G / dp`` samples, cut into micro-batches. Resuming at step ``k`` therefore reads exactly what an
uninterrupted run reads, without saving a data-loader state.

Packing: a micro-batch of ``b`` sequences of length ``s`` (each already a concatenation of documents,
EOS-terminated) becomes one THD sequence of ``b * s`` tokens with ``cu_seqlens`` at every document
start and every sequence start, and positions restarted per document.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dms_megatron.kernels.split_attention import with_host_copy

log = logging.getLogger(__name__)


class _TokenIds:
    """What megatron's GPT dataset reads from a tokenizer (it never tokenises: data is pre-tokenised)."""

    def __init__(self, vocab_size: int, eod: int) -> None:
        self.vocab_size, self.eod = vocab_size, eod
        # megatron hashes this into the dataset's cache key
        self.unique_identifiers = {"class": "dms_megatron.TokenIds", "vocab_size": vocab_size, "eod": eod}


def build_gpt_dataset(
    prefixes: list[str],
    weights: list[float] | None,
    seq_length: int,
    num_samples: int,
    seed: int,
    vocab_size: int,
    eos_token_id: int,
    cache_dir: str | Path,
) -> Any:
    """Megatron's (blended) GPT dataset with ``num_samples`` training sequences of ``seq_length``.

    Build it on every rank (megatron builds the index caches on rank 0 first, then the others read them).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if not prefixes:
        raise ValueError("data.prefixes is empty: preprocess text with launch/preprocess.py first")

    def build(blend_weights: list[float] | None) -> Any:
        config = GPTDatasetConfig(
            random_seed=seed,
            sequence_length=seq_length,
            blend=([str(p) for p in prefixes], blend_weights),
            split="100,0,0",
            path_to_cache=str(Path(cache_dir) / data_fingerprint(prefixes)),
            tokenizer=_TokenIds(vocab_size, eos_token_id),
            reset_position_ids=True,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
        )
        builder = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config)
        return builder.build()[0]

    train = build(None if weights is None else [float(w) for w in weights])
    if weights is None and len(prefixes) > 1 and (train is None or len(train) < num_samples):
        # unweighted, megatron blends one epoch of each dataset; when that is too few samples, weights by
        # size (the same mixture) make each dataset repeat over as many epochs as needed
        sizes = [_token_count(p) for p in prefixes]
        log.info(
            "%d samples need more than one epoch of %s: blended by size %s", num_samples, prefixes, sizes
        )
        train = build([float(n) for n in sizes])
    if train is None or len(train) < num_samples:
        got = 0 if train is None else len(train)
        raise ValueError(f"the dataset gives {got} samples, {num_samples} needed")
    return train


def _token_count(prefix: str | Path) -> int:
    """Tokens in a megatron indexed dataset (``prefix``.bin / .idx)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))  # held while summing: its lengths are a view of its mmap
    return int(dataset.sequence_lengths.sum())


def data_fingerprint(prefixes: list[str]) -> str:
    """Short hash of the datasets' files (sizes and modification times): megatron keys its index cache
    on the prefix path only, so a dataset re-made under the same prefix must not reuse stale indices."""
    import hashlib

    h = hashlib.sha1()
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            st = os.stat(str(prefix) + suffix)
            h.update(f"{Path(prefix).resolve()}{suffix}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


@dataclass
class StepSlice:
    """Which samples of a global batch this data-parallel rank reads."""

    global_batch_size: int
    micro_batch_size: int
    dp_rank: int = 0
    dp_size: int = 1

    def __post_init__(self) -> None:
        if self.global_batch_size % (self.micro_batch_size * self.dp_size):
            raise ValueError(
                f"parallel.global_batch_size={self.global_batch_size} must be a multiple of "
                f"micro_batch_size x data-parallel size = {self.micro_batch_size} x {self.dp_size}"
            )

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def indices(self, step: int) -> list[list[int]]:
        """Sample indices of each of this rank's micro-batches at ``step``."""
        per_rank = self.global_batch_size // self.dp_size
        start = step * self.global_batch_size + self.dp_rank * per_rank
        b = self.micro_batch_size
        return [list(range(start + i * b, start + (i + 1) * b)) for i in range(self.num_microbatches)]


def step_micro_batches(dataset: Any, slicer: StepSlice, step: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of ``step``: ``tokens``, ``position_ids`` ``[b, s]`` (int64)."""
    out = []
    for idx in slicer.indices(step):
        samples = [dataset[i] for i in idx]
        out.append(
            {
                "tokens": torch.stack([s["tokens"] for s in samples]),
                "position_ids": torch.stack([s["position_ids"] for s in samples]),
            }
        )
    return out


def doc_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``[b, s]``: True where a document starts (position 0, and each sequence's first token)."""
    starts = position_ids == 0
    starts[:, 0] = True
    return starts


def pack_thd(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, Any]:
    """``[b, s]`` micro-batch -> one packed THD sequence: ``input_ids``/``position_ids`` ``[1, b*s]``,
    ``packed_seq_params`` (megatron ``PackedSeqParams``), ``samples`` = b, ``valid`` ``[1, b*s]``."""
    from megatron.core.packed_seq_params import PackedSeqParams

    tokens, pos = batch["tokens"], batch["position_ids"]
    b, s = tokens.shape
    starts = doc_starts(pos).reshape(-1)
    cu = torch.cat([starts.nonzero().reshape(-1), torch.tensor([b * s])]).to(torch.int32)
    lengths = cu[1:] - cu[:-1]
    flat_pos = torch.arange(b * s) - torch.repeat_interleave(cu[:-1].long(), lengths.long())
    doc_ids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths.long())
    cu = cu.to(device)
    max_len = int(lengths.max())
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len
    )
    # built here on the host, so the attention layers need no device sync to derive them
    # with the host copy, from which the split attention lays out its document runs without a sync
    params._dms_doc_ids = with_host_copy(doc_ids, device)
    params._dms_positions = flat_pos.to(device)
    return {
        "input_ids": tokens.reshape(1, -1).to(device),
        "position_ids": flat_pos.reshape(1, -1).to(device),
        "packed_seq_params": params,
        "samples": b,
        "valid": torch.ones(1, b * s, dtype=torch.bool, device=device),
    }
