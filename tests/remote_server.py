"""A real S3-compatible server on 127.0.0.1 (moto's ThreadedMotoServer) for remote tests."""

from __future__ import annotations

import os
import socket
import uuid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            # fsspec reads FSSPEC_<PROTOCOL>_<KWARG>: every process, CLI included, finds
            # the server through the environment, never through the URL or config.
            "FSSPEC_S3_ENDPOINT_URL": self.endpoint,
        }

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def new_bucket(self) -> str:
        import s3fs

        name = f"castore-{uuid.uuid4().hex[:12]}"
        fs = s3fs.S3FileSystem(
            endpoint_url=self.endpoint,
            key="testing",
            secret="testing-secret",
            skip_instance_cache=True,
        )
        fs.mkdir(name)
        return f"s3://{name}/cache"

    def apply_env(self) -> dict[str, str]:
        old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        return old
