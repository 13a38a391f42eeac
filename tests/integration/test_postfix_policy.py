"""
End to end: a real, private Postfix asks the daemon at the end of every
message (C{smtpd_end_of_data_restrictions = check_policy_service ...}) and
enforces the sender's quota; mail is sent with C{smtplib} and delivered to
an LMTP sink in the test.
"""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fake_userli import ERROR, TOKEN, FakeUserliServer
from tests.integration.conftest import StartDaemon
from tests.integration.harness import Daemon, RedisServer, run_daemon, wait_for
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


def start_with_action(
    start_daemon: StartDaemon,
    start_postfix: StartPostfix,
    redis_server: RedisServer,
    fake_userli: FakeUserliServer,
    action: str,
) -> tuple[Daemon, PostfixInstance]:
    """A daemon with C{RATE_LIMIT_ACTION=action}, C{limited@} at one message an hour."""
    fake_userli.data.quotas[LIMITED] = (1, 0)
    daemon = start_daemon(
        redis=redis_server,
        env={"RATE_LIMIT_ACTION": action, "RATE_LIMIT_MESSAGE": MESSAGE_TEXT},
    )
    wait_for_daemons(redis_server, 1)
    return daemon, start_postfix(daemon)


def assert_counted(daemon: Daemon, action: str) -> None:
    """The message over quota is counted under its action, and as over quota."""
    labels = f'{{action="{action}",stage="check"}}'
    assert metric(daemon.metrics_url, "policy_requests_total", labels) == 1
    assert metric(daemon.metrics_url, "quota_exceeded_total") == 1


@pytest.mark.parametrize("action", ["DEFER", "DEFER_IF_PERMIT"])
def test_action_defer(
    start_daemon: StartDaemon,
    start_postfix: StartPostfix,
    redis_server: RedisServer,
    fake_userli: FakeUserliServer,
    lmtp_sink: LMTPSink,
    action: str,
) -> None:
    """
    C{RATE_LIMIT_ACTION=DEFER} (and C{DEFER_IF_PERMIT}, at the end of
    DATA where nothing comes after): the message over quota gets a 4xx
    with the text, so the client keeps it and tries later; nothing bounces.
    """
    daemon, postfix = start_with_action(
        start_daemon, start_postfix, redis_server, fake_userli, action
    )
    send(postfix, number=1)
    error = refused(postfix)
    assert 400 <= error.smtp_code < 500, error
    assert MESSAGE_TEXT.encode() in error.smtp_error
    assert [d.mail_from for d in lmtp_sink.wait_for(1)] == [LIMITED]
    assert_counted(daemon, action.lower())


def test_action_hold(
    start_daemon: StartDaemon,
    start_postfix: StartPostfix,
    redis_server: RedisServer,
    fake_userli: FakeUserliServer,
    lmtp_sink: LMTPSink,
) -> None:
    """
    C{RATE_LIMIT_ACTION=HOLD}: the message over quota is accepted (250)
    and sits in the hold queue for an admin to release or delete.
    """
    daemon, postfix = start_with_action(
        start_daemon, start_postfix, redis_server, fake_userli, "HOLD"
    )
    send(postfix, number=1)
    lmtp_sink.wait_for(1)
    send(postfix, number=2)
    wait_for(
        lambda: any(m.get("queue_name") == "hold" for m in postfix.queued()),
        "the message in the hold queue",
    )
    [held] = postfix.queued()
    assert held["sender"] == LIMITED
    assert held["queue_name"] == "hold"
    assert len(lmtp_sink.deliveries) == 1
    assert_counted(daemon, "hold")


def test_action_warn(
    start_daemon: StartDaemon,
    start_postfix: StartPostfix,
    redis_server: RedisServer,
    fake_userli: FakeUserliServer,
    lmtp_sink: LMTPSink,
) -> None:
    """
    C{RATE_LIMIT_ACTION=WARN}: the message over quota is accepted (250) and
    delivered, and Postfix logs a warning with the text: a warn-only roll-out.
    """
    daemon, postfix = start_with_action(
        start_daemon, start_postfix, redis_server, fake_userli, "WARN"
    )
    send(postfix, number=1)
    send(postfix, number=2)
    assert [d.mail_from for d in lmtp_sink.wait_for(2)] == [LIMITED, LIMITED]
    postfix.wait_for_log("warn: END-OF-MESSAGE from")
    [line] = [line for line in postfix.log().splitlines() if "warn: END-OF-MESSAGE" in line]
    assert MESSAGE_TEXT in line
    assert f"from=<{LIMITED}>" in line
    assert_counted(daemon, "warn")


def test_action_invalid(tmp_path: Path, fake_userli: FakeUserliServer) -> None:
    """An action Postfix does not have: the daemon refuses to start, naming the variable."""
    status, output = run_daemon(
        {"USERLI_TOKEN": TOKEN, "USERLI_BASE_URL": fake_userli.url, "RATE_LIMIT_ACTION": "BOUNCE"},
        tmp_path,
    )
    assert status == 2, output
    assert "configuration error: RATE_LIMIT_ACTION: 'BOUNCE' is not one of" in output


def test_identity_sasl(
    start_daemon: StartDaemon,
    redis_server: RedisServer,
    fake_userli: FakeUserliServer,
    lmtp_sink: LMTPSink,
) -> None:
    """
    C{RATE_LIMIT_IDENTITY=sasl}, with the policy asked on port 25 too (set
    in main.cf) and on a submission port (the README's C{-o
    smtpd_end_of_data_restrictions=$userli_policy}): strangers who forge
    C{limited@} as the sender on port 25 are not counted, so the user,
    logged in on submission, still has the whole quota (2 an hour).
    """
    daemon = start_daemon(redis=redis_server, sasl=True, env={"RATE_LIMIT_IDENTITY": "sasl"})
    wait_for_daemons(redis_server, 1)
    assert daemon.policy is not None and isinstance(daemon.sasl, tuple)
    policy_host, policy_port = daemon.policy
    sasl_host, sasl_port = daemon.sasl
    postfix = PostfixInstance(
        lmtp_sink.port,
        main={
            "userli_policy": f"check_policy_service inet:{policy_host}:{policy_port}",
            "smtpd_end_of_data_restrictions": "$userli_policy",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": f"inet:{sasl_host}:{sasl_port}",
        },
    )
    submission = postfix.add_smtpd(
        {
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_end_of_data_restrictions": "$userli_policy",
        }
    )
    try:
        postfix.start()
        for number in range(4):
            send(postfix, number=number)
        lmtp_sink.wait_for(4)
        assert redis_server.command("EXISTS", f"userli:ratelimit:sender:{LIMITED}") == 0
        asked = metric(
            daemon.metrics_url, "policy_requests_total", '{action="dunno",stage="check"}'
        )
        assert asked == 4

        def submit(number: int) -> None:
            with smtplib.SMTP("127.0.0.1", submission, timeout=60) as smtp:
                smtp.login(LIMITED, "limited-password")
                smtp.sendmail(
                    LIMITED,
                    [RECIPIENT],
                    f"From: {LIMITED}\r\nTo: {RECIPIENT}\r\nSubject: {number}\r\n\r\nHello\r\n",
                )

        submit(1)
        submit(2)
        with pytest.raises(smtplib.SMTPDataError) as error:
            submit(3)
        assert error.value.smtp_code == 554
        assert len(lmtp_sink.wait_for(6)) == 6
        assert redis_server.command("ZCARD", f"userli:ratelimit:sender:{LIMITED}") == 3
    finally:
        postfix.cleanup()
