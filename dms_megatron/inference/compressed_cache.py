"""The compressed KV cache of the batched (GPU) engine: tensors only, no per-token Python.

Each (sequence row, layer, KV head) stream holds

* a **window ring** of ``W = window + 1`` slots (slot = position % W) with the most recent tokens and
  their eviction flags (a token is flagged when its successor decides "evict"); every ring token is
  visible to the next query, flagged or not (delayed eviction);
* a **paged store** of the older tokens that were kept: when a token leaves the ring it is either
  dropped (flagged: its ring slot is simply reused) or appended to the stream's pages. Pages are blocks
  of ``block_size`` slots in one pool shared by all rows, layers and heads (``block_table[layer, row,
  head]`` lists a stream's blocks); rows that finish give their blocks back.

Held tokens per stream = pages + ``min(seen, W)``: exactly the last ``window + 1`` tokens plus every
older token not evicted (docs/dms.md section 7). Without a ``dms`` block (the original model) the
window is 0 and nothing is flagged, so every token is paged: the dense baseline in the same engine.

Allocation never happens inside a step: ``reserve()`` keeps a block ready for each stream's next page
slot (host-side free list, one small device->host copy per step), so a decode step writes the retiring
token into that slot unconditionally and advances the page length only for kept tokens.
"""

from __future__ import annotations

import math

import torch

from dms_megatron.core.dms_rules import evicts, visible
from dms_megatron.inference.model import DMSCausalLM
from dms_megatron.inference.paged_cache import CacheFullError
from dms_megatron.kernels import dms_attention
from dms_megatron.kernels.paged_decode import (
    decode_head_dims_ok,
    merge_attention,
    paged_decode_attention,
    pick_backend,
)


def kv_bytes(model: DMSCausalLM, block_size: int) -> tuple[int, int]:
    """``(bytes of one pool block (K and V), bytes of one row's window rings and flags)`` for ``model``
    in its dtype: what a KV memory budget is spent on."""
    a, elem = model.arch, torch.empty(0, dtype=model.dtype).element_size()
    streams, w = a.num_layers * model.hkv, model.window + 1
    return 2 * block_size * model.d * elem, streams * w * (2 * model.d * elem + 1)


def decode_backend(device: torch.device, block_size: int, head_dim: int, backend: str = "auto") -> str:
    """The decode path a cache on ``device`` runs for ``backend``: ``auto`` is the fused step (pages and
    window ring in one kernel; 3.61 vs 10.05 ms a CUDA-graph step against the split path at 8K, batch 32,
    on an H100, docs/benchmarks.md) on CUDA where its kernel takes the head dim (a power of two >= 16),
    else ``kernels.paged_decode.pick_backend``'s choice."""
    if backend == "auto" and device.type == "cuda" and decode_head_dims_ok(head_dim, head_dim):
        return "fused"
    return pick_backend(device, block_size, backend)


class CompressedKV:
    """Rows of sequences against shared K/V block pools; see the module docstring."""

    def __init__(
        self,
        model: DMSCausalLM,
        num_blocks: int,
        block_size: int = 16,
        max_context: int | None = None,
        backend: str = "auto",
        cuda_graphs: bool = True,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        a = model.arch
        self.model, self.backend = model, backend
        self.fused = decode_backend(model.device, block_size, model.d, backend) == "fused"
        self.L, self.H, self.D, self.g = a.num_layers, model.hkv, model.d, model.hq // model.hkv
        self.W = model.window + 1
        self.bs = block_size
        max_context = max_context or a.max_position_embeddings
        self.max_blocks = math.ceil(max_context / block_size) + 1
        dev, dt = model.device, model.dtype
        self.k_pool = torch.zeros(num_blocks, block_size, self.D, device=dev, dtype=dt)
        self.v_pool = torch.zeros_like(self.k_pool)
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.rows = 0
        self.ring_k = torch.zeros(self.L, 0, self.H, self.W, self.D, device=dev, dtype=dt)
        self.ring_v = torch.zeros_like(self.ring_k)
        self.ring_flag = torch.zeros(self.L, 0, self.H, self.W, device=dev, dtype=torch.bool)
        self.table = torch.full((self.L, 0, self.H, self.max_blocks), -1, device=dev, dtype=torch.int32)
        self.paged = torch.zeros(self.L, 0, self.H, device=dev, dtype=torch.int32)
        self.seen = torch.zeros(0, device=dev, dtype=torch.long)
        # decode steps replayed as CUDA graphs, one per batch size; any change of rows reallocates the
        # state tensors, so it drops them (the first step at a new size runs eagerly: the warm-up)
        self.cuda_graphs = cuda_graphs and dev.type == "cuda"
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._warm: set[int] = set()

    # ---- rows -------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.k_pool.shape[0]

    def add_row(self) -> int:
        """A new empty sequence; returns its row index (rows are renumbered by ``remove_rows``)."""
        L, H, dev = self.L, self.H, self.seen.device
        self._drop_graphs()
        self.ring_k = torch.cat([self.ring_k, self.ring_k.new_zeros(L, 1, H, self.W, self.D)], 1)
        self.ring_v = torch.cat([self.ring_v, self.ring_v.new_zeros(L, 1, H, self.W, self.D)], 1)
        self.ring_flag = torch.cat([self.ring_flag, self.ring_flag.new_zeros(L, 1, H, self.W)], 1)
        self.table = torch.cat([self.table, self.table.new_full((L, 1, H, self.max_blocks), -1)], 1)
        self.paged = torch.cat([self.paged, self.paged.new_zeros(L, 1, H)], 1)
        self.seen = torch.cat([self.seen, torch.zeros(1, device=dev, dtype=torch.long)])
        self.rows += 1
        try:
            self.reserve([self.rows - 1])
        except CacheFullError:
            self.remove_rows([self.rows - 1])
            raise
        return self.rows - 1

    def remove_rows(self, rows: list[int]) -> None:
        """Give the rows' blocks back to the pool and drop the rows (later rows move down)."""
        if not rows:
            return
        self._drop_graphs()
        gone = torch.tensor(sorted(set(rows)), device=self.seen.device)
        blocks = self.table[:, gone]
        self.free.extend(blocks[blocks >= 0].tolist())
        keep = torch.tensor([r for r in range(self.rows) if r not in set(rows)], device=gone.device).long()
        self.ring_k, self.ring_v = self.ring_k[:, keep], self.ring_v[:, keep]
        self.ring_flag, self.table, self.paged = (
            self.ring_flag[:, keep],
            self.table[:, keep],
            self.paged[:, keep],
        )
        self.seen = self.seen[keep]
        self.rows = len(keep)

    def reserve(self, rows: list[int] | None = None) -> None:
        """Make sure every stream (of ``rows``, default all) has a block for its next page slot.
        Raises ``CacheFullError`` (nothing allocated) with ``.rows`` = the rows that needed a block."""
        table, paged = (
            (self.table, self.paged) if rows is None else (self.table[:, rows], self.paged[:, rows])
        )
        nxt = (paged // self.bs).long()
        if nxt.numel() == 0:
            return
        if int(nxt.max()) >= self.max_blocks:
            raise ValueError(f"a stream outgrew max_context ({(self.max_blocks - 1) * self.bs} tokens)")
        need = table.gather(-1, nxt[..., None])[..., 0] < 0
        if not bool(need.any()):
            return
        where = need.nonzero()  # [n, 3] (layer, row-in-subset, head)
        if len(where) > len(self.free):
            err = CacheFullError(f"{len(where)} KV blocks needed, {len(self.free)} free of {self.num_blocks}")
            sub = sorted(set(where[:, 1].tolist()))
            err.rows = sub if rows is None else [rows[i] for i in sub]  # type: ignore[attr-defined]
            raise err
        ids = torch.tensor([self.free.pop() for _ in range(len(where))], dtype=torch.int32)
        layer, row, head = where.unbind(1)
        if rows is not None:
            row = torch.tensor(rows, device=row.device)[row]
        self.table[layer, row, head, nxt[where.unbind(1)]] = ids.to(self.table.device)

    # ---- accounting -------------------------------------------------------------------------------
    def held(self) -> torch.Tensor:
        """Tokens held per ``[layer, row, head]``."""
        return self.paged.long() + self.seen.clamp(max=self.W)[None, :, None]

    def allocated_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def row_blocks(self) -> torch.Tensor:
        """Pool blocks owned per row ``[rows]`` (including each stream's reserved next block)."""
        return (self.table >= 0).sum((0, 2, 3))

    # ---- decode -----------------------------------------------------------------------------------
    def _drop_graphs(self) -> None:
        self._graphs.clear()
        self._warm.clear()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row (``tokens [rows]``) -> next-token logits ``[rows, V]`` (valid until the
        next call). Call ``reserve()`` first (the engine does): a step allocates nothing on the host."""
        R = self.rows
        if not self.cuda_graphs:
            return self._decode(tokens)
        if R not in self._warm:  # eager first: compiles kernels, creates lazy state (RoPE tables, cuBLAS)
            self._warm.add(R)
            return self._decode(tokens)
        if R not in self._graphs:
            static = tokens.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._decode(static)
            self._graphs[R] = (graph, static, out)
        graph, static, out = self._graphs[R]
        static.copy_(tokens)
        graph.replay()
        return out

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        m, R, H, W, g = self.model, self.rows, self.H, self.W, self.g
        pos = self.seen
        h = m.w["model.embed_tokens.weight"][tokens]
        if self.fused:
            from dms_megatron.kernels.fused_decode import ring_paged_decode_attention
            from dms_megatron.kernels.ring_commit import commit_decode_token

            ring_len = (pos + 1).clamp(max=W).repeat_interleave(H).int()  # [R * H]: valid slots, a prefix
        else:  # the same for every layer: valid ring slots after the write; what _commit moves
            ring_valid = torch.arange(W, device=pos.device)[None] <= pos[:, None]  # [R, W]
            moves = self._moves()
        for layer in range(self.L):
            q, k, v, logits = m.attention_inputs(layer, h, pos, fused=self.fused)
            if self.fused:  # the cache update below as one kernel
                commit_decode_token(
                    k, v, logits, pos, self.ring_k[layer], self.ring_v[layer], self.ring_flag[layer],
                    self.table[layer], self.paged[layer], self.k_pool, self.v_pool,
                )  # fmt: skip
            else:
                self._commit(layer, k, v, logits, *moves)
            qs = q.view(R * H, g, self.D).to(self.k_pool.dtype)
            if self.fused:  # pages and ring in one kernel launch (its last program per stream merges)
                out = ring_paged_decode_attention(
                    qs, self.k_pool, self.v_pool, self.table[layer].view(R * H, -1),
                    self.paged[layer].view(-1), self.ring_k[layer].view(R * H, W, self.D),
                    self.ring_v[layer].view(R * H, W, -1), ring_len, out_dtype=h.dtype,
                ).view(R, H, g, -1)  # fmt: skip
            else:
                out = self._paged_and_ring(layer, q, qs, ring_valid)
            h = m.finish_layer(layer, h, out.reshape(R, -1).to(h.dtype), fused=self.fused)
        self.seen += 1
        return m.head(h, fused=self.fused)

    def _moves(self) -> tuple[torch.Tensor, ...]:
        """For the next decode step's ``_commit`` (the same for every layer): rows, each row's ring slot,
        its predecessor's slot, whether it has a predecessor, whether a token leaves the window."""
        pos, W = self.seen, self.W
        rows = torch.arange(self.rows, device=pos.device)
        return rows, pos % W, (pos - 1) % W, (pos >= 1)[:, None], (pos >= W)[:, None]

    def _commit(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, logits: torch.Tensor | None,
        rows: torch.Tensor, slot: torch.Tensor, prev: torch.Tensor, has_prev: torch.Tensor,
        leaving: torch.Tensor,
    ) -> None:  # fmt: skip
        """The new token (``k, v [R, H, D]``, decisions ``logits [R, H]``) enters each row's ring at
        ``slot``; the token it replaces leaves the window (the torch path of ``kernels.ring_commit``)."""
        flag = self.ring_flag[layer]
        if logits is not None:  # the new token's decision flags its predecessor
            flag[rows, :, prev] |= evicts(logits) & has_prev
        # the token leaving the window: kept -> next page slot (always reserved), flagged -> dropped
        kept = ~flag[rows, :, slot] & leaving  # [R, H]
        self._write_page(layer, self.ring_k[layer][rows, :, slot], self.ring_v[layer][rows, :, slot])
        self.paged[layer].add_(kept)  # in place: no copy back into the stacked tensor
        self.ring_k[layer][rows, :, slot] = k.to(self.ring_k.dtype)
        self.ring_v[layer][rows, :, slot] = v.to(self.ring_v.dtype)
        flag[rows, :, slot] = torch.zeros_like(kept)

    def _paged_and_ring(
        self, layer: int, q: torch.Tensor, qs: torch.Tensor, ring_valid: torch.Tensor
    ) -> torch.Tensor:
        """Attention over the pages (paged decode kernel) and the ring (torch), merged by log-sum-exp."""
        R, H, g = self.rows, self.H, self.g
        paged = paged_decode_attention(
            qs, self.k_pool, self.v_pool, self.table[layer].view(R * H, -1),
            self.paged[layer].view(-1), backend=self.backend,
        )  # fmt: skip
        scores = torch.einsum("rhgd,rhwd->rhgw", q.view(R, H, g, self.D).float(), self.ring_k[layer].float())
        scores = scores / math.sqrt(self.D)
        scores = scores.masked_fill(~ring_valid[:, None, None], -math.inf)
        lse = torch.logsumexp(scores, -1)
        ring = (torch.softmax(scores, -1) @ self.ring_v[layer].float(), lse)
        return merge_attention([(paged[0].view(R, H, g, -1), paged[1].view(R, H, g)), ring])

    def _write_page(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k, v [R, H, D]`` into each stream's next page slot (not yet counted as held)."""
        n = self.paged[layer].long()
        block = self.table[layer].gather(-1, (n // self.bs)[..., None])[..., 0].long()
        offset = n % self.bs
        self.k_pool[block, offset] = k.to(self.k_pool.dtype)
        self.v_pool[block, offset] = v.to(self.v_pool.dtype)

    # ---- prefill ----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, row: int, tokens: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Append one chunk ``tokens [n]`` to ``row`` with the exact delayed-eviction mask -> logits
        ``[n, V]`` (``last_only``: ``[1, V]``, the last token's). Works on an empty row and after
        decoding (multi-turn)."""
        m, H, W, n = self.model, self.H, self.W, tokens.shape[0]
        if n == 0:
            raise ValueError("no tokens to prefill")
        t0 = int(self.seen[row])
        dev = tokens.device
        pos = torch.arange(t0, t0 + n, device=dev)
        h = m.w["model.embed_tokens.weight"][tokens]
        seq_pos = torch.arange(t0 - W, t0 + n, device=dev)  # the ring's positions, then the chunk's
        ring_slot = seq_pos[:W] % W
        ring_ok = seq_pos[:W] >= 0
        for layer in range(self.L):
            q, k, v, logits = m.attention_inputs(layer, h, pos)
            dec = torch.zeros(n, H, dtype=torch.bool, device=dev) if logits is None else evicts(logits)
            flag = self.ring_flag[layer, row]  # [H, W]
            if t0 > 0:
                flag[:, (t0 - 1) % W] |= dec[0]
            seq_flag = torch.cat([flag[:, ring_slot], dec[1:].t(), dec.new_zeros(H, 1)], 1)  # [H, W + n]
            seq_k = torch.cat(
                [self.ring_k[layer, row][:, ring_slot], k.transpose(0, 1).to(self.ring_k.dtype)], 1
            )
            seq_v = torch.cat(
                [self.ring_v[layer, row][:, ring_slot], v.transpose(0, 1).to(self.ring_v.dtype)], 1
            )
            seq_ok = torch.cat([ring_ok, torch.ones(n, dtype=torch.bool, device=dev)])
            if t0 == 0:  # a fresh row: only this chunk's keys, in one fused attention call
                out = self._fresh_attention(q, seq_k[:, W:], seq_v[:, W:], None if logits is None else dec)
            else:
                out = self._chunk_attention(layer, row, q, seq_k, seq_v, seq_flag, seq_ok, pos, seq_pos)
            h = m.finish_layer(layer, h, out.permute(2, 0, 1, 3).reshape(n, -1).to(h.dtype))
            # commit: the first n of (ring + chunk) leave the window; kept ones are paged in order
            retire = seq_ok[:n][None] & ~seq_flag[:, :n]  # [H, n]
            self._append_pages(layer, row, retire, seq_k[:, :n], seq_v[:, :n])
            self.ring_k[layer, row][:, seq_pos[n:] % W] = seq_k[:, n:]
            self.ring_v[layer, row][:, seq_pos[n:] % W] = seq_v[:, n:]
            flag[:, seq_pos[n:] % W] = seq_flag[:, n:]
        self.seen[row] += n
        return m.head(h[-1:] if last_only else h)

    def _chunk_attention(
        self,
        layer: int,
        row: int,
        q: torch.Tensor,
        seq_k: torch.Tensor,
        seq_v: torch.Tensor,
        seq_flag: torch.Tensor,
        seq_ok: torch.Tensor,
        pos: torch.Tensor,
        seq_pos: torch.Tensor,
    ) -> torch.Tensor:
        """A chunk's queries over the row's pages, its ring and the chunk itself -> ``[H, g, n, Dv]``
        (fp32; the scores are materialised: a chunk after earlier tokens of the row)."""
        H, g, n = self.H, self.g, q.shape[0]
        # visibility of ring + chunk keys: causal, valid, and (inside the window or not flagged)
        age = pos[:, None] - seq_pos[None, :]  # [n, W + n]
        vis = seq_ok[None] & visible(age[None], seq_flag[:, None, :], self.W - 1)  # [H, n, W + n]
        pk, pv, pvis = self._gather_pages(layer, row)  # [H, P, D], [H, P]
        keys = torch.cat([pk, seq_k], 1).float()
        values = torch.cat([pv, seq_v], 1).float()
        vis = torch.cat([pvis[:, None, :].expand(H, n, -1), vis], 2)
        scores = torch.einsum("nhgd,hkd->hgnk", q.view(n, H, g, self.D).float(), keys) / math.sqrt(self.D)
        scores = scores.masked_fill(~vis[:, None], -math.inf)
        return torch.softmax(scores, -1) @ values[:, None]  # [H, g, n, Dv]

    def _fresh_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dec: torch.Tensor | None
    ) -> torch.Tensor:
        """The first chunk of a row (no pages, empty ring): delayed-eviction attention of the chunk over
        itself through the training attention's kernels (``kernels.dms_attention``: the fused Triton
        kernel on CUDA, the reference elsewhere), with the hard decisions ``dec [n, H]`` as an infinite
        log-keep bias (``None``: plain causal, the dense model) -> ``[H, g, n, Dv]``. Nothing of size
        ``n x n`` is materialised on CUDA. Inputs: fp32 on CPU and for fp32 models; a bf16 / fp16 model's
        own dtype on CUDA (the kernel accumulates in fp32, as in training; its fp32 path multiplies with
        IEEE fp32 dot products, several times slower than 16-bit tensor-core ones)."""
        H, g, n = self.H, self.g, q.shape[0]
        qh = q.reshape(n, H * g, self.D).transpose(0, 1)[None]  # [1, Hq, n, D]
        kh, vh = k[None], v[None]  # [1, H, n, D] in the cache's dtype
        backend = "reference"
        if qh.is_cuda:
            from dms_megatron.kernels import triton_dms

            backend = "triton" if triton_dms.supported(qh, vh) else "reference"
        half = backend == "triton" and q.dtype in (torch.bfloat16, torch.float16)
        dt = q.dtype if half else torch.float32  # the reference computes in its inputs' dtype
        qh, kh, vh = qh.to(dt), kh.to(dt), vh.to(dt)
        relaxed = None if dec is None else torch.where(dec.t(), math.inf, -math.inf)[None]  # [1, H, n]
        out = dms_attention(qh, kh, vh, relaxed, self.W - 1, 1.0 / math.sqrt(self.D), backend=backend)
        return out[0].view(H, g, n, -1)

    def prefill_chunked(self, row: int, tokens: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """``prefill`` in chunks of ``chunk`` tokens; the last token's logits ``[V]`` (no ``[n, V]`` kept)."""
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        for s in range(0, tokens.shape[0], chunk):
            logits = self.prefill(row, tokens[s : s + chunk], last_only=True)[-1]
        return logits

    def _gather_pages(self, layer: int, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.paged[layer, row].long()  # [H]
        width = int(n.max())
        idx = torch.arange(width, device=n.device)
        block = self.table[layer, row][:, idx // self.bs].long().clamp(min=0)  # [H, width]
        return self.k_pool[block, idx % self.bs], self.v_pool[block, idx % self.bs], idx[None] < n[:, None]

    def _append_pages(
        self, layer: int, row: int, keep: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Page the ``keep [H, n]`` tokens of ``k, v [H, n, D]`` in order, allocating blocks as needed."""
        start = self.paged[layer, row].long()  # [H]
        dest = start[:, None] + keep.long().cumsum(1) - 1  # [H, n]
        total = start + keep.sum(1)
        last = total // self.bs  # [H]: the block of the next free slot must exist too
        table = self.table[layer, row]  # [H, max_blocks] (a view: written in place)
        slots = torch.arange(self.max_blocks, device=table.device)
        need = (table < 0) & (slots[None] <= last[:, None])  # [H, max_blocks]
        top, count = torch.stack([last.max(), need.sum()]).tolist()  # one host sync per layer
        if top >= self.max_blocks:
            raise ValueError(f"a stream outgrew max_context ({(self.max_blocks - 1) * self.bs} tokens)")
        if count > len(self.free):
            err = CacheFullError(f"{count} KV blocks needed, {len(self.free)} free of {self.num_blocks}")
            err.rows = [row]  # type: ignore[attr-defined]
            raise err
        if count:  # head by head, blocks in order, each taking the next free block: one indexed write
            ids = self.free[-count:][::-1]
            del self.free[-count:]
            table[need] = torch.tensor(ids, dtype=table.dtype).to(table.device)
        heads, cols = keep.nonzero().unbind(1)
        d = dest[heads, cols]
        block = self.table[layer, row][heads, d // self.bs].long()
        self.k_pool[block, d % self.bs] = k[heads, cols]
        self.v_pool[block, d % self.bs] = v[heads, cols]
        self.paged[layer, row] = total.int()
