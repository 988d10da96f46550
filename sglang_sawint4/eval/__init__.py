"""Offline accuracy evaluation of KV-cache quantization methods on real weights."""
