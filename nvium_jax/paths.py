"""The path layer: every run dir, data dir and output path the project takes enters here.

Local paths are the default and behave as they always did (`pathlib`). A data dir may also
be an `s3://bucket/prefix` URL: its small files go through etils `epath` (s3fs underneath)
and its token arrays through tensorstore's own `s3` kvstore; both take the endpoint, region
and credentials from the standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_REGION`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`). A `gs://bucket/prefix` URL works the same
way through gcsfs and tensorstore's `gcs` kvstore, with application default credentials
(or an emulator at STORAGE_EMULATOR_HOST). A run dir may be such a URL too
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
DATA_SCHEMES: tuple[str, ...] = ("s3", "gs")  # URL schemes a prepared data dir may use
RUN_SCHEMES: tuple[str, ...] = ("s3", "gs")  # URL schemes a run dir may use (nvium_jax.run_store)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# per scheme: the fsspec backend (under etils epath), the extra that installs it, what to check
_BACKEND = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs")}
_CHECK_STORE = {
    "s3": ("check the bucket name, the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) "
           "and the endpoint (AWS_ENDPOINT_URL, AWS_REGION)"),
    "gs": ("check the bucket name, the credentials (application default credentials, "
           "GOOGLE_APPLICATION_CREDENTIALS) and, for an emulator, STORAGE_EMULATOR_HOST"),
}
# per scheme: what to check when the store refuses a request (HTTP 403) — the identity's permissions
_CHECK_PERMISSION = {
    "s3": ("check that the credentials (AWS_ACCESS_KEY_ID) may read, list, write and delete objects "
           "in bucket {bucket!r} (s3:GetObject, s3:ListBucket, s3:PutObject, s3:DeleteObject)"),
    "gs": ("check that the credentials (application default credentials, GOOGLE_APPLICATION_CREDENTIALS) "
           "may read, list, write and delete objects in bucket {bucket!r} (storage.objects.get, "
           "storage.objects.list, storage.objects.create, storage.objects.delete)"),
}


def url_scheme(value: str | os.PathLike) -> str | None:
    """`s3` for `s3://bucket/key`, `gs` for `gs://…`; None for a local path."""
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
            + (f"give a local path or a URL of {supported}" if supported else
               "give a local path (this path cannot be on an object store)"))
    backend, extra = _BACKEND[scheme]
    try:
        import importlib

        from etils import epath
        importlib.import_module(backend)  # epath's backend for this scheme
    except ImportError as err:
        raise ConfigError(f"{what}={str(value)!r} needs {backend} ({err}); install it with "
                          f"pip install 'nvium_jax[{extra}]'") from None
    return epath.Path(str(value))


def object_store(scheme: str):
    """The fsspec file system of a scheme (s3fs or gcsfs), from the standard environment.
    An emulator (STORAGE_EMULATOR_HOST) takes no credentials."""
    if scheme == "s3":
        import s3fs

        return s3fs.S3FileSystem()
    from gcsfs.core import GCSFileSystem  # the plain client (no gRPC bucket-type probe)

    return GCSFileSystem(token="anon") if os.environ.get("STORAGE_EMULATOR_HOST") else GCSFileSystem()


def local_path(value: str | os.PathLike, what: str) -> pathlib.Path:
    """`value` as a local path; any URL is refused (see `location`)."""
    return location(value, what, SUPPORTED_SCHEMES)


def run_location(value: str | os.PathLike, what: str) -> Any:
    """A run dir: a local path or an `s3://` / `gs://` URL (trained and read through a local
    mirror, `nvium_jax.run_store`)."""
    return location(value, what, RUN_SCHEMES)


def data_location(value: str | os.PathLike, what: str) -> Any:
    """A prepared data dir: a local path or an `s3://` / `gs://` URL."""
    return location(value, what, DATA_SCHEMES)


def is_url(path: Any) -> bool:
    return url_scheme(path) is not None


def split_url(path: Any) -> tuple[str, str, str]:
    """(scheme, bucket, key) of `s3://bucket/key` or `gs://bucket/key`."""
    scheme, rest = str(path).split("://", 1)
    bucket, _, key = rest.partition("/")
    return scheme.lower(), bucket, key


def kvstore_spec(path: Any) -> dict:
    """tensorstore's kvstore for a local path or an `s3://` / `gs://` URL. tensorstore's s3
    driver does not read AWS_ENDPOINT_URL itself, so the endpoint and region are passed on;
    its gcs driver reads an endpoint only from TENSORSTORE_GCS_HTTP_URL, which is set from
    the standard STORAGE_EMULATOR_HOST when only that is given."""
    if not is_url(path):
        return {"driver": "file", "path": str(path)}
    scheme, bucket, key = split_url(path)
    if scheme == "gs":
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator and not os.environ.get("TENSORSTORE_GCS_HTTP_URL"):
            os.environ["TENSORSTORE_GCS_HTTP_URL"] = emulator if "://" in emulator else f"http://{emulator}"
        return {"driver": "gcs", "bucket": bucket, "path": key.rstrip("/") + "/"}
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
    """What a failed object-store request raises: OSError from s3fs and gcsfs, botocore's
    own errors (an unreachable endpoint, a denied request) that s3fs passes through, gcsfs's
    HTTP errors and aiohttp's connection errors."""
    errors: tuple[type[BaseException], ...] = (OSError,)
    try:
        from botocore import exceptions

        errors += (exceptions.BotoCoreError, exceptions.ClientError)
    except ImportError:
        pass
    try:
        import aiohttp
        from gcsfs.retry import HttpError

        errors += (HttpError, aiohttp.ClientError)
    except ImportError:
        pass
    return errors


def check_bucket(path: Any, what: str) -> None:
    """For a URL: its bucket exists and answers (before work whose result would go there)."""
    if not is_url(path):
        return
    scheme, bucket, _ = split_url(path)
    try:
        found = object_store(scheme).exists(bucket)
    except store_errors() as err:
        found, detail = False, f" ({_detail(err)})"
    else:
        detail = ""
    if not found:
        raise ConfigError(f"{what}={str(path)!r}: bucket {bucket!r} does not exist or cannot be "
                          f"reached{detail}; {_CHECK_STORE[scheme]}")


def store_check(path: Any) -> str:
    """What to check when a request to the store of `path` (a URL) fails."""
    return _CHECK_STORE.get(url_scheme(path), _CHECK_STORE["s3"])


def _refused(err: BaseException) -> bool:
    """The store refused the request (HTTP 403): s3fs raises PermissionError, gcsfs an
    OSError whose message starts `Forbidden: `."""
    return isinstance(err, PermissionError) or str(err).startswith("Forbidden: ")


def _detail(err: BaseException) -> str:
    """The first line of a store error's message; for gcsfs's `Forbidden: <request URL>`, the
    store's own reason on the next line instead (it names the caller and the permission)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[1] if lines[0].startswith("Forbidden: ") and len(lines) > 1 else lines[0]


def store_error(path: Any, err: BaseException, doing: str) -> ConfigError:
    """One line for a failed object-store request: the URL, what failed, what to check (for a
    refused request, the permissions the project needs on the bucket)."""
    if _refused(err):
        scheme, bucket, _ = split_url(path)
        check = _CHECK_PERMISSION.get(scheme, _CHECK_PERMISSION["s3"]).format(bucket=bucket)
    else:
        check = store_check(path)
    return ConfigError(f"{doing} {str(path)!r} failed ({_detail(err)}); {check}")


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
