"""Test and benchmark harness that ships with the package: a tiny Megatron GPT (``tiny_gpt``) and its
DMS training schedule (``tiny_dms``), shared by the CPU tests and the GPU parity benchmark."""
