"""The path layer: every run dir, data dir and output path the project takes enters here.

Today it takes local paths only. A URL (`s3://…`, `gs://…`, any `scheme://…`) is refused in
one line naming the value and what is supported, never folded into a local folder the way
`pathlib` would (`s3://b/run` → `./s3:/b/run`).
"""

from __future__ import annotations

import os
import pathlib
import re

from nvium_jax.config import ConfigError

SUPPORTED_SCHEMES: tuple[str, ...] = ()  # URL schemes that work end to end (none yet)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def url_scheme(value: str | os.PathLike) -> str | None:
    """`s3` for `s3://bucket/key`; None for a local path."""
    match = _URL.match(os.fspath(value)) if isinstance(value, (str, os.PathLike)) else None
    return match.group(1).lower() if match else None


def local_path(value: str | os.PathLike, what: str) -> pathlib.Path:
    """`value` as a local path; a URL of a scheme not supported is a `ConfigError` naming
    `what` (e.g. `run.dir`, `--out`) and the value."""
    scheme = url_scheme(value)
    if scheme is not None and scheme not in SUPPORTED_SCHEMES:
        supported = ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
        raise ConfigError(
            f"{what}={os.fspath(value)!r} is a URL ({scheme}://), which is not supported; "
            + (f"give a local path or a {supported} URL" if supported else
               "give a local path (object stores such as s3:// and gs:// are not supported yet)"))
    return pathlib.Path(value)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` whole or not at all: a temp file, fsync, then rename."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
