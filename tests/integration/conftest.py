"""Shared fixtures of the CPU end-to-end tests."""

from __future__ import annotations

import pytest
import torch

from dms_megatron.training.data import write_token_documents


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """Tokens for the debug models (vocabulary 96, EOS 2): 200 random documents of 4-40 tokens."""
    prefix = tmp_path_factory.mktemp("data") / "rand"
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 96, (int(n),), generator=gen).tolist() for n in torch.randint(4, 40, (200,))]
    write_token_documents(prefix, docs, 96, 2, "random-test-tokens")
    return str(prefix)
