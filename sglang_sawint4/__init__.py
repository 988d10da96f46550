"""sglang-sawint4: rotated INT4 KV cache pages for SGLang (SAW-INT4)."""

import os as _os

__version__ = "0.1.0"

# pyproject.toml maps the repository folders kernels/ and patches/ into this
# namespace (sglang_sawint4.kernels, sglang_sawint4.patches) when the package is
# installed.  When it is imported straight from a source checkout (PYTHONPATH, or a
# working directory that shadows the install), let the same names resolve to those
# folders.  Never a top-level `kernels`: SGLang depends on the PyPI package of that name.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and _os.path.isfile(
        _os.path.join(_checkout, "kernels", "format_jit.py")) and _os.path.isfile(
        _os.path.join(_checkout, "pyproject.toml")):
    __path__.append(_checkout)  # noqa: F821 - the package's own __path__
