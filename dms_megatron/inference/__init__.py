"""Inference with a really compressed KV cache, on exported checkpoints (no megatron): ``model`` (the
plain-torch causal LM and CPU reference), ``paged_cache`` / ``engine`` (per-stream paged cache, one
sequence), ``compressed_cache`` / ``batch_engine`` (the tensor engine: continuous batching, Triton decode,
CUDA graphs), ``baselines`` / ``baseline_cache`` (StreamingLLM, TOVA, H2O) and ``evaluate`` /
``quality_report`` (quality at equal KV memory). See docs/inference.md."""
