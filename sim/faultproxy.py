"""An HTTP proxy in front of the moto server that injects the AWS faults moto cannot produce.

This is the one fake in the suite, and only for faults: throttling, 5xx, connection resets, slow
answers, AccessDenied and TargetGroupNotFound. Everything else is forwarded to the real moto server
unchanged, so boto3 and botocore's retry logic run for real.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

FAULTS = ("throttle", "throttle-exception", "500", "503", "reset", "slow", "denied", "notfound")
_ERRORS = {
    "throttle": (400, "Throttling", "Rate exceeded"),
    "throttle-exception": (400, "ThrottlingException", "Rate exceeded"),
    "500": (500, "InternalFailure", "Internal error"),
    "503": (503, "ServiceUnavailable", "Service unavailable"),
    "denied": (403, "AccessDenied", "User is not authorized to perform this action"),
    "notfound": (400, "TargetGroupNotFound", "One or more target groups not found"),
}


class FaultPlan:
    """Which fault (if any) the next request gets; thread-safe, seeded, counted."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.rate = 0.0
        self.kinds: tuple[str, ...] = FAULTS
        # Only these API actions get faults (empty: every action); the rest pass through unchanged.
        self.only_actions: frozenset[str] = frozenset()
        self.injected: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()  # AWS API calls seen, by action (for benchmarks)
        self.requests = 0
        self.slow_seconds = 1.2  # past the 1 s read timeout the tests give boto3
        # Targets real AWS refuses and moto accepts (an IP outside the VPC, say): IP -> message.
        self.invalid_targets: dict[str, str] = {}
        self.lock = threading.Lock()

    def next(self, action: str = "") -> str | None:
        with self.lock:
            self.requests += 1
            if self.only_actions and action not in self.only_actions:
                return None
            if self.rng.random() >= self.rate:
                return None
            fault = self.rng.choice(self.kinds)
            self.injected[fault] += 1
            return fault


def _handler(upstream: str, plan: FaultPlan) -> type[BaseHTTPRequestHandler]:
    target = urlparse(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            action = parse_qs(body.decode(errors="replace")).get("Action", ["?"])[0]
            with plan.lock:
                plan.actions[action] += 1
            fault = plan.next(action)
            fields = parse_qs(body.decode(errors="replace"))
            refused = [
                ip
                for key, (ip, *_) in fields.items()
                if action == "RegisterTargets"
                and key.endswith(".Id")
                and ip in plan.invalid_targets
            ]
            if refused:  # as real AWS answers: the whole call fails, naming one offender
                self._error(400, "ValidationError", plan.invalid_targets[refused[0]])
                return
            if fault == "reset":
                self.close_connection = True
                self.connection.close()
                return
            if fault in _ERRORS:
                self._error(*_ERRORS[fault])
                return
            conn = http.client.HTTPConnection(
                target.hostname or "127.0.0.1", target.port, timeout=30
            )
            headers = {
                k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
            }
            conn.request("POST", self.path, body=body, headers=headers)
            reply = conn.getresponse()
            data = reply.read()
            conn.close()
            if fault == "slow":
                # AWS did the work; only its answer comes after the client gave up. (Delaying the
                # request instead would land a write in a later pass, long after any real AWS
                # would have applied it, and blame that pass for it.)
                time.sleep(plan.slow_seconds)
            try:
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up (read timeout): exactly the fault being tested

        def _error(self, status: int, code: str, message: str) -> None:
            xml = (
                f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}"
                f"</Message></Error><RequestId>fault</RequestId></ErrorResponse>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            self.wfile.write(xml)

    return Handler


@contextmanager
def fault_proxy(upstream: str, plan: FaultPlan) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(upstream, plan))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
