"""
Restarts and shutdown.

SIGTERM while all three listeners are busy, with answers in flight (the
fake Userli holds each answer back for a moment): no reply on any
connection is torn, every request the daemon had read is answered, the
rest see a clean close (Postfix then retries on a new connection), and the
process exits, successfully, within the shutdown grace plus a margin.

A restart with the same Redis keeps every rate-limit window: a sender's
quota is used up before the restart and stays used up after it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.fake_userli import SLOW, FakeUserliServer
from tests.integration.clients import (
    Closed,
    PolicyClient,
    ProtocolViolation,
    SASLClient,
    SocketmapClient,
    end_of_message,
)
from tests.integration.conftest import DOMAIN, StartDaemon
from tests.integration.harness import RedisServer, wait_for
from userli_postfix.daemon import SHUTDOWN_GRACE

pytestmark = pytest.mark.integration

#: The fake Userli holds every answer back this long, so that requests are
#: in flight when SIGTERM arrives; well within the shutdown grace.
API_DELAY = 1.0
#: A request sent this long before SIGTERM has surely been read by the
#: daemon (it is then waiting for the fake Userli).
READ_MARGIN = 0.3
#: The daemon must be gone this long after SIGTERM at the latest.
EXIT_BOUND = SHUTDOWN_GRACE + 5.0


@dataclass
class Outcome:
    listener: str
    sent: float
    result: str  # "answered", "closed", or the protocol violation


class Load:
    """Clients on every listener, each asking over and over on its connection."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def client(
        self, name: str, connect: Callable[[], object], ask: Callable[[object], None]
    ) -> None:
        try:
            client = connect()
        except OSError:
            return
        try:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    ask(client)
                    result = "answered"
                except (Closed, ConnectionResetError):
                    result = "closed"
                except ProtocolViolation as error:
                    result = f"{type(error).__name__}: {error}"
                except AssertionError as error:
                    result = f"wrong answer: {error}"
                with self.lock:
                    self.outcomes.append(Outcome(name, sent, result))
                if result != "answered":
                    return
        finally:
            client.close()  # type: ignore[attr-defined]

    def start(
        self, name: str, count: int, connect: Callable[[], object], ask: Callable[[object], None]
    ) -> None:
        for _ in range(count):
            thread = threading.Thread(target=self.client, args=(name, connect, ask), daemon=True)
            thread.start()
            self.threads.append(thread)

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads)


def test_sigterm_under_load(
    fake_userli: FakeUserliServer, redis_server: RedisServer, start_daemon: StartDaemon
) -> None:
    """
    SIGTERM with requests in flight on every listener: no torn reply, every
    request the daemon had read answered, clean closes for the rest, exit
    0 within the grace.
    """
    daemon = start_daemon(redis=redis_server, sasl=True, env={"LOOKUP_CACHE_TTL": "0"})
    socketmap, policy, sasl = daemon.socketmap, daemon.policy, daemon.sasl
    assert isinstance(socketmap, tuple) and policy is not None and isinstance(sasl, tuple)
    fake_userli.set_mode(SLOW, delay=API_DELAY)

    def lookup(client: object) -> None:
        assert client.ask(f"alias info@{DOMAIN}".encode()) == f"OK alice@{DOMAIN}".encode()  # type: ignore[attr-defined]

    def police(client: object) -> None:
        assert client.ask(end_of_message(f"bob@{DOMAIN}")) == "DUNNO"  # type: ignore[attr-defined]

    def login(client: object) -> None:
        assert client.plain(f"alice@{DOMAIN}", "alice-password").startswith(b"OK\t")  # type: ignore[attr-defined]

    load = Load()
    load.start("socketmap", 8, lambda: SocketmapClient(socketmap), lookup)
    load.start("policy", 4, lambda: PolicyClient(policy), police)
    load.start("sasl", 4, lambda: SASLClient(sasl), login)
    wait_for(lambda: len(load.outcomes) >= 40, "answers before the shutdown")

    terminated = time.monotonic()
    daemon.signal(signal.SIGTERM)
    status = daemon.wait(timeout=EXIT_BOUND + 30)
    exited = time.monotonic()
    load.join()

    assert status == 0, daemon.output()[-3000:]
    assert exited - terminated < EXIT_BOUND
    results = Counter(o.result for o in load.outcomes)
    violations = [o for o in load.outcomes if o.result not in ("answered", "closed")]
    assert violations == [], violations[:5]
    # Read before the signal: answered, however slow the API was.
    unanswered = [
        o for o in load.outcomes if o.sent < terminated - READ_MARGIN and o.result != "answered"
    ]
    assert unanswered == [], unanswered[:5]
    # Requests were in flight on every listener when the signal came, and
    # were answered after it.
    for name in ("socketmap", "policy", "sasl"):
        assert any(
            o.listener == name and o.sent < terminated and o.result == "answered"
            for o in load.outcomes
        )
    print(
        f"\nSIGTERM under load: {dict(results)}; exit {exited - terminated:.1f} s after the signal"
    )


def test_restart_keeps_windows(
    fake_userli: FakeUserliServer, redis_server: RedisServer, start_daemon: StartDaemon
) -> None:
    """
    A sender's quota used up before a restart stays used up after it: the
    windows live in Redis, not in the process.
    """
    limited = end_of_message(f"limited@{DOMAIN}")
    first = start_daemon(redis=redis_server)
    assert first.policy is not None
    with PolicyClient(first.policy) as client:
        assert [client.ask(limited) for _ in range(2)] == ["DUNNO", "DUNNO"]
        assert client.ask(limited).startswith("REJECT ")
    assert first.stop() == 0

    second = start_daemon(redis=redis_server)
    assert second.policy is not None
    with PolicyClient(second.policy) as client:
        assert client.ask(limited).startswith("REJECT ")
    assert redis_server.command("ZCARD", f"userli:ratelimit:sender:limited@{DOMAIN}") == 4


def test_sigterm_with_hung_api(fake_userli: FakeUserliServer, start_daemon: StartDaemon) -> None:
    """
    SIGTERM while the API hangs: the daemon still exits within the grace
    (plus a margin), and each client in flight gets an answer (the API
    deadline's TEMP, or a failed login) or a clean close, never half a reply.
    """
    daemon = start_daemon(sasl=True, env={"LOOKUP_CACHE_TTL": "0"})
    socketmap, sasl = daemon.socketmap, daemon.sasl
    assert isinstance(socketmap, tuple) and isinstance(sasl, tuple)
    fake_userli.set_mode(SLOW, delay=600.0)
    outcomes: list[str] = []

    def ask(connect: Callable[[], object], question: Callable[[object], bytes]) -> None:
        client = connect()
        try:
            outcomes.append(question(client).split(b"\t")[0].split(b" ")[0].decode())
        except (Closed, ConnectionResetError):
            outcomes.append("closed")
        except ProtocolViolation as error:
            outcomes.append(f"{type(error).__name__}: {error}")
        finally:
            client.close()  # type: ignore[attr-defined]

    asking = [
        threading.Thread(
            target=ask,
            args=(
                lambda: SocketmapClient(socketmap),
                lambda c: c.ask(f"mailbox alice@{DOMAIN}".encode()),  # type: ignore[attr-defined]
            ),
        )
        for _ in range(4)
    ] + [
        threading.Thread(
            target=ask,
            args=(
                lambda: SASLClient(sasl),
                lambda c: c.plain(f"alice@{DOMAIN}", "alice-password"),  # type: ignore[attr-defined]
            ),
        )
        for _ in range(4)
    ]
    for thread in asking:
        thread.start()
    # The four lookups of one key share one API call.
    wait_for(
        lambda: len(fake_userli.requests("auth")) == 4 and bool(fake_userli.requests("mailbox")),
        "the requests to reach the API",
    )
    terminated = time.monotonic()
    daemon.signal(signal.SIGTERM)
    status = daemon.wait(timeout=EXIT_BOUND + 30)
    exited = time.monotonic()
    for thread in asking:
        thread.join(timeout=60)
    assert status == 0, daemon.output()[-3000:]
    assert exited - terminated < EXIT_BOUND
    assert len(outcomes) == 8 and set(outcomes) <= {"TEMP", "FAIL", "closed"}, outcomes
    print(
        f"\nSIGTERM with the API hung: {sorted(outcomes)}; "
        f"exit {exited - terminated:.1f} s after the signal"
    )
