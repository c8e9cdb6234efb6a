"""A stand-in for an EC2 instance's metadata service (IMDSv2): a token, then the instance's
Availability Zone, at the paths botocore asks. There is no EC2 instance here, and moto's own
metadata answers `placement/availability-zone` but not the `.../availability-zone/` botocore reads;
botocore finds this one through `AWS_EC2_METADATA_SERVICE_ENDPOINT`, as it finds a real one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "hpodlb-test-token"  # a stand-in's, not a secret


@contextmanager
def instance_metadata(zone: str) -> Iterator[str]:
    """Serve an instance in `zone` on a free loopback port; yields the endpoint URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            self._answer(TOKEN if self.path == "/latest/api/token" else None)

        def do_GET(self) -> None:
            good = self.headers.get("X-aws-ec2-metadata-token") == TOKEN
            path = self.path.rstrip("/")
            self._answer(
                zone if good and path == "/latest/meta-data/placement/availability-zone" else None
            )

        def _answer(self, body: str | None) -> None:
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write((body or "").encode())

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
