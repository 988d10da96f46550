"""sglang-sawint4: rotated INT4 KV cache pages for SGLang (SAW-INT4)."""

__version__ = "0.1.0"
