"""The retrofit trainer on megatron-core primitives (no Hydra, no argv; ``launch/retrofit.py`` drives it).

Modules: ``run`` (``run_retrofit``, ``preflight``), ``setup`` (process groups, models, DDP, optimizer),
``trainer`` (one step), ``loop`` (steps, logging, checkpoints), ``batches`` (GPT datasets, packing),
``data`` (preprocessing), ``checkpoint`` (atomic save/resume, preemption), ``metrics``.
"""
