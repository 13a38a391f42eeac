"""
Tests for the integration harness itself: the fake Userli, the private
C{redis-server}, the C{postmap} helper, and the DNS server and mail
servers of the C{tls_policy} tests must be trustworthy before any daemon
test can be.
"""

from __future__ import annotations

import json
import smtplib
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from twisted.names import dns

from tests.fake_userli import (
    EMPTY,
    ERROR,
    GARBAGE,
    NORMAL,
    REDIRECT,
    REFUSED,
    SLOW,
    TOKEN,
    TOKEN_WITHOUT_SCOPE,
    WRONG_TYPE,
    FakeUserliServer,
)
from tests.integration.conftest import DOMAIN
from tests.integration.fake_mx import (
    Behaviour,
    FakeDNS,
    FakeMX,
    LoopbackBlock,
    Zone,
    mail_domain,
    mx,
)
from tests.integration.harness import (
    ROOT,
    RedisReplyError,
    RedisServer,
    accepts,
    free_port,
    netstring,
    postmap,
    socketmap_query,
)

pytestmark = pytest.mark.integration


def call(
    server: FakeUserliServer,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, str]:
    """One request to the fake: (status, body, content type)."""
    request = urllib.request.Request(
        server.url + path,
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "POST",
        headers={"Authorization": f"Bearer {TOKEN}"} if headers is None else headers,
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers["Content-Type"]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


class TestFakeUserli:
    """The fake answers as userli-api.md documents, and misbehaves on demand."""

    @pytest.mark.parametrize(
        ("path", "expected"),
        [
            (f"/api/postfix/alias/info@{DOMAIN}", [f"alice@{DOMAIN}"]),
            (f"/api/postfix/alias/team@{DOMAIN}", [f"alice@{DOMAIN}", f"bob@{DOMAIN}"]),
            (f"/api/postfix/alias/nobody@{DOMAIN}", []),
            (f"/api/postfix/domain/{DOMAIN}", True),
            ("/api/postfix/domain/example.com", False),
            (f"/api/postfix/mailbox/alice@{DOMAIN}", True),
            (f"/api/postfix/mailbox/info@{DOMAIN}", False),
            (f"/api/postfix/senders/alice@{DOMAIN}", [f"alice@{DOMAIN}"]),
            (f"/api/postfix/senders/team@{DOMAIN}", [f"alice@{DOMAIN}", f"bob@{DOMAIN}"]),
            (f"/api/postfix/senders/nobody@{DOMAIN}", []),
            (f"/api/postfix/smtp_quota/limited@{DOMAIN}", {"per_hour": 2, "per_day": 3}),
            (f"/api/postfix/smtp_quota/alice@{DOMAIN}", {"per_hour": 0, "per_day": 0}),
            (f"/api/postfix/smtp_quota/info@{DOMAIN}", {"per_hour": 0, "per_day": 0}),
            ("/api/postfix/mailbox/alice%40example.org", True),
        ],
    )
    def test_lookups(self, fake_userli: FakeUserliServer, path: str, expected: Any) -> None:
        """Each lookup endpoint answers 200 with its documented JSON body."""
        status, body, content_type = call(fake_userli, path)
        assert (status, json.loads(body), content_type) == (200, expected, "application/json")

    def test_quota_unknown(self, fake_userli: FakeUserliServer) -> None:
        """smtp_quota of an address that is neither user nor alias is the documented 404."""
        status, body, _ = call(fake_userli, f"/api/postfix/smtp_quota/nobody@{DOMAIN}")
        assert (status, json.loads(body)) == (404, {"error": "User not found"})

    @pytest.mark.parametrize(
        ("headers", "status", "error"),
        [
            ({}, 401, "No API token provided"),
            ({"Authorization": "Bearer wrong"}, 401, "Invalid API token"),
            ({"X-API-Token": "wrong"}, 401, "Invalid API token"),
            ({"X-API-Token": TOKEN}, 200, None),
            ({"Authorization": f"Bearer {TOKEN_WITHOUT_SCOPE}"}, 403, None),
        ],
    )
    def test_token(
        self, fake_userli: FakeUserliServer, headers: dict[str, str], status: int, error: str
    ) -> None:
        """Missing or unknown tokens get 401 {"error"}; a token without the scope 403."""
        got, body, _ = call(fake_userli, f"/api/postfix/domain/{DOMAIN}", headers=headers)
        assert got == status
        if error is not None:
            assert json.loads(body) == {"error": error}
        if status == 403:
            assert "message" not in json.loads(body)

    @pytest.mark.parametrize(
        ("email", "password", "status", "message"),
        [
            (f"alice@{DOMAIN}", "alice-password", 200, "success"),
            (f"alice@{DOMAIN}", "wrong", 401, "authentication failed"),
            (f"nobody@{DOMAIN}", "x", 401, "authentication failed"),
            (f"spammer@{DOMAIN}", "spammer-password", 403, "user disabled due to spam role"),
            (f"spammer@{DOMAIN}", "wrong", 401, "authentication failed"),
            (f"stale@{DOMAIN}", "stale-password", 403, "user password change required"),
            (f"alice@{DOMAIN}", "", 422, None),
            ("", "x", 422, None),
        ],
    )
    def test_auth(
        self,
        fake_userli: FakeUserliServer,
        email: str,
        password: str,
        status: int,
        message: str | None,
    ) -> None:
        """POST /auth: 200 success, 401 failed, 403 spam role or password change, 422 blank."""
        got, body, _ = call(
            fake_userli, "/api/postfix/auth", body={"email": email, "password": password}
        )
        assert got == status
        if message is not None:
            assert json.loads(body) == {"message": message}

    def test_records(self, fake_userli: FakeUserliServer) -> None:
        """Every request is recorded with its raw path, headers and body."""
        call(fake_userli, "/api/postfix/alias/a%2Fb@x")
        call(fake_userli, "/api/postfix/auth", body={"email": "a@x", "password": "p"})
        alias, auth = fake_userli.requests()
        assert (alias.method, alias.raw_path, alias.endpoint, alias.key) == (
            "GET",
            "/api/postfix/alias/a%2Fb@x",
            "alias",
            "a/b@x",
        )
        assert alias.headers["authorization"] == f"Bearer {TOKEN}"
        assert (auth.method, auth.endpoint, auth.json()) == (
            "POST",
            "auth",
            {"email": "a@x", "password": "p"},
        )
        assert fake_userli.requests("auth") == [auth]
        fake_userli.clear()
        assert fake_userli.requests() == []

    @pytest.mark.parametrize(
        ("mode", "status", "body"),
        [
            (ERROR, 500, None),
            (GARBAGE, 200, b"<!DOCTYPE html>"),
            (WRONG_TYPE, 200, b"true"),
            (EMPTY, 200, b""),
        ],
    )
    def test_faults(
        self, fake_userli: FakeUserliServer, mode: str, status: int, body: bytes | None
    ) -> None:
        """Each fault mode answers the way a broken deployment does, until switched back."""
        fake_userli.set_mode(mode)
        got, data, _ = call(fake_userli, f"/api/postfix/alias/info@{DOMAIN}")
        assert got == status
        if body is not None:
            assert data.startswith(body)
        fake_userli.set_mode(NORMAL)
        assert call(fake_userli, f"/api/postfix/alias/info@{DOMAIN}")[0] == 200

    def test_redirect(self, fake_userli: FakeUserliServer) -> None:
        """Redirect mode answers 302 with a Location."""
        fake_userli.set_mode(REDIRECT)
        opener = urllib.request.build_opener(_NoRedirect)
        request = urllib.request.Request(
            fake_userli.url + f"/api/postfix/alias/info@{DOMAIN}",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        with pytest.raises(urllib.error.HTTPError) as raised:
            opener.open(request, timeout=30)
        assert raised.value.code == 302
        assert raised.value.headers["Location"] == "/login"

    def test_refused(self, fake_userli: FakeUserliServer) -> None:
        """Refused mode stops listening and drops open connections; normal listens again."""
        address = ("127.0.0.1", fake_userli.port)
        kept = socket.create_connection(address, timeout=30)
        assert accepts(address)
        fake_userli.set_mode(REFUSED)
        assert not accepts(address)
        try:
            dropped = kept.recv(1) == b""
        except ConnectionResetError:
            dropped = True
        kept.close()
        assert dropped
        fake_userli.set_mode(NORMAL)
        assert accepts(address)
        assert call(fake_userli, f"/api/postfix/domain/{DOMAIN}")[0] == 200

    def test_slow(self, fake_userli: FakeUserliServer) -> None:
        """Slow mode holds the answer back: a client with a shorter timeout gets none."""
        fake_userli.set_mode(SLOW, delay=30)
        request = urllib.request.Request(
            fake_userli.url + f"/api/postfix/domain/{DOMAIN}",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        with pytest.raises(OSError):
            urllib.request.urlopen(request, timeout=0.2)
        assert len(fake_userli.requests("domain")) == 1

    def test_standalone(self, tmp_path: Path) -> None:
        """The fake runs as its own process with a data file, for benchmarks."""
        data = tmp_path / "data.json"
        data.write_text(json.dumps({"aliases": {"a@x": ["b@x"]}, "domains": ["x"]}))
        process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "fake_userli.py"),
                "--port",
                "0",
                "--latency",
                "0.001",
                "--data",
                str(data),
            ],
            stdout=subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            line = process.stdout.readline().decode()
            assert line.startswith("listening on http://127.0.0.1:")
            url = line.split()[-1]
            request = urllib.request.Request(
                url + "/api/postfix/alias/a@x", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                assert json.loads(response.read()) == ["b@x"]
        finally:
            process.terminate()
            process.wait()


class TestRedisServer:
    """The private redis-server starts empty, answers, and comes back on its port."""

    def test_commands(self, redis_server: RedisServer) -> None:
        """The RESP helper round-trips strings, integers, nil, arrays and errors."""
        assert redis_server.command("SET", "k", "OK 1") == "OK"
        assert redis_server.command("GET", "k") == "OK 1"
        assert redis_server.command("GET", "missing") is None
        assert redis_server.command("RPUSH", "l", "a", "b") == 2
        assert redis_server.command("LRANGE", "l", 0, -1) == ["a", "b"]
        with pytest.raises(RedisReplyError):
            redis_server.command("INCR", "k")

    def test_restart_same_port(self, redis_server: RedisServer) -> None:
        """stop() frees the port, restart() serves again on the same one."""
        port = redis_server.port
        redis_server.command("SET", "k", "v")
        redis_server.stop()
        assert not accepts(("127.0.0.1", port))
        redis_server.start()
        assert redis_server.port == port
        assert redis_server.command("GET", "k") is None

    def test_unix_socket(self, redis_server: RedisServer) -> None:
        """The server also listens on a UNIX socket, for unix:// URLs."""
        assert redis_server.unix_url == f"unix://{redis_server.unix_socket}"
        assert accepts(str(redis_server.unix_socket))


class _Socketmap:
    """A one-shot socketmap server answering a fixed reply, for the helpers' tests."""

    def __init__(self, reply: bytes) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.reply = reply
        self.received = b""

    def serve_one(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            connection.settimeout(30)
            while b"," not in self.received:
                self.received += connection.recv(4096)
            connection.sendall(netstring(self.reply))
            connection.recv(1)


class TestPostmap:
    """postmap -q against a canned server: the exit status and stderr tell the answer."""

    @pytest.mark.parametrize(
        ("reply", "status", "stdout", "stderr"),
        [
            (b"OK a@x,b@x", 0, "a@x,b@x\n", None),
            (b"NOTFOUND ", 1, "", None),
            (b"TEMP down", 1, "", "temporary error"),
            (b"PERM bad", 1, "", "permanent error"),
        ],
    )
    def test_postmap(self, reply: bytes, status: int, stdout: str, stderr: str | None) -> None:
        """postmap's exit status, stdout and stderr for each reply kind."""
        import threading

        server = _Socketmap(reply)
        thread = threading.Thread(target=server.serve_one)
        thread.start()
        port = server.listener.getsockname()[1]
        try:
            got = postmap("Key@X", f"socketmap:inet:127.0.0.1:{port}:alias")
        finally:
            thread.join(30)
            server.listener.close()
        assert server.received == netstring(b"alias Key@X")
        assert got[0:2] == (status, stdout)
        if stderr is None:
            assert "error" not in got[2]
        else:
            assert stderr in got[2]

    def test_socketmap_query(self) -> None:
        """socketmap_query frames the request and unframes the reply."""
        import threading

        server = _Socketmap(b"OK 1")
        thread = threading.Thread(target=server.serve_one)
        thread.start()
        try:
            reply = socketmap_query(server.listener.getsockname(), b"mailbox A@X")
        finally:
            thread.join(30)
            server.listener.close()
        assert reply == [b"OK 1"]
        assert server.received == b"11:mailbox A@X,"

    def test_free_port(self) -> None:
        """free_port gives a port nothing listens on."""
        assert not accepts(("127.0.0.1", free_port()))


def _dns_query(server: tuple[str, int], name: str, kind: int, tcp: bool = False) -> dns.Message:
    """One DNS question, over UDP or TCP; the parsed answer."""
    query = dns.Message(id=7, recDes=0)
    query.addQuery(name, kind)
    data = query.toStr()
    if tcp:
        with socket.create_connection(server, timeout=5) as s:
            s.sendall(len(data).to_bytes(2, "big") + data)
            raw = b""
            while len(raw) < 2 or len(raw) < 2 + int.from_bytes(raw[:2], "big"):
                chunk = s.recv(65536)
                assert chunk, "the DNS server closed the connection"
                raw += chunk
            raw = raw[2:]
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(data, server)
            raw = s.recv(65536)
    answer = dns.Message()
    answer.fromStr(raw)
    return answer


class TestFakeDNS:
    """The test DNS server answers from its zone, with authority, over UDP and TCP."""

    def test_zone(self) -> None:
        """MX with their addresses, NODATA, NXDOMAIN, null MX; every question noted."""
        records = {
            **mail_domain("mail.test", (20, "127.0.0.3"), (10, "127.0.0.2")),
            "null.test": [mx(0, ".")],
        }
        with FakeDNS(Zone("test", records), [("127.0.0.1", 0)]) as server:
            address = server.addresses[0]
            assert server.nameservers == f"127.0.0.1:{address[1]}"
            for tcp in (False, True):
                answer = _dns_query(address, "MAIL.test", dns.MX, tcp=tcp)
                assert answer.auth and answer.rCode == dns.OK
                assert sorted(
                    (r.payload.preference, str(r.payload.name)) for r in answer.answers
                ) == [
                    (10, "mx10.mail.test"),
                    (20, "mx20.mail.test"),
                ]
            glue = _dns_query(address, "mx10.mail.test", dns.A)
            assert [r.payload.dottedQuad() for r in glue.answers] == ["127.0.0.2"]
            assert [r.ttl for r in glue.answers] == [0]
            assert _dns_query(address, "mx10.mail.test", dns.MX).answers == []
            assert _dns_query(address, "nosuch.test", dns.MX).rCode == dns.ENAME
            (null,) = _dns_query(address, "null.test", dns.MX).answers
            assert (null.payload.preference, str(null.payload.name)) == (0, "")
            assert server.queries()[:2] == [("MAIL.test", "MX"), ("MAIL.test", "MX")]


class TestFakeMX:
    """The fake mail servers behave as named and record what they saw."""

    def test_behaviours(self) -> None:
        """
        A working handshake, one answered with an alert, no STARTTLS, a
        message in the clear; a refusing address refuses.
        """
        block = LoopbackBlock()
        good, broken, plain = block.address(1), block.address(2), block.address(3)
        behaviours = {good: Behaviour.TLS, broken: Behaviour.BROKEN_TLS, plain: Behaviour.NO_TLS}
        client = ssl.create_default_context()
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        with FakeMX(behaviours) as fake:
            with smtplib.SMTP(good, fake.port, local_hostname="client.test") as smtp:
                smtp.starttls(context=client)
                smtp.ehlo()
            with smtplib.SMTP(broken, fake.port) as smtp:
                smtp.ehlo()
                assert smtp.has_extn("starttls")
                with pytest.raises(ssl.SSLError):
                    smtp.starttls(context=client)
            with smtplib.SMTP(plain, fake.port, local_hostname="client.test") as smtp:
                smtp.ehlo()
                assert not smtp.has_extn("starttls")
                smtp.sendmail("a@client.test", ["b@plain.test"], "Subject: hi\r\n\r\nHello\r\n")
            assert not accepts((block.address(4), fake.port))

            (tls,) = fake.wait_for_sessions(good)
            assert tls.ehlo == ("client.test", "client.test")
            assert tls.starttls and tls.handshake and tls.quit
            (failed,) = fake.wait_for_sessions(broken)
            assert failed.starttls and not failed.handshake
            (clear,) = fake.wait_for_sessions(plain)
            assert [(m.recipients, m.over_tls) for m in clear.messages] == [
                (("b@plain.test",), False)
            ]
