"""A fault-injecting S3 endpoint: an HTTP proxy in front of moto's server that answers chosen requests
with S3's own error responses instead of forwarding them. The pipeline talks to it exactly as it would
talk to AWS S3 or MinIO (AWS_ENDPOINT_URL), so every layer of retries (botocore, s3fs, Prefect) sees
the fault as it would in production."""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERROR_BODY = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
              '<Resource>{path}</Resource><RequestId>fault-injection</RequestId></Error>')


@dataclass
class Rule:
    """Answer `method` requests whose path contains `path_part` with an S3 error: the first `times`
    requests for the first object that matches (every retry of one upload, counted, never timed), or
    every match once `quota_bytes` of uploads have gone through (a full disk on MinIO)."""

    method: str
    path_part: str
    status: int = 503
    code: str = "SlowDown"
    message: str = "Please reduce your request rate."
    times: int | None = None
    quota_bytes: int | None = None
    target: str | None = None
    fired: int = 0

    def fires(self, method: str, path: str, uploaded: int) -> bool:
        if method != self.method or self.path_part not in path:
            return False
        if self.quota_bytes is not None:
            return uploaded >= self.quota_bytes
        obj = path.split("?", 1)[0]
        if self.target is None:
            self.target = obj
        if obj != self.target or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True


class FaultyS3:
    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.rules: list[Rule] = []
        self.injected: list[tuple[str, str, int]] = []
        self.uploaded = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                with proxy.lock:
                    rule = next((r for r in proxy.rules if r.fires(self.command, self.path, proxy.uploaded)), None)
                    if rule is None and self.command == "PUT":
                        proxy.uploaded += len(body)
                    if rule is not None:
                        proxy.injected.append((self.command, self.path, rule.status))
                if rule is not None:
                    payload = ERROR_BODY.format(code=rule.code, message=rule.message, path=self.path).encode()
                    self.send_response(rule.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    payload = response.read()
                    self.send_response(response.status, response.reason)
                    head = self.command == "HEAD"  # keeps the object's Content-Length, sends no body
                    for k, v in response.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection") and (head or k.lower() != "content-length"):
                            self.send_header(k, v)
                    if not head:
                        self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
