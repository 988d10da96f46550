"""Monkey-patches into SGLang 0.5.17 (imported as ``sglang_sawint4.patches``)."""
