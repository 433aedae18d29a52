"""An S3 bucket on a local moto server, for the tests that keep run directories on S3."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import boto3
from moto.server import ThreadedMotoServer

from raysseg.distributed.session import free_local_port

DUMMY_SECRET = "raysseg-dummy-secret-key"  # a test checks it is never written into the bucket


@contextlib.contextmanager
def moto_bucket(bucket: str) -> Iterator[str]:
    """s3://<bucket> on a moto server on 127.0.0.1; AWS_* set meanwhile, then restored."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(
        ip_address="127.0.0.1", port=(port := free_local_port()), verbose=False
    )
    server.start()
    environment = {
        "AWS_ACCESS_KEY_ID": "raysseg-dummy-key-id",
        "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()
