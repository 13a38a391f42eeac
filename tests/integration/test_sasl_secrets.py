"""
The daemon at debug level never writes a password: not as typed, not in
base64, not inside a PLAIN response.  Checked on the real process's output
after logins that succeed, fail, and fail closed.
"""

from __future__ import annotations

import socket
from base64 import b64encode

import pytest

from tests.fake_userli import ERROR, NORMAL, FakeUserliServer
from tests.integration.conftest import DOMAIN, StartDaemon

pytestmark = pytest.mark.integration

USER = f"alice@{DOMAIN}"
PASSWORD = "alice-password"
WRONG = "Tr0ub4dor&3-not-hers"


class DovecotAuthClient:
    """Just enough of Postfix's side of the Dovecot-auth protocol."""

    def __init__(self, address: str | tuple[str, int]) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(address)
        self.buffer = b""
        self.handshake: list[bytes] = []
        while not self.handshake or self.handshake[-1] != b"DONE":
            self.handshake.append(self.line())
        self.send(b"VERSION\t1\t2", b"CPID\t4711")

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def send(self, *lines: bytes) -> None:
        self.sock.sendall(b"".join(line + b"\n" for line in lines))

    def close(self) -> None:
        self.sock.close()


def b64(text: str) -> bytes:
    return b64encode(text.encode("utf-8"))


def test_no_password_in_debug_output(
    fake_userli: FakeUserliServer, start_daemon: StartDaemon
) -> None:
    """
    PLAIN and LOGIN logins with right and wrong passwords, with the API up
    and down, at LOG_LEVEL=debug: the password appears nowhere in the
    daemon's output, in any encoding.
    """
    daemon = start_daemon(env={"LOG_LEVEL": "debug", "SASL_FAILURE_DELAY": "0"}, sasl=True)
    assert daemon.sasl is not None
    client = DovecotAuthClient(daemon.sasl)
    auth = b"service=smtp\tnologin\tlip=127.0.0.1\trip=192.0.2.7"

    client.send(b"AUTH\t1\tPLAIN\t" + auth + b"\tresp=" + b64(f"\0{USER}\0{PASSWORD}"))
    assert client.line() == b"OK\t1\tuser=" + USER.encode()

    client.send(b"AUTH\t2\tLOGIN\t" + auth + b"\tresp=" + b64(USER))
    assert client.line().startswith(b"CONT\t2\t")
    client.send(b"CONT\t2\t" + b64(WRONG))
    assert client.line().startswith(b"FAIL\t2\t")

    client.send(b"AUTH\t3\tLOGIN\t" + auth)
    assert client.line().startswith(b"CONT\t3\t")
    client.send(b"CONT\t3\t" + b64(USER))
    assert client.line().startswith(b"CONT\t3\t")
    client.send(b"CONT\t3\t" + b64(PASSWORD))
    assert client.line() == b"OK\t3\tuser=" + USER.encode()

    client.send(b"AUTH\t4\tPLAIN\t" + auth)
    assert client.line() == b"CONT\t4\t"
    client.send(b"CONT\t4\t" + b64(f"\0{USER}\0{WRONG}"))
    assert client.line().startswith(b"FAIL\t4\t")

    fake_userli.set_mode(ERROR)
    client.send(b"AUTH\t5\tPLAIN\t" + auth + b"\tresp=" + b64(f"\0{USER}\0{PASSWORD}"))
    assert client.line().startswith(b"FAIL\t5\t")
    fake_userli.set_mode(NORMAL)

    # A password typed where the user name belongs must not leak either.
    client.send(b"AUTH\t6\tPLAIN\t" + auth + b"\tresp=" + b64(f"\0{WRONG}\0{WRONG}"))
    assert client.line().startswith(b"FAIL\t6\t")
    client.close()

    daemon.stop()
    output = daemon.output()
    assert "SASL" in output, output
    for password in (PASSWORD, WRONG):
        forms = {
            password,
            b64(password).decode(),
            b64(f"\0{USER}\0{password}").decode(),
            b64(f"\0{password}\0{password}").decode(),
        }
        for form in forms:
            assert form not in output, (form, output)
    # The API did get them: the test would prove nothing otherwise.
    assert {r.json()["password"] for r in fake_userli.requests("auth")} >= {PASSWORD, WRONG}
