"""SGLang plugin entry point (group ``sglang.srt.plugins``, see pyproject.toml).

SGLang's ``load_plugins()`` calls :func:`load` in the launcher and again in each
scheduler / TP worker process it spawns, so the patches reach every process that
builds a KV pool or runs attention.  It is a no-op unless our launcher put an
INT4 method into the environment: installing the package changes nothing.
"""

import logging

from sglang_sawint4.config import KVQuantConfig

logger = logging.getLogger("sglang_sawint4")


def load() -> None:
    config = KVQuantConfig.from_env()
    if not config.enabled:
        return
    from sglang_sawint4.patches.sglang_0_5_17 import apply

    apply(config)
