"""
End to end: a real, private Postfix authenticates SMTP logins through the
daemon (C{smtpd_sasl_type = dovecot}) and checks senders against the
daemon's C{senders} map (C{smtpd_sender_login_maps}).  Mail is sent with
C{smtplib} and delivered to an LMTP sink in the test.

One Postfix instance serves three C{smtpd} listeners:

 - the main one asks the daemon over TCP;
 - one asks over a UNIX socket at C{private/auth} under the queue
   directory, exactly the set-up of a chrooted Postfix;
 - one runs a single process, so that successive SMTP sessions share one
   auth connection, as they do in production.
"""

from __future__ import annotations

import base64
import re
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fake_userli import ERROR, NORMAL, REFUSED, FakeUserliServer
from tests.integration.conftest import DOMAIN, StartDaemon
from tests.integration.harness import Daemon, accepts, free_port, wait_for
from tests.integration.postfix import LMTPSink, PostfixInstance, requires_postfix
from tests.integration.test_policy_redis import metric

pytestmark = [pytest.mark.integration, requires_postfix]

ALICE = f"alice@{DOMAIN}"
ALICE_PASSWORD = "alice-password"
BOB = f"bob@{DOMAIN}"
RECIPIENT = "someone@example.net"


@dataclass
class MailSystem:
    """The daemons, the Postfix instance and the ports a test talks to."""

    daemon: Daemon
    postfix: PostfixInstance
    sink: LMTPSink
    unix_port: int
    single_port: int
    unix_socket: Path
    start_daemon: StartDaemon


@pytest.fixture
def mail_system(fake_userli: FakeUserliServer, start_daemon: StartDaemon) -> Iterator[MailSystem]:
    """
    A daemon with its SASL listener on TCP, and a Postfix whose smtpd
    services authenticate through it (and through a UNIX socket that a
    test starts a daemon on, under the queue directory).
    """
    daemon = start_daemon(env={"SASL_FAILURE_DELAY": "100ms"}, sasl=True)
    assert isinstance(daemon.sasl, tuple) and isinstance(daemon.socketmap, tuple)
    sasl_host, sasl_port = daemon.sasl
    socketmap_host, socketmap_port = daemon.socketmap
    single_port = free_port()
    with LMTPSink() as sink:
        postfix = PostfixInstance(
            sink.port,
            main={
                "smtpd_sasl_auth_enable": "yes",
                "smtpd_sasl_type": "dovecot",
                "smtpd_sasl_path": f"inet:{sasl_host}:{sasl_port}",
                "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
                "smtpd_sender_login_maps": (
                    f"socketmap:inet:{socketmap_host}:{socketmap_port}:senders"
                ),
                "smtpd_sender_restrictions": "reject_sender_login_mismatch",
            },
            services=[
                # One process at most: every session on this port goes to
                # the same smtpd, and so to the same auth connection.
                f"127.0.0.1:{single_port} inet n - n - 1 smtpd",
            ],
        )
        unix_port = postfix.add_smtpd({"smtpd_sasl_path": "private/auth"})
        postfix.start()
        try:
            wait_for(lambda: accepts(("127.0.0.1", single_port)), "the single-process smtpd")
            yield MailSystem(
                daemon=daemon,
                postfix=postfix,
                sink=sink,
                unix_port=unix_port,
                single_port=single_port,
                unix_socket=postfix.queue_directory / "private" / "auth",
                start_daemon=start_daemon,
            )
        finally:
            postfix.cleanup()


def login(
    port: int,
    user: str,
    password: str,
    mechanism: str = "PLAIN",
    initial_response: bool = True,
) -> tuple[int, bytes]:
    """
    One SMTP session that logs in (and quits): the SMTP code and text of
    Postfix's answer to AUTH.
    """
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo("client.example.test")
        smtp.user, smtp.password = user, password
        method = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
        try:
            return smtp.auth(mechanism, method, initial_response_ok=initial_response)
        except smtplib.SMTPAuthenticationError as error:
            return error.smtp_code, error.smtp_error


def assert_logged_in(answer: tuple[int, bytes]) -> None:
    assert answer[0] == 235, answer


def assert_refused(answer: tuple[int, bytes], reason: bytes = b"") -> None:
    assert answer[0] == 535, answer
    assert reason in answer[1], answer


def test_plain_and_login(mail_system: MailSystem) -> None:
    """
    PLAIN and LOGIN, with and without an initial response (smtplib sends
    one by default), get 235 for the right password and 535 for a wrong
    one; the login name is normalised.
    """
    port = mail_system.postfix.smtp_port
    for mechanism in ("PLAIN", "LOGIN"):
        for initial in (True, False):
            assert_logged_in(login(port, ALICE, ALICE_PASSWORD, mechanism, initial))
            assert_refused(
                login(port, ALICE, "wrong-password", mechanism, initial),
                b"authentication failed",
            )
    assert_logged_in(login(port, "Alice@Example.ORG", ALICE_PASSWORD))
    assert_refused(login(port, "nobody@" + DOMAIN, "whatever"))
    url = mail_system.daemon.metrics_url
    assert metric(url, "sasl_auth_total", '{mechanism="PLAIN",result="success"}') == 3
    assert metric(url, "sasl_auth_total", '{mechanism="LOGIN",result="success"}') == 2
    assert metric(url, "sasl_auth_total", '{mechanism="LOGIN",result="invalid_credentials"}') == 2


def test_refused_users(mail_system: MailSystem) -> None:
    """A spam-role user and one who must change the password get 535 with Userli's reason."""
    port = mail_system.postfix.smtp_port
    assert_refused(login(port, f"spammer@{DOMAIN}", "spammer-password"), b"spam role")
    assert_refused(
        login(port, f"stale@{DOMAIN}", "stale-password", "LOGIN"), b"password change required"
    )


def test_api_down(mail_system: MailSystem, fake_userli: FakeUserliServer) -> None:
    """
    With Userli failing or unreachable the login fails (fail-closed), and
    works again once Userli is back.
    """
    port = mail_system.postfix.smtp_port
    for mode in (ERROR, REFUSED):
        fake_userli.set_mode(mode)
        code, text = login(port, ALICE, ALICE_PASSWORD)
        # Postfix 3.7 answers every FAIL with 535; later versions may honour
        # the "temp" flag with 454.  Either way: no login.
        assert code in (535, 454), (mode, code, text)
        assert b"temporary authentication failure" in text, text
    fake_userli.set_mode(NORMAL)
    assert_logged_in(login(port, ALICE, ALICE_PASSWORD))


def send_as(port: int, user: str, password: str, sender: str) -> dict[str, tuple[int, bytes]]:
    """Log in and send one message from C{sender}; the refused recipients."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.login(user, password)
        try:
            smtp.sendmail(
                sender,
                [RECIPIENT],
                f"From: {sender}\r\nTo: {RECIPIENT}\r\nSubject: test\r\n\r\nHello\r\n",
            )
        except smtplib.SMTPRecipientsRefused as refused:
            return refused.recipients
    return {}


def test_sender_login_maps(mail_system: MailSystem) -> None:
    """
    A user may send as their own address and as an alias pointing to them,
    but not as someone else's address; logging in with another spelling of
    the address changes nothing, because Postfix gets the normalised one.
    """
    port = mail_system.postfix.smtp_port
    assert send_as(port, ALICE, ALICE_PASSWORD, ALICE) == {}
    assert send_as(port, ALICE, ALICE_PASSWORD, f"info@{DOMAIN}") == {}
    assert send_as(port, "ALICE@example.org", ALICE_PASSWORD, ALICE) == {}
    refused = send_as(port, ALICE, ALICE_PASSWORD, BOB)
    assert refused[RECIPIENT][0] == 553, refused
    assert b"not owned by user alice@example.org" in refused[RECIPIENT][1], refused
    deliveries = mail_system.sink.wait_for(3)
    assert sorted(d.mail_from for d in deliveries) == [ALICE, ALICE, f"info@{DOMAIN}"]


def test_unix_socket(mail_system: MailSystem) -> None:
    """
    The chrooted-Postfix set-up: the daemon listens on
    QUEUE_DIR/private/auth and smtpd uses C{smtpd_sasl_path = private/auth}.
    The socket file a killed daemon left behind is replaced by the next one.
    """
    socket_path = str(mail_system.unix_socket)
    crashed = mail_system.start_daemon(env={"SASL_LISTEN_ADDR": socket_path})
    crashed.kill()
    assert Path(socket_path).exists()
    assert not accepts(socket_path)
    mail_system.start_daemon(env={"SASL_LISTEN_ADDR": socket_path})
    port = mail_system.unix_port
    assert_logged_in(login(port, ALICE, ALICE_PASSWORD))
    assert_logged_in(login(port, ALICE, ALICE_PASSWORD, "LOGIN"))
    assert_refused(login(port, ALICE, "wrong-password"))
    assert send_as(port, ALICE, ALICE_PASSWORD, ALICE) == {}
    mail_system.sink.wait_for(1)


def test_auth_connection_reused(mail_system: MailSystem) -> None:
    """
    Successive SMTP sessions on one smtpd process share one auth
    connection (Postfix keeps it), and each gets the right answer.
    """
    port = mail_system.single_port
    daemon = mail_system.daemon
    assert_logged_in(login(port, ALICE, ALICE_PASSWORD))
    assert_refused(login(port, ALICE, "wrong-password", "LOGIN"))
    assert_logged_in(login(port, ALICE, ALICE_PASSWORD, "LOGIN"))
    assert_refused(login(port, ALICE, "wrong-password"))
    output = daemon.output()
    requests = re.findall(r"SASL AUTH id=(\d+) .* client_pid=(\d+)", output)
    # One smtpd process (its request counter runs on across sessions)...
    assert [request_id for request_id, _ in requests] == ["1", "2", "3", "4"], output
    [client_pid] = {pid for _, pid in requests}
    # ... and one auth connection: one handshake from that process.
    assert output.count(f"SASL client pid {client_pid}\n") == 1, output


def test_no_password_reaches_the_logs(mail_system: MailSystem) -> None:
    """Neither the daemon (at debug level) nor Postfix logs a password."""
    port = mail_system.postfix.smtp_port
    assert_logged_in(login(port, ALICE, ALICE_PASSWORD, "LOGIN"))
    assert_refused(login(port, ALICE, "Wrong-Horse-Battery"))
    output = mail_system.daemon.output() + mail_system.postfix.log()
    for password in (ALICE_PASSWORD, "Wrong-Horse-Battery"):
        assert password not in output
        assert base64.b64encode(password.encode()).decode() not in output
