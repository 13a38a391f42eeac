"""
The end-to-end scenario (C{benchmarks/run --postfix}): mail through a real,
private Postfix set up as the README says (the four maps, SASL logins,
C{reject_sender_login_mismatch}, the quota policy on a submission port),
against the daemon, the fast fake Userli and redis-server.

Two mixes, each sent once to warm the cache and then measured:

 - outbound: logged-in users (an SMTP client of our own, one login per
   session) send to addresses in four remote domains over submission;
 - inbound: outsiders (Postfix's C{smtp-source}, no login) send to local
   mailboxes and aliases on the port-25 C{smtpd}; one C{smtp-source} per
   message, which bounds the inbound rate on a small machine.

For each: messages per second (from the first message sent until the last
one is delivered), the calls that reached Userli per message by endpoint
(the fake counts them), and the CPU time of every daemon process per
message (from C{/proc}).  With C{--yardstick DIR}, the same scenario runs
against the daemon of a second checkout in the same session, so the CPU
comparison is fair.  Postfix runs as root, so this scenario does too.
"""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.compare import change
from tests.integration.postfix import (
    LMTPSink,
    PostfixInstance,
    postfix_command,
    readme_configuration,
)

# The fast fake's rules (benchmarks/fakeuserli.c): user*@example.org are
# mailboxes with the password "secret" and no quota, alias*@example.org
# lead to user1@example.org, every other domain is not Userli's.
SENDERS = [f"user{i}@example.org" for i in range(1, 5)]
REMOTE = [f"friend{j}@remote{d}.test" for d in range(1, 5) for j in range(1, 4)]
LOCAL = ["user2@example.org", "user3@example.org", "alias1@example.org", "alias2@example.org"]
OUTSIDERS = [f"someone@outside{k}.test" for k in range(1, 5)]
ENDPOINTS = ("domain", "alias", "mailbox", "senders", "smtp_quota", "auth")

# The Go program, measured the same way (see docs/performance.md).
GO_CALLS = {
    "outbound": (5.00, {"domain": 2.00, "alias": 2.00, "smtp_quota": 1.00}),
    "inbound": (
        5.83,
        {"domain": 2.00, "alias": 1.77, "senders": 1.00, "smtp_quota": 1.00, "mailbox": 0.05},
    ),
}


@dataclass(frozen=True)
class Phase:
    """One measured mix against one target."""

    target: str
    traffic: str
    messages: int
    seconds: float
    calls: dict[str, int]
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    def per_message(self, endpoint: str) -> float:
        return self.calls.get(endpoint, 0) / self.messages

    @property
    def lookups_per_message(self) -> float:
        """Calls per message without logins (what the Go figures count)."""
        return sum(n for e, n in self.calls.items() if e != "auth") / self.messages


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time of these processes so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        # utime and stime: fields 14 and 15 of stat(5), 12 and 13 after the name.
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def userli_counts(port: int) -> dict[str, int]:
    """How many calls each endpoint of the fake Userli has answered."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/counts", timeout=10) as answer:
        counts: dict[str, int] = json.load(answer)
    return counts


def send_outbound(port: int, messages: int, parallel: int = 4) -> None:
    """Logged-in senders, one login per session, one remote recipient per message."""
    errors: list[BaseException] = []

    def sender(worker: int) -> None:
        try:
            for n in range(worker, messages, parallel):
                user = SENDERS[n % len(SENDERS)]
                recipient = REMOTE[n % len(REMOTE)]
                with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
                    smtp.login(user, "secret")
                    smtp.sendmail(user, [recipient], f"Subject: {n}\r\n\r\nmessage {n}\r\n")
        except BaseException as error:  # reported by the caller
            errors.append(error)

    threads = [threading.Thread(target=sender, args=(w,)) for w in range(parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"benchmark: outbound mail failed: {errors[0]!r}")


def send_inbound(port: int, messages: int, parallel: int = 8) -> None:
    """
    Outsiders to local mailboxes and aliases, with smtp-source: one message
    per run, so that consecutive messages come from different senders to
    different recipients, as on a real port 25 (Postfix's processes
    remember their last answers, which one address over and over would
    measure instead).
    """
    program = postfix_command("smtp-source") or "smtp-source"
    running: list[subprocess.Popen[bytes]] = []
    for n in range(messages):
        sender = OUTSIDERS[n % len(OUTSIDERS)]
        recipient = LOCAL[(n // len(OUTSIDERS) + n) % len(LOCAL)]
        running.append(
            subprocess.Popen(
                [program, "-m", "1", "-f", sender, "-t", recipient, f"127.0.0.1:{port}"]
            )
        )
        if len(running) >= parallel:
            if running.pop(0).wait(timeout=600) != 0:
                raise SystemExit("benchmark: smtp-source failed")
    for run in running:
        if run.wait(timeout=600) != 0:
            raise SystemExit("benchmark: smtp-source failed")


class PostfixScenario:
    """The scenario against one or more daemons, one Postfix each."""

    def __init__(self, bench: Any, messages: int) -> None:
        self.bench = bench
        self.messages = messages
        self.phases: list[Phase] = []

    def run(self, targets: list[tuple[str, Path]]) -> list[Phase]:
        for target, root in targets:
            self.bench.flush_redis()
            context = self.bench.daemon(1, root=root, env={"RATE_LIMIT_IDENTITY": "sasl"})
            for addresses, pids in context:
                self._against(target, addresses, pids)
        return self.phases

    def _against(self, target: str, addresses: dict[str, str], pids: list[int]) -> None:
        def tcp(name: str) -> tuple[str, int]:
            _, host, port = addresses[name].split(":")
            return host, int(port)

        main, submission = readme_configuration(tcp("socketmap"), tcp("policy"), tcp("sasl"))
        with LMTPSink() as sink:
            postfix = PostfixInstance(sink.port, main=main)
            submission_port = postfix.add_smtpd(submission)
            postfix.start()
            try:
                mixes: list[tuple[str, Callable[[int], None]]] = [
                    ("outbound", lambda n: send_outbound(submission_port, n)),
                    ("inbound", lambda n: send_inbound(postfix.smtp_port, n)),
                ]
                for traffic, send in mixes:
                    # Every sender, recipient and domain once: a warm cache.
                    warm = max(len(REMOTE), len(LOCAL)) * 2
                    self._phase(target, traffic, send, warm, sink, pids, measured=False)
                    self._phase(target, traffic, send, self.messages, sink, pids, measured=True)
            except BaseException:
                print("Postfix's log:\n" + postfix.log()[-3000:], flush=True)
                raise
            finally:
                postfix.cleanup()

    def _phase(
        self,
        target: str,
        traffic: str,
        send: Callable[[int], None],
        messages: int,
        sink: LMTPSink,
        pids: list[int],
        measured: bool,
    ) -> None:
        port = self.bench.userli_port
        delivered = len(sink.deliveries)
        calls, cpu, started = userli_counts(port), cpu_seconds(pids), time.monotonic()
        send(messages)
        sink.wait_for(delivered + messages, deadline=600)
        seconds = time.monotonic() - started
        # The daemon answers Postfix before the delivery; nothing is left in flight.
        after = userli_counts(port)
        phase = Phase(
            target=target,
            traffic=traffic,
            messages=messages,
            seconds=seconds,
            calls={e: after.get(e, 0) - calls.get(e, 0) for e in ENDPOINTS},
            cpu_s=cpu_seconds(pids) - cpu,
        )
        if measured:
            self.phases.append(phase)
            print(format_phase(phase), flush=True)


HEADER = (
    "| target | traffic | messages | msg/s | Userli calls/msg (without logins) | by endpoint "
    "| daemon CPU ms/msg |\n|---|---|---|---|---|---|---|"
)


def by_endpoint(calls: dict[str, float]) -> str:
    return ", ".join(f"`{e}` {calls[e]:.2f}" for e in ENDPOINTS if calls.get(e))


def format_phase(p: Phase) -> str:
    calls = {e: p.per_message(e) for e in ENDPOINTS}
    return (
        f"| {p.target} | {p.traffic} | {p.messages} | {p.rate:.1f} | "
        f"{p.lookups_per_message:.2f} | {by_endpoint(calls)} | {p.cpu_s * 1000 / p.messages:.2f} |"
    )


def cpu_per_message(phases: list[Phase], target: str, traffic: str) -> list[float]:
    """The daemon's CPU seconds per message in every run of C{target} with C{traffic}."""
    return [
        p.cpu_s / p.messages
        for p in phases
        if (p.target, p.traffic) == (target, traffic) and p.cpu_s
    ]


def render(phases: list[Phase], latency: float) -> str:
    """The Markdown report: the table, the Go program's calls, the CPU ratios."""
    lines = [
        "## End to end through Postfix",
        "",
        f"A private Postfix set up as the README says, the fast fake Userli ({latency * 1000:g} ms "
        "latency), redis-server, the daemon in one process; each mix sent once to warm the "
        "cache, then measured. Daemon CPU is all its processes' user and system time.",
        "",
        HEADER,
        *[format_phase(p) for p in phases],
    ]
    for traffic, (total, calls) in GO_CALLS.items():
        lines.append(
            f"| Go program | {traffic} | 40 | - | {total:.2f} | {by_endpoint(calls)} | - |"
        )
    ratios = []
    for traffic in GO_CALLS:
        ours = cpu_per_message(phases, "daemon", traffic)
        theirs = cpu_per_message(phases, "yardstick", traffic)
        if ours and theirs:
            ratios.append(
                f"- {traffic}: daemon CPU per message {change(ours, theirs)} against the "
                f"yardstick (medians of {len(ours)} run(s) each)"
            )
    if ratios:
        lines += ["", *ratios]
    return "\n".join(lines) + "\n"
