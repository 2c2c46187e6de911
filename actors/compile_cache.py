"""A persistent torch.compile cache, so a restarted or added replica skips recompilation."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def enable_compile_cache(cache_dir: Path | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "zimage-orchestrator" / "inductor"
    root.mkdir(parents=True, exist_ok=True)
    if cache_dir:  # the config's choice wins over an inherited TORCHINDUCTOR_CACHE_DIR
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root)
    else:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    log.info("torch.compile cache at %s", os.environ["TORCHINDUCTOR_CACHE_DIR"])
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
