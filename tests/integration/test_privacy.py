"""
Secrets and privacy, checked on the real process.

The daemon runs at debug level, in both log formats, with a Redis that
needs a password, while traffic on all three listeners meets every kind of
API failure (a 500, HTML, the wrong JSON, a refused connection, a token
Userli does not accept).  Then:

 - the API token, the Redis password and every login password appear
   nowhere in what the daemon wrote (as typed, in base64, or inside a
   PLAIN response), nor in any HTTP answer of its own;
 - after traffic with hundreds of addresses, no metric label holds an
   address (or anything else from the wire): every label has a handful of
   values, whatever the traffic.
"""

from __future__ import annotations

from base64 import b64encode
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_userli import (
    ERROR,
    GARBAGE,
    NORMAL,
    REFUSED,
    WRONG_TYPE,
    FakeUserliServer,
)
from tests.integration.clients import PolicyClient, SASLClient, SocketmapClient, end_of_message
from tests.integration.conftest import DOMAIN, StartDaemon
from tests.integration.harness import RedisServer, http_get

pytestmark = pytest.mark.integration

TOKEN = "tok-5ecret-Q7vX2pLm9"
REDIS_PASSWORD = "redis-5ecret-K3jW8"
ALICE = f"alice@{DOMAIN}"
ALICE_PASSWORD = "alice-password"
#: Wrong passwords that a careless log line would show as they are.
GUESSES = ["guess-5ecret-1", "Tr0ub4dor&3", "pass word with spaces", "p\u00e4ss-\u00fcml\u00e4ut"]
#: Addresses used in the traffic, none of which may become a label value.
ADDRESSES = [f"user{n}@{DOMAIN}" for n in range(150)] + [
    f"user{n}@other.example" for n in range(150)
]


def encodings(secret: str) -> list[str]:
    """The forms in which a secret could leak: as typed and in base64."""
    raw = secret.encode("utf-8")
    forms = [secret, b64encode(raw).decode()]
    for login in (ALICE, ""):
        forms.append(b64encode(b"\0" + login.encode() + b"\0" + raw).decode())
    return forms


@pytest.fixture
def redis_with_password(tmp_path: Path) -> RedisServer:
    server = RedisServer(tmp_path / "redis")
    server.start()
    server.command("CONFIG", "SET", "requirepass", REDIS_PASSWORD)
    yield server  # type: ignore[misc]
    server.stop()


def traffic(
    daemon_socketmap: object,
    daemon_policy: object,
    daemon_sasl: object,
    addresses: list[str] = ADDRESSES,
) -> None:
    """Lookups, policy requests and logins of every kind, once."""
    with SocketmapClient(daemon_socketmap) as client:  # type: ignore[arg-type]
        for address in addresses:
            client.ask(b"alias " + address.encode())
        client.ask(b"mailbox " + ALICE.encode())
        client.ask(b"nosuchmap " + ALICE.encode())
        client.ask(b"senders " + ALICE.upper().encode())
    with PolicyClient(daemon_policy) as client:  # type: ignore[arg-type]
        for address in addresses[:60]:
            client.ask(end_of_message(address, sasl_username=address))
        client.ask(end_of_message(f"limited@{DOMAIN}"))
    with SASLClient(daemon_sasl) as client:  # type: ignore[arg-type]
        client.plain(ALICE, ALICE_PASSWORD)
        client.login(ALICE, ALICE_PASSWORD)
        for guess in GUESSES:
            client.plain(ALICE, guess)
            client.login(ALICE, guess)
            client.plain(guess, guess)
        # LOGIN without an initial response: user name and password in CONTs.
        client.sock.sendall(b"AUTH\t90\tLOGIN\tservice=smtp\n")
        client._line()
        client.sock.sendall(b"CONT\t90\t" + b64encode(ALICE.encode()) + b"\n")
        client._line()
        client.sock.sendall(b"CONT\t90\t" + b64encode(GUESSES[0].encode()) + b"\n")
        client._line()
        # A mechanism name from the wire, and a password where a user name goes.
        client.sock.sendall(b"AUTH\t91\t" + ALICE.encode() + b"\tservice=smtp\n")
        client._line()
        client.sock.sendall(
            b"AUTH\t92\tPLAIN\tservice=smtp\tresp="
            + b64encode(GUESSES[1].encode() + b"\0" + ALICE.encode() + b"\0" + GUESSES[1].encode())
            + b"\n"
        )
        client._line()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_secrets_never_written(
    log_format: str,
    fake_userli: FakeUserliServer,
    redis_with_password: RedisServer,
    start_daemon: StartDaemon,
) -> None:
    """
    At debug level, through every API failure, neither the API token, nor
    the Redis password, nor any login password is written or served.
    """
    data = fake_userli.data
    data.tokens[TOKEN] = {"postfix"}
    daemon = start_daemon(
        env={
            "USERLI_TOKEN": TOKEN,
            "REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_with_password.port}/0",
            "LOG_LEVEL": "debug",
            "LOG_FORMAT": log_format,
            "SASL_FAILURE_DELAY": "0",
        },
        sasl=True,
    )
    served: list[bytes] = []
    for mode in (NORMAL, ERROR, GARBAGE, WRONG_TYPE, REFUSED, "bad-token", NORMAL):
        if mode == "bad-token":
            fake_userli.set_mode(NORMAL)
            del data.tokens[TOKEN]
        else:
            data.tokens[TOKEN] = {"postfix"}
            fake_userli.set_mode(mode)
        # A refused connection takes Twisted's HostnameEndpoint 0.3 s to
        # report: fewer lookups while Userli is away.
        few = ADDRESSES[:: 1 if mode == NORMAL else 20]
        traffic(daemon.socketmap, daemon.policy, daemon.sasl, few)
        for path in ("/ready", "/health", "/metrics"):
            served.append(http_get(daemon.metrics_url + path)[1])
    assert any(r.endpoint == "auth" for r in fake_userli.requests())
    assert daemon.stop() == 0

    output = daemon.output()
    # Not vacuous: debug lines were written, and Redis took the password.
    assert "debug" in output
    assert "could not auth" not in output
    everything = output + "\n".join(body.decode("utf-8", "replace") for body in served)
    secrets = [TOKEN, REDIS_PASSWORD, ALICE_PASSWORD, *GUESSES]
    leaks = [form for secret in secrets for form in encodings(secret) if form in everything]
    assert leaks == []


def test_no_address_in_metric_labels(
    fake_userli: FakeUserliServer, start_daemon: StartDaemon
) -> None:
    """
    After traffic with 300 addresses on every listener, no label value of
    /metrics holds an address, a local part or a domain from the traffic,
    and no label has more than a handful of values.
    """
    daemon = start_daemon(sasl=True, env={"SASL_FAILURE_DELAY": "0"})
    for mode in (NORMAL, ERROR, NORMAL):
        fake_userli.set_mode(mode)
        traffic(daemon.socketmap, daemon.policy, daemon.sasl)
    status, body = http_get(daemon.metrics_url + "/metrics")
    assert status == 200
    values: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            for name, value in sample.labels.items():
                if name != "le":
                    values[f"{family.name}{{{name}}}"].add(value)
    assert values, "no labelled metric at all"
    wire = set(ADDRESSES) | {a.split("@")[0] for a in ADDRESSES} | {DOMAIN, "other.example"}
    wire |= {ALICE, ALICE.upper(), "alice", f"limited@{DOMAIN}", "nosuchmap", *GUESSES}
    for label, seen in values.items():
        assert not any("@" in v or v.lower() in wire for v in seen), (label, seen)
        # Map names, endpoints, status codes, outcome words: a closed set.
        assert len(seen) <= 12, (label, seen)
