"""Talking to a running sglang-sawint4 server: HTTP client and server processes."""
