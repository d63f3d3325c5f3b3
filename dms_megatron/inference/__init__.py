"""Inference with a really compressed KV cache (issue 6, in progress): ``paged_cache`` holds each
(sequence, layer, KV head) stream's own tokens in blocks of a shared pool."""
