"""
End to end: a real, private Postfix asks the daemon at the end of every
message (C{smtpd_end_of_data_restrictions = check_policy_service ...}) and
enforces the sender's quota; mail is sent with C{smtplib} and delivered to
an LMTP sink in the test.
"""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator

import pytest

from tests.fake_userli import ERROR, FakeUserliServer
from tests.integration.conftest import StartDaemon
from tests.integration.harness import Daemon, RedisServer
from tests.integration.postfix import LMTPSink, PostfixInstance, requires_postfix
from tests.integration.test_policy_redis import metric, wait_for_daemons

pytestmark = [pytest.mark.integration, requires_postfix]

LIMITED = "limited@example.org"
RECIPIENT = "someone@example.net"
MESSAGE_TEXT = "Sending quota used up, try again in an hour"


@pytest.fixture
def lmtp_sink() -> Iterator[LMTPSink]:
    """Where the private Postfix delivers."""
    with LMTPSink() as sink:
        yield sink


StartPostfix = Callable[[Daemon], PostfixInstance]


@pytest.fixture
def start_postfix(lmtp_sink: LMTPSink) -> Iterator[StartPostfix]:
    """
    A factory: C{start_postfix(daemon)} starts a private Postfix whose
    smtpd asks C{daemon}'s policy listener at the end of each message.
    """
    instances: list[PostfixInstance] = []

    def start(daemon: Daemon) -> PostfixInstance:
        assert daemon.policy is not None
        host, port = daemon.policy
        instance = PostfixInstance(
            lmtp_sink.port,
            main={"smtpd_end_of_data_restrictions": f"check_policy_service inet:{host}:{port}"},
        )
        instances.append(instance)
        instance.start()
        return instance

    try:
        yield start
    finally:
        for instance in instances:
            instance.cleanup()


def send(postfix: PostfixInstance, sender: str = LIMITED, number: int = 1) -> None:
    """Send one message from C{sender} through Postfix, on a new SMTP connection."""
    with smtplib.SMTP("127.0.0.1", postfix.smtp_port, timeout=60) as smtp:
        smtp.sendmail(
            sender,
            [RECIPIENT],
            f"From: {sender}\r\nTo: {RECIPIENT}\r\nSubject: message {number}\r\n\r\nHello\r\n",
        )


def refused(postfix: PostfixInstance, sender: str = LIMITED) -> smtplib.SMTPDataError:
    """Send one message that Postfix must refuse at the end of DATA; the refusal."""
    with pytest.raises(smtplib.SMTPDataError) as error:
        send(postfix, sender)
    return error.value


def test_quota_enforced(
    start_daemon: StartDaemon,
    start_postfix: StartPostfix,
    redis_server: RedisServer,
    fake_userli: FakeUserliServer,
    lmtp_sink: LMTPSink,
) -> None:
    """
    With C{per_hour = 3}: messages 1 to 3 are delivered, message 4 is
    refused with the configured text, and the count survives a restart of
    the daemon (it lives in Redis).  Other senders are not affected.
    """
    fake_userli.data.quotas[LIMITED] = (3, 0)
    daemon = start_daemon(redis=redis_server, env={"RATE_LIMIT_MESSAGE": MESSAGE_TEXT})
    wait_for_daemons(redis_server, 1)
    postfix = start_postfix(daemon)

    send(postfix, number=1)
    send(postfix, number=2)
    daemon.stop()
    daemon.start()
    wait_for_daemons(redis_server, 1)
    send(postfix, number=3)
    error = refused(postfix)
    assert error.smtp_code == 554
    assert MESSAGE_TEXT.encode() in error.smtp_error
    assert b"END-OF-MESSAGE" in error.smtp_error

    # alice@example.org has no limits.
    send(postfix, sender="alice@example.org", number=5)
    deliveries = lmtp_sink.wait_for(4)
    assert [d.mail_from for d in deliveries] == [LIMITED] * 3 + ["alice@example.org"]
    assert all(d.recipients == (RECIPIENT,) for d in deliveries)
    assert [r.key for r in fake_userli.fake.requests("smtp_quota")].count(LIMITED) >= 1


def test_api_down_mail_accepted(
    start_daemon: StartDaemon,
    start_postfix: StartPostfix,
    fake_userli: FakeUserliServer,
    lmtp_sink: LMTPSink,
) -> None:
    """
    The Userli API failing: the daemon cannot know the quota and lets mail
    through (fail-open), however much is sent.
    """
    fake_userli.data.quotas[LIMITED] = (3, 0)
    daemon = start_daemon(env={"QUOTA_CACHE_TTL": "0"})
    postfix = start_postfix(daemon)
    fake_userli.fake.set_mode(ERROR)
    for number in range(5):
        send(postfix, number=number)
    assert len(lmtp_sink.wait_for(5)) == 5
    errors = metric(daemon.metrics_url, "policy_requests_total", '{action="error",stage="check"}')
    assert errors == 5


def test_redis_down_mail_accepted(
    start_daemon: StartDaemon,
    start_postfix: StartPostfix,
    redis_server: RedisServer,
    fake_userli: FakeUserliServer,
    lmtp_sink: LMTPSink,
) -> None:
    """Redis down: the windows cannot be kept, mail passes (fail-open)."""
    fake_userli.data.quotas[LIMITED] = (3, 0)
    daemon = start_daemon(redis=redis_server)
    wait_for_daemons(redis_server, 1)
    postfix = start_postfix(daemon)
    redis_server.stop()
    for number in range(5):
        send(postfix, number=number)
    assert len(lmtp_sink.wait_for(5)) == 5
    errors = metric(daemon.metrics_url, "ratelimit_backend_errors_total", '{operation="check"}')
    assert errors == 5
