"""The retrofit training loop on megatron-core primitives (no Hydra, no argv). In progress: data."""
