"""The per-head paged KV cache: held tokens follow the delayed-eviction rule exactly, freed slots and
blocks are reused, and finished streams return every block."""

from __future__ import annotations

import pytest
import torch

from dms_megatron.inference.paged_cache import BlockPool, CacheFullError, HeadStream


def _run(decisions: list[int], window: int, block_size: int = 4, num_blocks: int = 64):
    """Decode token by token: token t's decision flags t-1, then t is appended (docs/dms.md section 7)."""
    pool = BlockPool(num_blocks, block_size, head_dim=3)
    stream = HeadStream(pool, window)
    for t, d in enumerate(decisions):
        if t > 0 and d:
            stream.flag(t - 1)
        stream.append(t, torch.full((3,), float(t)), torch.full((3,), -float(t)))
        expected = [p for p in range(t + 1) if p >= t - window or not decisions[p + 1]]
        assert stream.held_positions() == expected, (t, stream.held_positions(), expected)
        assert sum(stream.blocks.values()) == stream.held
        assert pool.free_blocks == num_blocks - len(stream.blocks)
    return pool, stream


@pytest.mark.parametrize("window", [0, 1, 3, 8])
def test_held_tokens_follow_the_rule(window) -> None:
    gen = torch.Generator().manual_seed(window)
    decisions = (torch.rand(200, generator=gen) < 0.75).int().tolist()
    pool, stream = _run(decisions, window)
    pos, k, v = stream.gather()
    assert torch.equal(k[:, 0], pos.float()) and torch.equal(v[:, 0], -pos.float())
    # bounded memory: about (1 - rate) of the old tokens plus the window, in few blocks
    assert stream.held < 0.5 * len(decisions)
    assert len(stream.blocks) <= -(-stream.held // pool.block_size) + 3
    stream.release()
    assert pool.free_blocks == pool.num_blocks and stream.held == 0


def test_no_eviction_keeps_everything_and_fills_blocks() -> None:
    _, stream = _run([0] * 17, window=2, block_size=4)
    assert stream.held == 17 and len(stream.blocks) == 5


def test_pool_exhaustion_and_sharing() -> None:
    pool = BlockPool(2, 2, head_dim=1)
    a, b = HeadStream(pool, 0), HeadStream(pool, 0)
    for t in range(2):
        a.append(t, torch.zeros(1), torch.zeros(1))
    b.append(0, torch.zeros(1), torch.zeros(1))
    with pytest.raises(CacheFullError):
        a.append(2, torch.zeros(1), torch.zeros(1))
    b.release()
    a.append(2, torch.zeros(1), torch.zeros(1))  # b's block was returned and reused
    assert a.held == 3


def test_bad_calls() -> None:
    pool = BlockPool(4, 2, head_dim=1)
    s = HeadStream(pool, 1)
    with pytest.raises(ValueError, match="expected position 0"):
        s.append(1, torch.zeros(1), torch.zeros(1))
    s.append(0, torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="not held"):
        s.flag(5)
    with pytest.raises(ValueError, match=">= 1"):
        BlockPool(0, 2, head_dim=1)
