"""
Blocking clients for the daemon's three listeners, as Postfix uses them:
one connection kept open, one request at a time, the reply read in full.

They check every reply's framing as they read it, so a test that drives
traffic through them learns of a malformed or torn reply at once:

 - L{Closed}: the server closed the connection between replies (Postfix
   reconnects and retries: allowed at shutdown and by idle timeouts);
 - L{Torn}: the connection ended in the middle of a reply (never allowed);
 - L{Malformed}: bytes that are not the protocol (never allowed).

Used by the outage, abuse, shutdown and Sentinel tests.
"""

from __future__ import annotations

import re
import socket
from base64 import b64encode
from collections.abc import Mapping

from tests.integration.harness import netstring


class ProtocolViolation(Exception):
    """The server broke the protocol."""


class Torn(ProtocolViolation):
    """The connection ended in the middle of a reply."""


class Malformed(ProtocolViolation):
    """The server sent something that is not the protocol."""


class Closed(ConnectionError):
    """The server closed the connection cleanly, with no reply begun."""


def connect(address: str | tuple[str, int], timeout: float) -> socket.socket:
    """A connected socket to a UNIX path or (host, port)."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(address)
    except BaseException:
        s.close()
        raise
    return s


class _Client:
    def __init__(self, address: str | tuple[str, int], timeout: float = 30.0) -> None:
        self.address = address
        self.sock = connect(address, timeout)
        self.buffer = b""

    def _more(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            if self.buffer:
                raise Torn(f"connection closed after {self.buffer[:80]!r}")
            raise Closed("connection closed by the server")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_LENGTH = re.compile(rb"(0|[1-9][0-9]{0,5}):")
SOCKETMAP_REPLY = re.compile(rb"(OK .+|NOTFOUND ?|TEMP .*|TIMEOUT .*|PERM .*)\Z", re.S)


class SocketmapClient(_Client):
    """A socketmap connection (netstrings)."""

    def ask(self, request: bytes) -> bytes:
        """Send one request (C{b"alias key"}); the unframed reply."""
        self.sock.sendall(netstring(request))
        while True:
            match = _LENGTH.match(self.buffer)
            if match is not None:
                size = int(match.group(1))
                end = match.end() + size
                if len(self.buffer) > end:
                    if self.buffer[end : end + 1] != b",":
                        raise Malformed(f"netstring without its comma: {self.buffer[:80]!r}")
                    reply, self.buffer = self.buffer[match.end() : end], self.buffer[end + 1 :]
                    if len(reply) > 100_000 or not SOCKETMAP_REPLY.match(reply):
                        raise Malformed(f"not a socketmap reply: {reply[:80]!r}")
                    return reply
            elif self.buffer and not re.match(rb"[0-9]{0,6}\Z", self.buffer):
                raise Malformed(f"not a netstring: {self.buffer[:80]!r}")
            self._more()


POLICY_REPLY = re.compile(rb"action=([^\n]+)\n\n")


class PolicyClient(_Client):
    """A policy delegation connection."""

    def ask(self, attributes: Mapping[str, str]) -> str:
        """Send one request; the action (e.g. C{"DUNNO"}, C{"REJECT ..."})."""
        lines = "".join(f"{name}={value}\n" for name, value in attributes.items())
        self.sock.sendall(lines.encode("utf-8") + b"\n")
        while True:
            match = POLICY_REPLY.match(self.buffer)
            if match is not None:
                self.buffer = self.buffer[match.end() :]
                return match.group(1).decode("utf-8")
            if self.buffer and not b"action=".startswith(self.buffer[:7]):
                raise Malformed(f"not a policy reply: {self.buffer[:80]!r}")
            if b"\n\n" in self.buffer:
                raise Malformed(f"not a policy reply: {self.buffer[:80]!r}")
            self._more()


def end_of_message(sender: str, sasl_username: str = "") -> dict[str, str]:
    """The attributes Postfix sends at the end of DATA."""
    return {
        "request": "smtpd_access_policy",
        "protocol_state": "END-OF-MESSAGE",
        "protocol_name": "ESMTP",
        "client_address": "192.0.2.10",
        "client_name": "client.example",
        "sasl_method": "PLAIN" if sasl_username else "",
        "sasl_username": sasl_username,
        "sender": sender,
        "recipient": "",
        "recipient_count": "1",
        "queue_id": "4ABC123",
        "size": "1234",
        "instance": "1a2b.3c4d.5e6f.0",
    }


SASL_REPLY = re.compile(rb"(OK|FAIL|CONT)\t([^\t\n]*)(\t[^\n]*)?\n")


class SASLClient(_Client):
    """A Dovecot-auth connection, handshake done on connect."""

    def __init__(self, address: str | tuple[str, int], timeout: float = 30.0) -> None:
        super().__init__(address, timeout)
        self.sock.sendall(b"VERSION\t1\t2\nCPID\t4242\n")
        while b"\nDONE\n" not in self.buffer:
            self._more()
        handshake, _, self.buffer = self.buffer.partition(b"\nDONE\n")
        lines = handshake.split(b"\n")
        if lines[0] != b"VERSION\t1\t2" or not any(
            line.startswith(b"MECH\tPLAIN") for line in lines
        ):
            raise Malformed(f"unexpected handshake {handshake!r}")
        self.next_id = 1

    def _line(self) -> bytes:
        while b"\n" not in self.buffer:
            self._more()
        match = SASL_REPLY.match(self.buffer)
        if match is None:
            raise Malformed(f"not a SASL reply: {self.buffer[:80]!r}")
        self.buffer = self.buffer[match.end() :]
        return match.group(0)[:-1]

    def plain(self, login: str, password: str) -> bytes:
        """AUTH PLAIN with an initial response; the final reply line (OK/FAIL)."""
        request_id = self.next_id
        self.next_id += 1
        response = b64encode(b"\0" + login.encode() + b"\0" + password.encode())
        self.sock.sendall(
            b"AUTH\t%d\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=192.0.2.10\tresp=%s\n"
            % (request_id, response)
        )
        line = self._line()
        if not line.startswith((b"OK\t%d\t" % request_id, b"FAIL\t%d\t" % request_id)):
            raise Malformed(f"reply to another request: {line!r}")
        return line

    def login(self, login: str, password: str) -> bytes:
        """AUTH LOGIN with the user name as initial response (smtplib's way)."""
        request_id = self.next_id
        self.next_id += 1
        self.sock.sendall(
            b"AUTH\t%d\tLOGIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=192.0.2.10\tresp=%s\n"
            % (request_id, b64encode(login.encode()))
        )
        line = self._line()
        if not line.startswith(b"CONT\t%d\t" % request_id):
            return line
        self.sock.sendall(b"CONT\t%d\t%s\n" % (request_id, b64encode(password.encode())))
        return self._line()
