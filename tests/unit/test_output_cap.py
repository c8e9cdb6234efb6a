"""The output cap on a remote command, checked as bytes arrive, on stdout and stderr alike."""

from __future__ import annotations

import os
import time

import pytest

from hpodlb.sshnode import SshError, _collect

CAP = 256 * 1024


class Flood:
    """A channel whose node writes faster than it is read: one stream always has bytes ready.

    A fake, because real sshd cannot produce this on demand: on loopback the reader keeps up
    with the node, so the receive loops end by chance, not by the cap. It counts what was taken
    and stops the test (rather than the machine) once far more than the cap has been read."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.taken = 0
        self._r, w = os.pipe()
        os.write(w, b"x")  # select() always finds the channel readable
        os.close(w)

    def fileno(self) -> int:
        return self._r

    def _take(self, size: int) -> bytes:
        assert self.taken < 16 * CAP, f"read {self.taken} bytes, past the cap without stopping"
        chunk = min(size, 32768)
        self.taken += chunk
        return b"y" * chunk

    def recv_ready(self) -> bool:
        return self.stream == "stdout"

    def recv(self, size: int) -> bytes:
        return self._take(size)

    def recv_stderr_ready(self) -> bool:
        return self.stream == "stderr"

    def recv_stderr(self, size: int) -> bytes:
        return self._take(size)

    def exit_status_ready(self) -> bool:
        return False

    def close(self) -> None:
        os.close(self._r)


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_flood_stops_at_the_cap_as_it_arrives(stream: str) -> None:
    """A node flooding either stream is cut off once the cap is passed, before reading on: no
    more than the cap and one read is ever held, however fast the bytes keep coming."""
    flood = Flood(stream)
    try:
        with pytest.raises(SshError) as failed:
            _collect(flood, time.monotonic() + 30, 30, CAP)
    finally:
        flood.close()
    assert str(failed.value) == "command: output exceeded 256 KiB; stopped reading"
    assert CAP < flood.taken <= CAP + 65536
