"""dms_megatron: Dynamic Memory Sparsification retrofits for Megatron-Core models.

The pure math lives in :mod:`dms_megatron.core` (torch only). Importing this top-level package
imports nothing heavy, so ``import dms_megatron.core`` stays framework-free.
"""

__version__ = "0.1.0.dev0"
