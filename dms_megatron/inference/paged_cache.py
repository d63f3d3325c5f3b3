"""A paged KV cache in which every (sequence, layer, KV head) stream holds its own number of tokens
(docs/dms.md section 7), the bookkeeping reference of the inference engines.

* ``BlockPool``: one K and one V tensor ``[num_blocks, block_size, D]`` shared by all streams, and a free
  list of blocks. A stream owns whole blocks; its block table is the list of those block ids.
* ``HeadStream``: one (sequence, layer, KV head). ``append(position, k, v)`` stores a token in a free slot
  of the stream's blocks (a new block from the pool when none is free). ``flag(position)`` marks a held
  token for eviction (its successor's decision was "evict"); the token is physically freed when it leaves
  the window, i.e. when token ``position + window + 1`` is appended, before that token attends. A block
  whose slots are all free goes back to the pool.
* ``gather()``: the held keys/values in position order, for attention.

Invariant (tested): the tokens held are exactly the last ``window + 1`` tokens plus every older token
not flagged, and the pool's used blocks equal the blocks the streams own.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch


class CacheFullError(RuntimeError):
    """The block pool has no free block left."""


class BlockPool:
    """Shared K/V storage in fixed-size blocks."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        head_dim: int,
        value_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1 or block_size < 1 or head_dim < 1:
            raise ValueError(
                f"num_blocks, block_size, head_dim must be >= 1, got {num_blocks}, {block_size}, {head_dim}"
            )
        self.block_size = block_size
        self.k = torch.zeros(num_blocks, block_size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(num_blocks, block_size, value_dim or head_dim, dtype=dtype, device=device)
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_blocks(self) -> int:
        return self.k.shape[0]

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError(f"all {self.num_blocks} KV blocks are in use")
        return self._free.pop()

    def release(self, block: int) -> None:
        self._free.append(block)


@dataclass
class HeadStream:
    """The compressed cache of one (sequence, layer, KV head); see the module docstring."""

    pool: BlockPool
    window: int
    blocks: dict[int, int] = field(default_factory=dict)  # block id -> live tokens in it
    slot_of: dict[int, int] = field(default_factory=dict)  # held position -> global slot
    free_slots: list[int] = field(default_factory=list)
    pending: deque = field(default_factory=deque)  # flagged positions, oldest first
    seen: int = 0  # tokens appended so far

    def _take_slot(self) -> int:
        if not self.free_slots:
            block = self.pool.allocate()
            self.blocks[block] = 0
            bs = self.pool.block_size
            self.free_slots.extend(range(block * bs + bs - 1, block * bs - 1, -1))
        slot = self.free_slots.pop()
        self.blocks[slot // self.pool.block_size] += 1
        return slot

    def _free_slot(self, slot: int) -> None:
        block = slot // self.pool.block_size
        self.blocks[block] -= 1
        if self.blocks[block] == 0:  # the whole block is empty: back to the pool
            del self.blocks[block]
            bs = self.pool.block_size
            self.free_slots = [s for s in self.free_slots if s // bs != block]
            self.pool.release(block)
        else:
            self.free_slots.append(slot)

    def append(self, position: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the token at ``position`` (the next one: positions are consecutive), after freeing the
        flagged token that leaves the window now."""
        if position != self.seen:
            raise ValueError(f"expected position {self.seen}, got {position}")
        while self.pending and self.pending[0] <= position - self.window - 1:
            self._free_slot(self.slot_of.pop(self.pending.popleft()))
        slot = self._take_slot()
        bs = self.pool.block_size
        self.pool.k[slot // bs, slot % bs] = k
        self.pool.v[slot // bs, slot % bs] = v
        self.slot_of[position] = slot
        self.seen += 1

    def flag(self, position: int) -> None:
        """Mark ``position`` for eviction (freed once it is older than the window)."""
        if position not in self.slot_of:
            raise ValueError(f"position {position} is not held")
        if self.pending and position <= self.pending[-1]:
            raise ValueError(f"flags must come in position order ({position} after {self.pending[-1]})")
        self.pending.append(position)

    def drop(self, position: int) -> None:
        """Free a held token now (budget-based baselines; DMS uses ``flag``)."""
        if position not in self.slot_of:
            raise ValueError(f"position {position} is not held")
        if position in self.pending:
            self.pending.remove(position)
        self._free_slot(self.slot_of.pop(position))

    def held_positions(self) -> list[int]:
        return list(self.slot_of)  # insertion order = position order (appends are consecutive)

    def gather(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(positions [n], k [n, D], v [n, Dv])`` of the held tokens in position order."""
        positions = self.held_positions()
        slots = torch.tensor(
            [self.slot_of[p] for p in positions], dtype=torch.long, device=self.pool.k.device
        )
        bs = self.pool.block_size
        k = self.pool.k[slots // bs, slots % bs]
        v = self.pool.v[slots // bs, slots % bs]
        return torch.tensor(positions, dtype=torch.long), k, v

    def release(self) -> None:
        """Return every block (the sequence finished)."""
        for block in list(self.blocks):
            self.pool.release(block)
        self.blocks.clear()
        self.slot_of.clear()
        self.free_slots.clear()
        self.pending.clear()

    @property
    def held(self) -> int:
        return len(self.slot_of)
