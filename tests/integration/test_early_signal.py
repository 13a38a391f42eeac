"""
A SIGTERM that arrives as soon as the daemon accepts connections, before
twistd has installed its signal handlers, still stops it gracefully.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.fake_userli import TOKEN
from tests.integration.harness import accepts, daemon_environment, free_port, twistd_command

pytestmark = pytest.mark.integration

ATTEMPTS = 10


def test_sigterm_right_after_listening() -> None:
    """
    The listeners accept before the reactor runs; a supervisor that stops
    the daemon the moment it answers must still see exit status 0, never a
    process killed by the signal (it was -15 in about half the attempts).
    """
    statuses = []
    for _ in range(ATTEMPTS):
        port = free_port()
        env = daemon_environment(
            {
                "USERLI_TOKEN": TOKEN,
                "SOCKETMAP_LISTEN_ADDR": f"127.0.0.1:{port}",
                "POLICY_LISTEN_ADDR": "127.0.0.1:0",
                "METRICS_LISTEN_ADDR": "127.0.0.1:0",
            }
        )
        process = subprocess.Popen(
            twistd_command(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 30
            while not accepts(("127.0.0.1", port)):
                assert process.poll() is None, "the daemon exited before listening"
                assert time.monotonic() < deadline, "the daemon never listened"
                time.sleep(0.001)
            process.send_signal(signal.SIGTERM)
            statuses.append(process.wait(timeout=30))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert statuses == [0] * ATTEMPTS
