"""
End to end: the outbound and inbound mixes of issue 17 through a real,
private Postfix set up as the README says (the four maps, SASL logins,
C{reject_sender_login_mismatch}, the quota policy on a submission port),
the daemon with Redis, and the fake Userli counting the calls it gets.

 - outbound: logged-in users send, over submission, to addresses in four
   remote domains;
 - inbound: outsiders send, without logging in, to local mailboxes and
   aliases on the port-25 C{smtpd}.

Each mix is sent once to warm the cache and once more to be measured.
"""

from __future__ import annotations

import smtplib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.fake_userli import FakeUserliServer
from tests.integration.conftest import DOMAIN, StartDaemon
from tests.integration.harness import RedisServer, wait_for
from tests.integration.postfix import (
    LMTPSink,
    PostfixInstance,
    readme_configuration,
    requires_postfix,
)

pytestmark = [pytest.mark.integration, requires_postfix]

#: Each message by subject: its sender and whom it must reach.
Outcome = dict[str, tuple[str, set[str]]]

PASSWORDS = {f"alice@{DOMAIN}": "alice-password", f"bob@{DOMAIN}": "bob-password"}
REMOTE_DOMAINS = ("remote1.test", "remote2.test", "remote3.test", "remote4.test")

# Who sends to whom, and who must get it after alias expansion.
OUTBOUND = [
    (sender, f"friend@{domain}", {f"friend@{domain}"})
    for sender in PASSWORDS
    for domain in REMOTE_DOMAINS
]
INBOUND = [
    ("someone@outside1.test", f"alice@{DOMAIN}", {f"alice@{DOMAIN}"}),
    ("someone@outside2.test", f"bob@{DOMAIN}", {f"bob@{DOMAIN}"}),
    ("someone@outside3.test", f"info@{DOMAIN}", {f"alice@{DOMAIN}"}),
    ("someone@outside4.test", f"team@{DOMAIN}", {f"alice@{DOMAIN}", f"bob@{DOMAIN}"}),
    # A mailbox keeps the address as given: the extension is for the
    # delivery agent; Postfix accepts it because the daemon cut it.
    ("other@outside1.test", f"ALICE+news@{DOMAIN}", {f"ALICE+news@{DOMAIN}"}),
]


@dataclass
class MailSystem:
    postfix: PostfixInstance
    sink: LMTPSink
    submission_port: int
    userli: FakeUserliServer


@pytest.fixture
def mail_system(
    fake_userli: FakeUserliServer, start_daemon: StartDaemon, redis_server: RedisServer
) -> Iterator[MailSystem]:
    """The daemon with Redis, and a Postfix set up as the README says."""
    daemon = start_daemon(
        env={"RATE_LIMIT_IDENTITY": "sasl", "POSTFIX_RECIPIENT_DELIMITER": "+"},
        redis=redis_server,
        sasl=True,
    )
    assert isinstance(daemon.socketmap, tuple) and isinstance(daemon.sasl, tuple)
    assert daemon.policy is not None
    main, submission = readme_configuration(daemon.socketmap, daemon.policy, daemon.sasl)
    main["recipient_delimiter"] = "+"
    with LMTPSink() as sink:
        postfix = PostfixInstance(sink.port, main=main)
        submission_port = postfix.add_smtpd(submission)
        postfix.start()
        try:
            yield MailSystem(postfix, sink, submission_port, fake_userli)
        finally:
            postfix.cleanup()


def send(system: MailSystem, traffic: str, round: str) -> Outcome:
    """
    Send one mix; what each message (by subject) must become: its sender
    and the mailboxes or remote addresses it must reach.
    """
    expected = {}
    if traffic == "outbound":
        for n, (sender, recipient, reaches) in enumerate(OUTBOUND):
            subject = f"{round} outbound {n}"
            with smtplib.SMTP("127.0.0.1", system.submission_port, timeout=60) as smtp:
                smtp.login(sender, PASSWORDS[sender])
                smtp.sendmail(sender, [recipient], f"Subject: {subject}\r\n\r\nhello\r\n")
            expected[subject] = (sender, reaches)
    else:
        for n, (sender, recipient, reaches) in enumerate(INBOUND):
            subject = f"{round} inbound {n}"
            with smtplib.SMTP("127.0.0.1", system.postfix.smtp_port, timeout=60) as smtp:
                smtp.sendmail(sender, [recipient], f"Subject: {subject}\r\n\r\nhello\r\n")
            expected[subject] = (sender, reaches)
    return expected


def delivered(system: MailSystem, count: int) -> Outcome:
    """Wait for C{count} messages in all; what reached whom, by subject."""
    got: Outcome = {}
    for delivery in system.sink.wait_for(count, deadline=120):
        subject = delivery.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        _, reaches = got.setdefault(subject, (delivery.mail_from, set()))
        reaches.update(delivery.recipients)
    return got


def run_mixes(system: MailSystem) -> tuple[Outcome, dict[str, Counter[str]]]:
    """
    Both mixes, warm-up then measured: every message as delivered, and the
    Userli calls (logins left out) of each measured mix.
    """
    expected: Outcome = {}
    for traffic in ("outbound", "inbound"):
        expected.update(send(system, traffic, "warm-up"))
        delivered(system, len(expected))
    calls: dict[str, Counter[str]] = {}
    for traffic in ("outbound", "inbound"):
        system.userli.fake.clear()
        expected.update(send(system, traffic, "measured"))
        delivered(system, len(expected))
        calls[traffic] = Counter(
            r.endpoint for r in system.userli.fake.requests() if r.endpoint != "auth"
        )
    assert delivered(system, len(expected)) == expected
    return expected, calls


def test_mixes_delivered(mail_system: MailSystem) -> None:
    """
    Every message of both mixes is delivered exactly as expected: remote
    recipients as addressed, local mailboxes once each, aliases expanded
    (C{team} to both of its mailboxes), an address with an extension
    accepted; nothing else.
    """
    expected, _ = run_mixes(mail_system)
    assert len(expected) == 2 * (len(OUTBOUND) + len(INBOUND))
    assert len(mail_system.sink.deliveries) == len(expected)
    # Nothing deferred or bounced: the queue empties (the last message
    # leaves it a moment after the sink has it).
    wait_for(lambda: mail_system.postfix.queued() == [], "Postfix's queue to empty")


def test_calls_per_message_item_1(mail_system: MailSystem) -> None:
    """
    Issue 17, item 1 (remote domains remembered, C{REMOTE_DOMAIN_CACHE_TTL}):
    on a warm cache, an outbound message costs at most 1.1 Userli calls
    (the sender's quota) and an inbound one at most 2.  Without item 1,
    every question about a remote domain, alias, sender or quota reaches
    Userli, and this fails.
    """
    _, calls = run_mixes(mail_system)
    outbound = sum(calls["outbound"].values()) / len(OUTBOUND)
    inbound = sum(calls["inbound"].values()) / len(INBOUND)
    assert outbound <= 1.1, calls["outbound"]
    assert inbound <= 2, calls["inbound"]
