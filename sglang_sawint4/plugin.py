"""SGLang plugin entry point (group ``sglang.srt.plugins``, see pyproject.toml).

SGLang's ``load_plugins()`` calls :func:`load` in the launcher and again in each
scheduler / TP worker process it spawns, so the patches reach every process that
builds a KV pool or runs attention.  It is a no-op unless our launcher put an
INT4 method into the environment: installing the package changes nothing.

``load_plugins()`` logs and swallows a plugin's exceptions; a worker whose patching
failed would then serve BF16 KV while the launcher reports INT4.  So a failure here
raises ``SystemExit`` (not an ``Exception``): the worker process stops with one clear
line and SGLang's launcher shuts the server down.
"""

import logging
import os

from sglang_sawint4.config import KVQuantConfig

logger = logging.getLogger("sglang_sawint4")


def load() -> None:
    try:
        config = KVQuantConfig.from_env()
        if not config.enabled:
            return
        from sglang_sawint4.patches.sglang_0_5_17 import apply

        apply(config)
    except Exception as e:  # noqa: BLE001 - every failure must stop this process
        message = (f"sglang-sawint4: error: the INT4 KV patches failed in this SGLang process (pid {os.getpid()}): "
                   f"{type(e).__name__}: {e}; stopping instead of serving an unpatched (BF16) KV cache")
        logger.critical(message)
        raise SystemExit(message) from e
