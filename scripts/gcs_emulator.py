"""gcp-storage-emulator as scripts/store_servers.py starts it, with four behaviours of the
real Cloud Storage JSON API that the emulator (2026.7) lacks and the project relies on:

- a suffix byte range (`Range: bytes=-N`, RFC 9110 §14.1.2) returns the last N bytes — the
  emulator ignores it, and tensorstore reads a sharded zarr array's index that way;
- an upload with `ifGenerationMatch=0` fails with 412 when the object exists — the emulator
  overwrites it, and the run-dir lock is that precondition;
- a read carries the object's generation (`x-goog-generation`), which tensorstore checks;
- a multipart upload keeps its content byte for byte — the emulator parses it as e-mail,
  which drops a trailing `\r` before gcsfs's bare-LF delimiter (a checkpoint file that ended
  in one came back a byte short).

It has no authentication either, so it also stands in for an IAM denial: a write into a
bucket whose name ends in `-readonly` (an upload, a delete, a patch, a copy, rewrite or
compose into it, in a batch too) is refused with HTTP 403 and the JSON error body real GCS
sends (`storage.objects.create` … denied), served over HTTP so that gcsfs and tensorstore
see a real 403. Reads and listings of such a bucket, and creating it, are served as usual.

    python -m scripts.gcs_emulator start --host=127.0.0.1 --port=PORT --in-memory
"""

import json
import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

from scripts.store_servers import READ_ONLY_SUFFIX

_download, _insert = objects.download, objects.insert


class _Request:
    """The emulator's request with one header replaced."""

    def __init__(self, request, name: str, value: str):
        self._request, self._name, self._value = request, name.lower(), value

    def get_header(self, name, default=None):
        return self._value if name.lower() == self._name else self._request.get_header(name, default)

    def __getattr__(self, name):
        return getattr(self._request, name)


def download(request, response, storage, *args, **kwargs):
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    try:  # the object's generation, as GCS sends it with every read
        response["x-goog-generation"] = str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        pass
    value = (request.get_header("range", None) or "").strip()
    if value.startswith("bytes=-"):
        try:
            size = len(storage.get_file(bucket, name))
        except NotFound:
            size = 0
        request = _Request(request, "range", f"bytes={max(0, size - int(value[len('bytes=-'):]))}-")
    return _download(request, response, storage, *args, **kwargs)


def insert(request, response, storage, *args, **kwargs):
    if request.query.get("ifGenerationMatch") == ["0"]:
        kind = (request.query.get("uploadType") or [""])[0]
        name = request.query["name"][0] if kind == "media" else (
            request.data["meta"].get("name") if kind == "multipart" else None)
        if name is not None:
            try:
                storage.get_file(request.params["bucket_name"], name)
            except NotFound:
                pass
            else:
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
    return _insert(request, response, storage, *args, **kwargs)


def _forbidden(permission: str) -> dict:
    """The body of real GCS's 403 for an anonymous caller without `permission`."""
    message = (f"Anonymous caller does not have {permission} access to the Google Cloud Storage "
               f"object. Permission '{permission}' denied on resource (or it may not exist).")
    return {"error": {"code": 403, "message": message,
                      "errors": [{"message": message, "domain": "global", "reason": "forbidden"}]}}


def _read_only(bucket) -> bool:
    return bool(bucket) and bucket.endswith(READ_ONLY_SUFFIX)


def _refused_in_read_only(handler, permission: str):
    """`handler` (a route's), but a 403 for a write into a read-only bucket."""
    def guarded(request, response, storage, *args, **kwargs):
        params = request.params or {}
        if _read_only(params.get("dest_bucket_name") or params.get("bucket_name")):
            response.status = HTTPStatus.FORBIDDEN
            response.json(_forbidden(permission))
            return None
        return handler(request, response, storage, *args, **kwargs)
    return guarded


def _batch_refused_in_read_only(handler, permission: str):
    """A batch's part `handler`, but a 403 part for a write into a read-only bucket."""
    def guarded(request, item, storage, bucket_name, object_id, meta, response):
        if _read_only(item.get("dest_bucket_name") or bucket_name):
            objects._batch_write_json(response, "HTTP/1.1 403 Forbidden", _forbidden(permission))
            return True
        return handler(request, item, storage, bucket_name, object_id, meta, response)
    return guarded


_CREATE, _DELETE, _UPDATE = "storage.objects.create", "storage.objects.delete", "storage.objects.update"
# the routes that write, and the permission real GCS names when it refuses each
_WRITES = {"insert": _CREATE, "upload_partial": _CREATE, "xml_upload": _CREATE, "copy": _CREATE,
           "rewrite": _CREATE, "compose": _CREATE, "restore": _CREATE, "delete": _DELETE, "patch": _UPDATE}
_BATCH_WRITES = {"POST": _CREATE, "DELETE": _DELETE, "PATCH": _UPDATE}

objects.download, objects.insert = download, insert
for _name, _permission in _WRITES.items():  # after insert's patch above: it is guarded too
    setattr(objects, _name, _refused_in_read_only(getattr(objects, _name), _permission))
for _method, _permission in _BATCH_WRITES.items():
    objects._BATCH_METHOD_HANDLERS[_method] = _batch_refused_in_read_only(
        objects._BATCH_METHOD_HANDLERS[_method], _permission)

from gcp_storage_emulator import server  # noqa: E402  (after the patch: its routes take it)
from gcp_storage_emulator.__main__ import main  # noqa: E402

_read_data = server._read_data


def read_data(request_handler, query):
    """A `multipart/related` upload split at its delimiters, byte for byte, with the line
    ends the client used (gcsfs writes bare LF), not parsed as e-mail."""
    content_type = request_handler.headers.get("Content-Type") or ""
    if not content_type.startswith("multipart/related"):
        return _read_data(request_handler, query)
    raw = server._decode_raw_data(server._read_raw_data(request_handler), request_handler)
    if not raw:
        return None
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip().strip('"').encode()
    delimiter = b"--" + boundary
    eol = b"\r\n" if raw.startswith(delimiter + b"\r\n") else b"\n"
    parts = []
    for chunk in (eol + raw).split(eol + delimiter)[1:-1]:  # [0]: the preamble; [-1]: "--" and after
        head, _, body = chunk[len(eol):].partition(eol + eol)
        kind = next((line.split(b":", 1)[1].strip().decode() for line in head.split(eol)
                     if line.lower().startswith(b"content-type:")), "application/octet-stream")
        parts.append((kind, body))
    return {"meta": json.loads(parts[0][1]), "content": parts[1][1], "content-type": parts[1][0]}


server._read_data = read_data

if __name__ == "__main__":
    sys.exit(main())
