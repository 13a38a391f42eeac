"""
The outage test: all three listeners under steady concurrent traffic while
the fake Userli cycles through every way it can fail and Redis is killed,
restarted and frozen.

Threads keep Postfix-like connections open (one request at a time, the
connection reused) to the socketmap, policy and SASL listeners.  A driver
switches the fake Userli between normal and slow-beyond-the-deadline, 500,
refused, HTML, JSON of the wrong type, empty body and redirect, and
independently kills Redis (SIGKILL), brings it back empty, and later
freezes it (SIGSTOP) and thaws it.  Every answer is recorded with the
times it was asked and answered, and judged against the state of the world
while it was in flight:

 - the daemon never dies, and writes no traceback;
 - every request gets a well-formed answer, SASL within 10 s (Postfix's
   deadline for an auth reply), socketmap and policy well within it too;
 - while the API fails a lookup is C{TEMP} (or a cached C{OK}), never
   C{NOTFOUND}; a login is C{FAIL}; the policy service enforces the last
   quota it learned (C{REJECT} for a sender over it);
 - while the API hangs, the circuit breaker answers most lookups at once
   (C{TEMP} well before the deadline), and for at most
   L{BREAKER_RECOVERY} after the API is back;
 - while Redis is down or frozen the policy service says C{DUNNO}; once it
   is back the quota is enforced again (C{REJECT});
 - after the last fault everything is right again, in the same process;
 - the daemon's memory after the run is within L{MEMORY_BOUND} of what it
   was after the warm-up.

The figures (requests answered, worst answer time, memory) are printed;
C{docs/reliability.md} records a run.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fake_userli import (
    EMPTY,
    ERROR,
    GARBAGE,
    NORMAL,
    REDIRECT,
    REFUSED,
    SLOW,
    WRONG_TYPE,
    FakeUserliServer,
)
from tests.integration.clients import (
    Closed,
    PolicyClient,
    SASLClient,
    SocketmapClient,
    end_of_message,
)
from tests.integration.conftest import DOMAIN, StartDaemon, userli_data
from tests.integration.harness import Daemon, RedisServer, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

#: Postfix waits 10 s for a SASL reply; socketmap and policy clients wait
#: 100 s, but nothing here may come near that: the API deadline is 5 s, a
#: Redis command's 0.5 s, the SASL failure delay 2 s.
SASL_DEADLINE = 10.0
LOOKUP_DEADLINE = 10.0
POLICY_DEADLINE = 10.0

#: How much the daemon's resident memory may grow from the end of the
#: warm-up to the end of the run.  Python rarely gives memory back to the
#: system, so the bound is for leaks that grow with traffic (tens of
#: thousands of requests here), not for allocator noise.
MEMORY_BOUND = 16 * 1024 * 1024

#: How soon after Redis is back (restarted or thawed) the daemon must use it
#: again: the reconnection back-off is capped at half a second; the rest is
#: room for a busy machine.
REDIS_RECOVERY = 3.0

#: How long after a Userli fault ends answers may still be those of the
#: fault: the circuit breaker lets normal service resume within 2 s of
#: Userli's return; the rest is room for a busy machine.
BREAKER_RECOVERY = 3.0

#: The fake Userli holds its answers back this long in slow mode: beyond
#: the daemon's 5 s API deadline.
SLOW_DELAY = 8.0

REJECT = "REJECT Rate limit exceeded, please try again later"
OVER = f"over@{DOMAIN}"
ALICE = f"alice@{DOMAIN}"
ALICE_PASSWORD = "alice-password"

# The fault schedule: (mode of the fake Userli, seconds).
USERLI_SCHEDULE = [
    (NORMAL, 4),
    (SLOW, 8),
    (NORMAL, 3),
    (ERROR, 4),
    (NORMAL, 3),
    (REFUSED, 4),
    (NORMAL, 3),
    (GARBAGE, 4),
    (NORMAL, 3),
    (WRONG_TYPE, 3),
    (EMPTY, 3),
    (REDIRECT, 3),
    (NORMAL, 3),
    (ERROR, 3),
    (NORMAL, 3),
]
# Redis, on its own clock: (seconds after the start, action).
REDIS_SCHEDULE = [(6.0, "kill"), (16.0, "start"), (30.0, "freeze"), (36.0, "thaw")]

UP, DOWN, RECONNECTING = "up", "down", "reconnecting"


@dataclass
class Interval:
    start: float
    end: float = float("inf")


@dataclass
class Timeline:
    """When each state held; intervals of one state never overlap."""

    states: dict[str, list[Interval]] = field(default_factory=dict)
    current: str | None = None

    def enter(self, state: str, before: float, after: float) -> None:
        """
        C{state} replaces the current one: the old one held until C{after}
        (the switch had surely happened), the new one from C{before} (it
        may have begun).
        """
        if self.current is not None:
            self.states[self.current][-1].end = after
        self.states.setdefault(state, []).append(Interval(before))
        self.current = state

    def during(self, start: float, end: float) -> set[str]:
        """Every state that held at some moment of [start, end]."""
        return {
            state
            for state, intervals in self.states.items()
            for i in intervals
            if i.start <= end and start <= i.end
        }


@dataclass
class Answer:
    listener: str
    kind: str
    started: float
    finished: float
    reply: str


class Traffic:
    """
    Postfix-like clients in threads, each on its own kept-open connection,
    until told to stop.  Every answer, clean close and protocol violation
    is recorded.
    """

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.answers: list[Answer] = []
        self.closes: Counter[str] = Counter()
        self.violations: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._unique = itertools.count()

    def record(self, answer: Answer) -> None:
        with self._lock:
            self.answers.append(answer)

    def _loop(
        self, name: str, connect: Callable[[], object], ask: Callable[[object], None]
    ) -> None:
        while not self._stop.is_set():
            try:
                client = connect()
            except OSError as error:
                self.violations.append(f"{name}: cannot connect: {error}")
                return
            try:
                while not self._stop.is_set():
                    ask(client)
                    time.sleep(0.01)
            except Closed:
                with self._lock:
                    self.closes[name] += 1
            except Exception as error:
                self.violations.append(f"{name}: {type(error).__name__}: {error}")
                return
            finally:
                client.close()  # type: ignore[attr-defined]

    def _socketmap(self, client: object) -> None:
        assert isinstance(client, SocketmapClient)
        n = next(self._unique)
        for kind, request in (
            ("ok", b"alias info@" + DOMAIN.encode()),
            ("ok", b"senders team@" + DOMAIN.encode()),
            ("ok", b"domain " + DOMAIN.encode()),
            ("notfound", b"mailbox nobody-%d@%s" % (n, DOMAIN.encode())),
        ):
            started = time.monotonic()
            reply = client.ask(request).decode("utf-8")
            self.record(Answer("socketmap", kind, started, time.monotonic(), reply))

    def _policy(self, client: object) -> None:
        assert isinstance(client, PolicyClient)
        for kind, attributes in (
            ("over", end_of_message(OVER)),
            ("unlimited", end_of_message(ALICE, sasl_username=ALICE)),
            ("rcpt", {"request": "smtpd_access_policy", "protocol_state": "RCPT"}),
        ):
            started = time.monotonic()
            action = client.ask(attributes)
            self.record(Answer("policy", kind, started, time.monotonic(), action))

    def _sasl(self, client: object) -> None:
        assert isinstance(client, SASLClient)
        for kind, password in (("good", ALICE_PASSWORD), ("good", ALICE_PASSWORD), ("bad", "x")):
            started = time.monotonic()
            line = client.plain(ALICE, password).decode("utf-8")
            self.record(Answer("sasl", kind, started, time.monotonic(), line.split("\t")[0]))

    def start(self, socketmap: int = 6, policy: int = 3, sasl: int = 3) -> None:
        daemon = self.daemon
        socketmap_at, policy_at, sasl_at = daemon.socketmap, daemon.policy, daemon.sasl
        assert socketmap_at is not None and policy_at is not None and sasl_at is not None
        plan: list[tuple[str, Callable[[], object], Callable[[object], None]]] = [
            *[("socketmap", lambda: SocketmapClient(socketmap_at), self._socketmap)] * socketmap,
            *[("policy", lambda: PolicyClient(policy_at), self._policy)] * policy,
            *[("sasl", lambda: SASLClient(sasl_at), self._sasl)] * sasl,
        ]
        for name, connect, ask in plan:
            thread = threading.Thread(target=self._loop, args=(name, connect, ask), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self._threads), "a client thread hangs"


def resident_memory(pid: int) -> int:
    """The resident set size of C{pid}, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def probe_enforcing(daemon: Daemon, deadline: float = 30.0) -> None:
    """Send OVER's messages until one is refused: the windows are in use again."""
    assert daemon.policy is not None

    def refused() -> bool:
        with PolicyClient(daemon.policy) as client:  # type: ignore[arg-type]
            return client.ask(end_of_message(OVER)) == REJECT

    wait_for(refused, "the policy service to enforce quotas again", deadline=deadline)


@pytest.fixture
def redis_fixed(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis the test may kill, restart and freeze (always thawed and stopped at the end)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        if server.running:
            os.kill(server.pid, signal.SIGCONT)
        server.kill()


@pytest.fixture
def userli_with_over(fake_userli: FakeUserliServer) -> FakeUserliServer:
    """The usual fake Userli, plus OVER: a sender whose quota is one message."""
    data = userli_data()
    data.users[OVER] = "over-password"
    data.quotas[OVER] = (1, 1)
    fake_userli.set_data(data)
    return fake_userli


def judge(answer: Answer, userli: Timeline, redis: Timeline) -> str | None:
    """Why C{answer} is wrong for the states it was in flight in, or C{None}."""
    modes = userli.during(answer.started, answer.finished)
    api_ok = NORMAL in modes
    # The breaker may still fail calls fast a moment after a fault ends.
    api_failing = bool(userli.during(answer.started - BREAKER_RECOVERY, answer.finished) - {NORMAL})
    stores = redis.during(answer.started, answer.finished)
    reply, kind = answer.reply, answer.kind
    allowed: set[str] = set()
    if answer.listener == "socketmap":
        right = {
            "ok": {f"OK alice@{DOMAIN}", f"OK alice@{DOMAIN},bob@{DOMAIN}", "OK 1"},
            "notfound": {"NOTFOUND "},
        }[kind]
        if api_ok:
            allowed |= right
        if api_failing:
            allowed |= {"TEMP"} | (right if kind == "ok" else set())
        word = "TEMP" if reply.startswith("TEMP ") else reply
        return None if word in allowed else f"{reply!r} for {kind} with API {modes}"
    if answer.listener == "policy":
        if kind in ("unlimited", "rcpt"):
            return None if reply == "DUNNO" else f"{reply!r} for {kind}"
        # OVER is over quota whenever its window can be read: REJECT with the
        # windows in use (while the API fails, with the last quota learned),
        # DUNNO (fail open) when Redis is down.
        if stores & {DOWN, RECONNECTING}:
            allowed.add("DUNNO")
        if stores & {UP, RECONNECTING}:
            allowed.add(REJECT)
        return None if reply in allowed else f"{reply!r} with API {modes}, Redis {stores}"
    if kind == "bad":
        return None if reply == "FAIL" else f"{reply!r} for a wrong password"
    if api_ok:
        allowed.add("OK")
    if api_failing:
        allowed.add("FAIL")
    return None if reply in allowed else f"{reply!r} for a good login with API {modes}"


def test_outages(
    userli_with_over: FakeUserliServer, redis_fixed: RedisServer, start_daemon: StartDaemon
) -> None:
    """
    Steady traffic on all three listeners through every Userli fault and a
    Redis crash, restart and freeze: right, timely, well-formed answers all
    along, recovery without a restart, and bounded memory.
    """
    fake_userli = userli_with_over
    daemon = start_daemon(redis=redis_fixed, sasl=True)
    pid = daemon.pid
    probe_enforcing(daemon)

    userli, redis = Timeline(), Timeline()
    now = time.monotonic()
    userli.enter(NORMAL, now, now)
    redis.enter(UP, now, now)
    traffic = Traffic(daemon)
    traffic.start()
    faults: Counter[str] = Counter()
    try:
        # Warm-up: every path once, then the memory baseline.
        time.sleep(3.0)
        memory_before = resident_memory(pid)

        begin = time.monotonic()
        redis_plan = list(REDIS_SCHEDULE)
        for mode, seconds in USERLI_SCHEDULE:
            before = time.monotonic()
            fake_userli.set_mode(mode, delay=SLOW_DELAY if mode == SLOW else 0.0)
            userli.enter(mode, before, time.monotonic())
            if mode != NORMAL:
                faults[f"Userli {mode}"] += 1
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                assert daemon.running, "the daemon died:\n" + daemon.output()
                if redis_plan and time.monotonic() - begin >= redis_plan[0][0]:
                    action = redis_plan.pop(0)[1]
                    before = time.monotonic()
                    if action == "kill":
                        redis_fixed.kill()
                        redis.enter(DOWN, before, time.monotonic())
                    elif action == "freeze":
                        os.kill(redis_fixed.pid, signal.SIGSTOP)
                        redis.enter(DOWN, before, time.monotonic())
                    elif action == "thaw":
                        os.kill(redis_fixed.pid, signal.SIGCONT)
                        redis.enter(RECONNECTING, before, time.monotonic())
                    else:
                        redis_fixed.start()
                        redis.enter(RECONNECTING, before, time.monotonic())
                    if action in ("kill", "freeze"):
                        faults[f"Redis {action}"] += 1
                if redis.current == RECONNECTING and NORMAL == userli.current:
                    # Up again once the daemon enforces quotas with it.
                    before = time.monotonic()
                    probe_enforcing(daemon)
                    redis.enter(UP, before, time.monotonic())
                time.sleep(0.05)
        assert not redis_plan, "the Redis schedule did not fit in the Userli schedule"
        assert redis.current == UP

        # The faults are over: a last stretch in which everything must be right.
        calm = time.monotonic()
        time.sleep(4.0)
    finally:
        traffic.stop()
    end = time.monotonic()

    assert traffic.violations == []
    assert daemon.running and daemon.pid == pid, "the daemon was restarted"
    # Postfix reconnects when a connection is closed, but nothing here
    # should make the daemon close one: no request is malformed and no
    # connection idles.
    assert sum(traffic.closes.values()) == 0, traffic.closes

    wrong = []
    for answer in traffic.answers:
        problem = judge(answer, userli, redis)
        if problem is not None:
            wrong.append(f"{answer.listener} at {answer.started - begin:.1f} s: {problem}")
    assert wrong == [], "\n".join(wrong[:20])

    worst: dict[str, float] = {}
    for answer in traffic.answers:
        elapsed = answer.finished - answer.started
        worst[answer.listener] = max(worst.get(answer.listener, 0.0), elapsed)
    assert worst["sasl"] < SASL_DEADLINE, worst
    assert worst["socketmap"] < LOOKUP_DEADLINE, worst
    assert worst["policy"] < POLICY_DEADLINE, worst

    # After the faults: exactly right, every listener.
    final = [a for a in traffic.answers if a.started > calm]
    assert {a.listener for a in final} == {"socketmap", "policy", "sasl"}
    for answer in final:
        if answer.listener == "socketmap":
            assert answer.reply.startswith("OK" if answer.kind == "ok" else "NOTFOUND")
        elif answer.listener == "policy":
            assert answer.reply == (REJECT if answer.kind == "over" else "DUNNO")
        else:
            assert answer.reply == ("OK" if answer.kind == "good" else "FAIL")
    # The outages were seen: TEMP lookups, failed logins, fail-open quotas.
    replies = Counter((a.listener, a.kind, a.reply.split(" ")[0]) for a in traffic.answers)
    assert replies[("socketmap", "notfound", "TEMP")] > 0
    assert replies[("sasl", "good", "FAIL")] > 0
    assert replies[("policy", "over", "DUNNO")] > 0
    # While the API hung, the breaker answered lookups at once instead of
    # after the 5 s deadline.
    hung = userli.states[SLOW][0]
    fast_temp = [
        a
        for a in traffic.answers
        if a.listener == "socketmap"
        and a.reply.startswith("TEMP")
        and hung.start + 5.5 < a.started < hung.end
        and a.finished - a.started < 1.0
    ]
    assert fast_temp, "no fast TEMP while Userli hung: the circuit breaker did not open"

    memory_after = resident_memory(pid)
    assert memory_after - memory_before < MEMORY_BOUND, (memory_before, memory_after)

    output = daemon.output()
    assert "Traceback" not in output and "Unhandled" not in output, output[-4000:]
    status = daemon.stop()
    assert status == 0, daemon.output()[-2000:]

    per_listener = Counter(a.listener for a in traffic.answers)
    print(
        f"\nOutage test: {end - begin:.0f} s, faults injected {dict(faults)}; "
        f"answered {dict(per_listener)} ({len(traffic.answers)} in all); "
        f"worst answer (ms) { ({k: round(v * 1000) for k, v in worst.items()}) }; "
        f"replies {dict(replies)}; fast TEMP while Userli hung {len(fast_temp)}; "
        f"memory {memory_before / 2**20:.1f} MiB after warm-up, "
        f"{memory_after / 2**20:.1f} MiB after the run"
    )


def test_redis_frozen(
    userli_with_over: FakeUserliServer, redis_fixed: RedisServer, start_daemon: StartDaemon
) -> None:
    """
    Redis freezes (SIGSTOP) long enough for the daemon to drop its silent
    connections and for its reconnection attempts to hang too: the policy
    service fails open meanwhile, and enforces quotas again once Redis
    thaws, without a restart.
    """
    daemon = start_daemon(redis=redis_fixed)
    assert daemon.policy is not None
    probe_enforcing(daemon)
    os.kill(redis_fixed.pid, signal.SIGSTOP)
    try:
        # Longer than the 2 s reply timeout, the first reconnection
        # delay and a second 2 s timeout for the reconnection's SELECT.
        until = time.monotonic() + 8.0
        with PolicyClient(daemon.policy) as client:
            while time.monotonic() < until:
                assert client.ask(end_of_message(OVER)) == "DUNNO"
                time.sleep(0.2)
    finally:
        os.kill(redis_fixed.pid, signal.SIGCONT)
    thawed = time.monotonic()
    probe_enforcing(daemon)
    assert daemon.running
    print(f"\nRedis frozen 8 s: quotas enforced again {time.monotonic() - thawed:.1f} s after")


@pytest.mark.parametrize("down", [3.0, 12.0])
def test_redis_restarted(
    down: float,
    userli_with_over: FakeUserliServer,
    redis_fixed: RedisServer,
    start_daemon: StartDaemon,
) -> None:
    """
    Redis is killed and comes back empty after C{down} seconds: the policy
    service fails open meanwhile and enforces quotas again soon after Redis
    is back, without a restart.
    """
    daemon = start_daemon(redis=redis_fixed)
    assert daemon.policy is not None
    probe_enforcing(daemon)
    redis_fixed.kill()
    until = time.monotonic() + down
    with PolicyClient(daemon.policy) as client:
        while time.monotonic() < until:
            assert client.ask(end_of_message(OVER)) == "DUNNO"
            time.sleep(0.2)
    redis_fixed.start()
    back = time.monotonic()
    probe_enforcing(daemon)
    recovered = time.monotonic() - back
    assert daemon.running
    assert recovered < REDIS_RECOVERY, recovered
    print(f"\nRedis down {down:g} s: quotas enforced again {recovered:.1f} s after it was back")


#: How soon after Redis is back (restarted empty, after a long outage) an
#: answer must be stored in it again and found there: the issue's bound.
CACHE_RECOVERY = 2.0


def test_cache_back_after_redis_outage(
    fake_userli: FakeUserliServer, redis_fixed: RedisServer, start_daemon: StartDaemon
) -> None:
    """
    Redis is away for 15 s while lookups keep coming (long enough for any
    growing reconnection back-off to reach its cap), then back, empty.
    Within 2 s answers are stored in Redis again before they are given;
    from then on an answer just given is found there: the same question
    asked right after costs no second Userli call, neither to this daemon
    nor to a second, idle one on the same Redis, and is still OK when
    Userli fails at that very moment.
    """
    env = {"POSTFIX_RECIPIENT_DELIMITER": "+"}
    first = start_daemon(env=env, redis=redis_fixed)
    second = start_daemon(env=env, redis=redis_fixed)
    assert first.socketmap is not None and second.socketmap is not None
    redis_fixed.kill()
    stop = threading.Event()
    asked = itertools.count()

    def traffic() -> None:
        with SocketmapClient(first.socketmap) as client:  # type: ignore[arg-type]
            while not stop.is_set():
                reply = client.ask(b"mailbox alice+during%d@%s" % (next(asked), DOMAIN.encode()))
                assert reply == b"OK 1", reply
                time.sleep(0.01)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    time.sleep(15.0)
    redis_fixed.start()
    back = time.monotonic()
    stop.set()
    thread.join()

    probe = 0
    while True:
        probe += 1
        key = f"alice+after{probe}@{DOMAIN}"
        with SocketmapClient(first.socketmap) as client:
            assert client.ask(f"mailbox {key}".encode()) == b"OK 1"
        # Written before it was given: in Redis the moment the answer is.
        if redis_fixed.command("GET", f"userli:lookup:mailbox:{key}") == "OK 1":
            break
        assert time.monotonic() - back < 10.0, "the cache never came back"
        time.sleep(0.02)
    recovered = time.monotonic() - back
    assert recovered < CACHE_RECOVERY, recovered
    # By the bound every process is caching again, the idle second daemon
    # too: an answer just given is in Redis for everyone.
    time.sleep(max(0.0, CACHE_RECOVERY - (time.monotonic() - back)))
    key = f"alice+settled@{DOMAIN}"
    with SocketmapClient(first.socketmap) as client:
        assert client.ask(f"mailbox {key}".encode()) == b"OK 1"
    calls = len(fake_userli.requests("mailbox"))
    fake_userli.set_mode(ERROR)
    try:
        for daemon in (second, first):
            with SocketmapClient(daemon.socketmap) as client:  # type: ignore[arg-type]
                assert client.ask(f"mailbox {key}".encode()) == b"OK 1"
    finally:
        fake_userli.set_mode(NORMAL)
    assert len(fake_userli.requests("mailbox")) == calls
    # Hundreds of failed reconnection attempts, said once, and the end once.
    output = first.output()
    assert output.count("Redis not reachable") == 1, output[-3000:]
    assert output.count("Redis reachable again") == 1, output[-3000:]
    print(
        f"\nRedis down 15 s under traffic ({next(asked)} lookups): answers stored and "
        f"found again {recovered:.2f} s after it was back (probe {probe})"
    )
