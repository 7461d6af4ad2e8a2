"""Where lowrank_train keeps what it builds at run time (tokenizers, packed corpora, converted models)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "LOWRANK_TRAIN_CACHE"


def cache_root() -> Path:
    """The root cache folder: ``$LOWRANK_TRAIN_CACHE`` when set, else ``~/.cache/lowrank_train``.

    The folder is not created here; each writer creates the sub-folder it needs.
    """
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "lowrank_train"
