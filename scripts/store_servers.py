"""Object stores on loopback for the tests and the benchmarks: `serve("s3", bucket)` starts
moto's S3 server, `serve("gs", bucket)` gcp-storage-emulator as `scripts/gcs_emulator.py`
mends it, each in a process of its own on 127.0.0.1 (never another address) with one
bucket, and yields the standard environment that points a client at it.

`read_only=True` serves a bucket that the server itself refuses writes into, with HTTP 403
as the real store would: for s3, moto checks IAM after the setup's requests
(INITIAL_NO_AUTH_ACTION_COUNT) and the environment carries the keys of a user that may read
and list the bucket but not write to it; for gs, the emulator refuses writes into a bucket
whose name ends in `-readonly`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]
SERVERS = {"s3": "moto.server", "gs": "gcp_storage_emulator"}  # the module each store's server needs
CLIENTS = {"s3": "s3fs", "gs": "gcsfs"}  # the fsspec client the project reads each store with
READ_ONLY_SUFFIX = "-readonly"  # the emulator refuses writes into a gs bucket named so
_READER = "nvium-reader"
# the requests moto serves before it checks IAM: the bucket, then the reader, its policy, its keys
_SETUP_ACTIONS = 4
_TEST_KEYS = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")


def free_port() -> int:
    """A port nothing listens on at the moment of the call."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(scheme: str, port: int) -> list[str]:
    if scheme == "s3":
        return ["-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return ["-m", "scripts.gcs_emulator", "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"]


def endpoint_env(scheme: str, endpoint: str) -> dict[str, str]:
    """The standard environment of a store's client, pointing at `endpoint`."""
    if scheme == "s3":
        return dict(_TEST_KEYS, AWS_ENDPOINT_URL=endpoint)
    # gcsfs's default client probes each bucket over gRPC, which the emulator does not answer
    return dict(STORAGE_EMULATOR_HOST=endpoint, TENSORSTORE_GCS_HTTP_URL=endpoint,
                GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")


def _create_bucket(scheme: str, env: dict[str, str], bucket: str) -> None:
    if scheme == "s3":
        _aws_client("s3", env).create_bucket(Bucket=bucket)
        return
    request = urllib.request.Request(
        f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b?project=local", method="POST",
        data=json.dumps({"name": bucket}).encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()


def _aws_client(service: str, env: dict[str, str]):
    import boto3

    return boto3.client(service, endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def _reader_env(env: dict[str, str], bucket: str) -> dict[str, str]:
    """`env` with the keys of a new IAM user that may get and list `bucket`'s objects only
    (moto names HeadBucket an action of its own; AWS folds it into ListBucket)."""
    iam = _aws_client("iam", env)
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:HeadBucket"],
        "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}
    iam.create_user(UserName=_READER)
    iam.put_user_policy(UserName=_READER, PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=_READER)["AccessKey"]
    return dict(env, AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def serve(scheme: str, bucket: str, read_only: bool = False, log=subprocess.DEVNULL) -> Iterator[dict[str, str]]:
    """A store's server on 127.0.0.1 with `bucket` (its output to `log`), stopped on exit;
    yields the environment that points a client at it (see the module's docstring)."""
    if read_only and scheme == "gs" and not bucket.endswith(READ_ONLY_SUFFIX):
        raise ValueError(f"a read-only gs bucket is one named *{READ_ONLY_SUFFIX}, not {bucket!r}")
    port = free_port()
    env = endpoint_env(scheme, f"http://127.0.0.1:{port}")
    server_env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(_SETUP_ACTIONS)) \
        if read_only and scheme == "s3" else None
    proc = subprocess.Popen([sys.executable, *_argv(scheme, port)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT, env=server_env)
    try:
        deadline = time.time() + 30
        while True:  # the bucket's creation is the first request (moto counts it)
            try:
                _create_bucket(scheme, env, bucket)
                break
            except Exception:  # not listening yet
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the {scheme} server did not start on 127.0.0.1:{port}")
                time.sleep(0.2)
        yield _reader_env(env, bucket) if read_only and scheme == "s3" else env
    finally:
        _stop(proc)
