"""S3 throttling and server errors are transient: a run whose store answers ``503 SlowDown`` past
botocore's and s3fs's retries still processes every row, once, with no error row.

The store is the suite's real moto server behind a real HTTP proxy that answers ``503 SlowDown`` to the
first requests for each input object and each output file, as S3 does under load.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest
from botocore.exceptions import ClientError
from s3fs.errors import translate_boto_error

from u2s.config import load_config
from u2s.io.storage import is_transient
from u2s.io.writers import parquet_files, read_columns
from u2s.pipeline import run
from u2s.testing.chat_server import ChatRequest, OracleChatServer, oracle_overrides
from u2s.testing.images import noise_image

IMAGES = 6
#: s3fs tries each call 5 times, botocore each try twice (``storage.max_attempts=1``: one retry), so 12
#: refusals of one object outlast a whole call: only a retried task gets it.
THROTTLED = 12
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>throttle</RequestId></Error>"
)


class ThrottlingProxy:
    """An HTTP proxy to ``upstream`` that answers ``503 SlowDown`` to the first ``times`` requests of each
    (method, path) for which ``throttled(method, path)`` holds, and forwards everything else."""

    def __init__(self, upstream: str, throttled, times: int) -> None:
        target = urlsplit(upstream)
        proxy = self
        self.refused: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self) -> None:
                body = self._body()
                path = urlsplit(self.path).path
                key = (self.command, path)
                with proxy.lock:
                    refuse = throttled(self.command, path) and proxy.refused[key] < times
                    if refuse:
                        proxy.refused[key] += 1
                if refuse:
                    payload = b"" if self.command == "HEAD" else SLOW_DOWN
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                try:
                    upstream_conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                    response = upstream_conn.getresponse()
                    data = response.read()
                finally:
                    upstream_conn.close()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))  # HEAD: the object's size
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    del self.headers["Transfer-Encoding"]
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> ThrottlingProxy:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _client_error(code: str, status: int) -> ClientError:
    response = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")


@pytest.mark.parametrize(
    ("code", "status"),
    [("SlowDown", 503), ("Throttling", 400), ("ThrottlingException", 400), ("RequestLimitExceeded", 503),
     ("ServiceUnavailable", 503), ("InternalError", 500), ("Whatever", 502), ("TooManyRequests", 429)],
)  # fmt: skip
def test_throttling_and_server_errors_are_transient_as_botocore_and_s3fs_raise_them(code, status):
    error = _client_error(code, status)
    assert is_transient(error)
    assert is_transient(translate_boto_error(error))  # s3fs's OSError, raised from the ClientError


@pytest.mark.parametrize(
    ("code", "status"), [("NoSuchKey", 404), ("AccessDenied", 403), ("InvalidRange", 416)]
)
def test_missing_or_forbidden_objects_stay_permanent(code, status):
    error = _client_error(code, status)
    assert not is_transient(error) and not is_transient(translate_boto_error(error))


def test_a_throttling_store_is_ridden_out_with_every_row_processed_once(
    ray_cluster, s3_endpoint, s3_bucket, tmp_path
):
    import boto3

    bucket = s3_bucket.removeprefix("s3://")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for i in range(IMAGES):
        path = tmp_path / f"{i:03d}.png"
        noise_image(48, 48, seed=i).save(path)
        s3.upload_file(str(path), bucket, f"images/{path.name}")

    def throttled(method: str, path: str) -> bool:  # each input object's GETs, each output file's PUTs
        fetch = method == "GET" and path.startswith(f"/{bucket}/images/")
        write = method == "PUT" and path.startswith(f"/{bucket}/out/") and path.endswith(".parquet")
        return fetch or write

    def answer(request: ChatRequest) -> dict:
        return {"privacy_flag": False, "categories": []}

    with ThrottlingProxy(s3_endpoint, throttled, THROTTLED) as proxy, OracleChatServer(answer) as url:
        cfg = _config(f"{s3_bucket}/images", f"{s3_bucket}/out", url, proxy.url)
        summary = run(cfg)
    fetched = [key for key in proxy.refused if key[0] == "GET"]
    written = [key for key in proxy.refused if key[0] == "PUT"]
    assert len(fetched) == IMAGES and written, "the proxy did not throttle every fetch and some writes"
    assert set(proxy.refused.values()) == {THROTTLED}  # each object: a call failed, a retried task got it
    assert summary.rows == IMAGES and summary.by_status == {"kept": IMAGES}
    for uri in (cfg.output.uri, cfg.output.sensitive_uri):
        table = read_columns(uri, cfg.storage, ["id", "status", "error"])
        assert table.num_rows == len(set(table.column("id").to_pylist())) == IMAGES
        assert table.column("error").null_count == IMAGES
    assert parquet_files(cfg.output.uri, cfg.storage) == parquet_files(cfg.output.sensitive_uri, cfg.storage)


def _config(input_uri: str, out: str, chat_url: str, endpoint: str):
    return load_config(
        preset="cpu-tiny",
        overrides=[
            f"input.uri={input_uri}",
            f"output.uri={out}/safe",
            f"output.sensitive_uri={out}/sensitive",
            f"storage.endpoint_url={endpoint}",
            "storage.max_attempts=1",
            "storage.retry_mode=standard",  # adaptive rate-limits the client: slower, same outcome
            "storage.task_retries=3",
            *oracle_overrides(chat_url),
            "stage1.image_size=32",
            "stage2.editor=blur_image",
        ],
    )
