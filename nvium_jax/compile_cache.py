"""JAX's persistent compilation cache for the processes that load a run (`load_run`) or run
the CLI: a second `nvium generate`, lm-eval session or notebook restart reads the compiled
decode loop from disk instead of compiling it again.

Where: `$NVIUM_COMPILE_CACHE` when set to a directory, else `<cache dir>/jax` (the cache dir
is `$NVIUM_CACHE`, default the user's, e.g. ~/.cache/nvium_jax). `NVIUM_COMPILE_CACHE=off`
turns it off. A directory already set in `jax.config` (`jax_compilation_cache_dir`) is left
as it is. Entries are keyed by the compiled program, the devices, the flags and the jax
version, so a stale entry is never used, only kept; the cache is trusted code — keep it in a
directory only you can write.
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional

import jax

ENV = "NVIUM_COMPILE_CACHE"
OFF = ("off", "0", "false", "no", "none")
MIN_COMPILE_S = 0.5  # compiles shorter than this are not worth a file read


def compile_cache_dir() -> Optional[pathlib.Path]:
    """The directory the cache would use, or None when it is turned off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return pathlib.Path(value).expanduser()
    from nvium_jax.data.corpus import default_cache_dir

    return default_cache_dir() / "jax"


def enable_compile_cache() -> Optional[pathlib.Path]:
    """Turns the persistent cache on (once per process; idempotent) and returns its
    directory, or None when it is off or its directory cannot be made (then nothing
    changes: every program is simply compiled, as without it)."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return pathlib.Path(current)
    path = compile_cache_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    return path
