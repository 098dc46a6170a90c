"""The path layer: every run dir, data dir and output path the project takes enters here.

Local paths are the default and behave as they always did (`pathlib`). A data dir may also
be an `s3://bucket/prefix` URL: its small files go through etils `epath` (s3fs underneath)
and its token arrays through tensorstore's own `s3` kvstore; both take the endpoint, region
and credentials from the standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_REGION`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`). A run dir may be an `s3://` URL too
(`nvium_jax.run_store`: a local mirror, the bucket the truth). Any other URL is refused in
one line naming the value and what is supported, never folded into a local folder the way
`pathlib` would (`s3://b/run` → `./s3:/b/run`).
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

from nvium_jax.config import ConfigError

SUPPORTED_SCHEMES: tuple[str, ...] = ()  # URL schemes every other path may use (none)
DATA_SCHEMES: tuple[str, ...] = ("s3",)  # URL schemes a prepared data dir may use
RUN_SCHEMES: tuple[str, ...] = ("s3",)  # URL schemes a run dir may use (nvium_jax.run_store)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CHECK_STORE = ("check the bucket name, the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) "
                "and the endpoint (AWS_ENDPOINT_URL, AWS_REGION)")


def url_scheme(value: str | os.PathLike) -> str | None:
    """`s3` for `s3://bucket/key`; None for a local path."""
    match = _URL.match(str(value)) if isinstance(value, (str, os.PathLike)) else None
    return match.group(1).lower() if match else None


def location(value: str | os.PathLike, what: str, schemes: tuple[str, ...] = ()) -> Any:
    """`value` as a `pathlib.Path` (local) or an `epath.Path` (a URL of one of `schemes`);
    any other URL is a `ConfigError` naming `what` (e.g. `data.path`, `--out`) and the value."""
    scheme = url_scheme(value)
    if scheme is None:
        return pathlib.Path(value)
    if scheme not in schemes:
        supported = ", ".join(f"{s}://" for s in schemes)
        raise ConfigError(
            f"{what}={str(value)!r} is a URL ({scheme}://), which is not supported; "
            + (f"give a local path or an {supported} URL" if supported else
               "give a local path (run dirs on object stores such as s3:// and gs:// are not "
               "supported yet)"))
    try:
        from etils import epath
        import s3fs  # noqa: F401  (epath's backend for s3://)
    except ImportError as err:
        raise ConfigError(f"{what}={str(value)!r} needs s3fs ({err}); install it with "
                          f"pip install 'nvium_jax[s3]'") from None
    return epath.Path(str(value))


def local_path(value: str | os.PathLike, what: str) -> pathlib.Path:
    """`value` as a local path; any URL is refused (see `location`)."""
    return location(value, what, SUPPORTED_SCHEMES)


def run_location(value: str | os.PathLike, what: str) -> Any:
    """A run dir: a local path or an `s3://` URL (trained and read through a local mirror,
    `nvium_jax.run_store`)."""
    return location(value, what, RUN_SCHEMES)


def data_location(value: str | os.PathLike, what: str) -> Any:
    """A prepared data dir: a local path or an `s3://` URL."""
    return location(value, what, DATA_SCHEMES)


def is_url(path: Any) -> bool:
    return url_scheme(path) is not None


def kvstore_spec(path: Any) -> dict:
    """tensorstore's kvstore for a local path or an `s3://bucket/key` URL. tensorstore's s3
    driver does not read AWS_ENDPOINT_URL itself, so the endpoint and region are passed on."""
    if not is_url(path):
        return {"driver": "file", "path": str(path)}
    bucket, _, key = str(path)[len("s3://"):].partition("/")
    spec = {"driver": "s3", "bucket": bucket, "path": key.rstrip("/") + "/"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if os.environ.get("AWS_ACCESS_KEY_ID"):  # else tensorstore's default chain (profile, instance role)
        spec["aws_credentials"] = {"type": "environment"}
    if endpoint:
        spec["endpoint"] = endpoint
        spec["aws_region"] = region or "us-east-1"
    elif region:
        spec["aws_region"] = region
    return spec


def store_errors() -> tuple[type[BaseException], ...]:
    """What a failed object-store request raises: OSError from s3fs, botocore's own errors
    (an unreachable endpoint, a denied request) that s3fs passes through."""
    try:
        from botocore import exceptions
    except ImportError:
        return (OSError,)
    return (OSError, exceptions.BotoCoreError, exceptions.ClientError)


def check_bucket(path: Any, what: str) -> None:
    """For a URL: its bucket exists and answers (before work whose result would go there)."""
    if not is_url(path):
        return
    import s3fs

    bucket = str(path)[len("s3://"):].partition("/")[0]
    try:
        found = s3fs.S3FileSystem().exists(bucket)
    except store_errors() as err:
        found, detail = False, f" ({str(err).splitlines()[0]})"
    else:
        detail = ""
    if not found:
        raise ConfigError(f"{what}={str(path)!r}: bucket {bucket!r} does not exist or cannot be "
                          f"reached{detail}; {_CHECK_STORE}")


def store_error(path: Any, err: BaseException, doing: str) -> ConfigError:
    """One line for a failed object-store request: the URL, what failed, what to check."""
    detail = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ConfigError(f"{doing} {str(path)!r} failed ({detail}); {_CHECK_STORE}")


def write_text(path: Any, text: str) -> None:
    """`path` whole or not at all: on a disk a temp file and a rename; on an object store one
    PUT (an object appears whole or not at all; there is no rename)."""
    if not is_url(path):
        atomic_write_text(path, text)
        return
    try:
        path.write_text(text)
    except store_errors() as err:
        raise store_error(path, err, "writing") from None


def upload_tree(local: pathlib.Path, remote: Any, skip: tuple[str, ...] = ()) -> None:
    """Copies every file under `local` (but the top-level names in `skip`) to the same key
    under `remote`, one PUT each."""
    files = [p for p in local.rglob("*") if p.is_file()]
    for file in sorted(p for p in files if p.relative_to(local).as_posix() not in skip):
        target = remote / file.relative_to(local).as_posix()
        try:
            target.write_bytes(file.read_bytes())
        except store_errors() as err:
            raise store_error(target, err, "writing") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` whole or not at all: a temp file, fsync, then rename."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
