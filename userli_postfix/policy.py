"""
The Postfix policy service (``SMTPD_POLICY_README``) and the sending-quota
decision it asks for.

Postfix, with ``smtpd_end_of_data_restrictions = check_policy_service
inet:HOST:10003``, asks once per message at the end of DATA.  The protocol
class only frames: ``name=value`` lines up to an empty line in, one
``action=...`` line and an empty line out.  L{QuotaPolicy} decides: who is
sending, what their quota is, and whether this message is within it.

Every failure (API, Redis, a bug) answers ``DUNNO``: a policy server that
fails makes Postfix defer mail, and a quota is not worth bouncing mail for.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from userli_postfix.addresses import normalise_address
from userli_postfix.coalesce import Coalescer
from userli_postfix.config import Config
from userli_postfix.metrics import Metrics, increments, observations
from userli_postfix.ratelimit import RateLimiter, Verdict
from userli_postfix.remotedomains import RemoteDomains
from userli_postfix.serving import MAX_CONNECTIONS, LimitedFactory, ServingMixin
from userli_postfix.userli import CircuitOpen, Quota, UserliClient

log = Logger()

# Postfix's longest attributes (certificate subjects, client names, SMTPUTF8
# addresses) are a few hundred bytes; a line far beyond that is not Postfix.
MAX_LINE = 8192
# Postfix sends about 40 attributes per request.
MAX_ATTRIBUTES = 256
# Longer than Postfix's smtpd_policy_service_max_idle (300 s), so Postfix,
# not us, normally ends an idle connection and never finds it closed under
# its feet.
IDLE_TIMEOUT = 330.0

# Enough for every sender of a large installation within a day.
QUOTA_CACHE_ENTRIES = 100_000

# How long the last quota learned for a sender is enforced while Userli
# cannot answer: long enough to ride out any outage worth the name, short
# enough that a quota nobody asked about for a day is not a surprise.
LAST_KNOWN_QUOTA_TTL = 24 * 3600.0

END_OF_MESSAGE = "END-OF-MESSAGE"
DUNNO = "DUNNO"
DEFAULT_REJECT_TEXT = "Rate limit exceeded, please try again later"

# A 404 (neither a user nor an alias) limits nothing, exactly like a quota
# of 0/0, and is cached the same way.
NO_QUOTA = Quota(per_hour=0, per_day=0)


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    """
    The attributes of one policy request that the daemon knows; every other
    attribute is ignored (Postfix adds new ones over time).  A missing
    attribute is the empty string, as Postfix sends absent values.
    """

    request: str = ""
    protocol_state: str = ""
    protocol_name: str = ""
    sender: str = ""
    recipient: str = ""
    recipient_count: str = ""
    client_address: str = ""
    client_name: str = ""
    sasl_method: str = ""
    sasl_username: str = ""
    size: str = ""
    queue_id: str = ""
    instance: str = ""


_FIELDS: dict[bytes, str] = {
    name.encode("ascii"): name for name in PolicyRequest.__dataclass_fields__
}


def parse_attribute(line: bytes) -> tuple[str, str] | None:
    """
    One ``name=value`` line as (field, value) when it is an attribute
    L{PolicyRequest} keeps; C{None} for anything else.  A line ending in
    CR (typed by hand through a terminal) is accepted too.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    name, equals, value = line.partition(b"=")
    field = _FIELDS.get(name)
    if field is None or not equals:
        return None
    return field, value.decode("utf-8", "replace")


def one_line(text: str) -> str:
    """C{text} with every run of whitespace (line breaks included) made one space."""
    return " ".join(text.split())


class QuotaSource:
    """
    Sending quotas from the Userli API, asked once at a time per identity
    however many messages wait for the answer.

    With C{ttl} 0 (the default, as the Go program) every message asks, so
    a quota lowered in Userli applies to the next message; a positive
    C{ttl} reuses an answer that long.  Either way the last quota learned
    for each identity is kept for L{LAST_KNOWN_QUOTA_TTL} (bounded), for
    L{lastKnown} to enforce while Userli cannot answer.  Failures are never
    kept: the next message asks again.
    """

    def __init__(
        self,
        client: UserliClient,
        clock: IReactorTime,
        ttl: float,
        max_entries: int = QUOTA_CACHE_ENTRIES,
        keep: float = LAST_KNOWN_QUOTA_TTL,
    ) -> None:
        self._client = client
        self._clock = clock
        self._ttl = ttl
        self._keep = max(keep, ttl)
        self._max = max_entries
        # identity -> (when learned, quota); oldest first, so insertion
        # order is expiry order.
        self._entries: OrderedDict[str, tuple[float, Quota]] = OrderedDict()
        self._calls: Coalescer[str, Quota] = Coalescer()

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, identity: str) -> Quota | None:
        """The kept quota of C{identity} while fresh (within C{ttl}), else C{None}."""
        if self._ttl <= 0:
            return None
        entry = self._entries.get(identity)
        if entry is None or entry[0] + self._ttl <= self._clock.seconds():
            return None
        return entry[1]

    def lastKnown(self, identity: str) -> Quota | None:
        """The last quota learned for C{identity} within the keeping time, else C{None}."""
        entry = self._entries.get(identity)
        if entry is None or entry[0] + self._keep <= self._clock.seconds():
            return None
        return entry[1]

    def fetch(self, identity: str) -> defer.Deferred[Quota]:
        """
        Ask the API for C{identity}'s quota (L{NO_QUOTA} when Userli does not
        know it), sharing a call already in flight; fails with the client's
        L{UserliError}.
        """
        return self._calls.ask(identity, self._ask, identity)

    def _ask(self, identity: str) -> defer.Deferred[Quota]:
        return self._client.smtp_quota(identity).addCallback(self._learned, identity)

    def _learned(self, result: Quota | None, identity: str) -> Quota:
        """Userli's answer as a quota, kept for L{peek} and L{lastKnown}."""
        quota = NO_QUOTA if result is None else result
        now = self._clock.seconds()
        entries = self._entries
        entries.pop(identity, None)
        entries[identity] = (now, quota)
        while entries:
            learned, _ = next(iter(entries.values()))
            if learned + self._keep > now and len(entries) <= self._max:
                break
            entries.popitem(last=False)
        return quota


class QuotaPolicy:
    """
    The sending-quota decision of compatibility.md ("Rate limiting"), with
    the identity normalised like a lookup key so that one mailbox has one
    quota however its owner spells the login.

    L{decide} returns the action (without ``action=``), or a Deferred of it
    that never fails.

    @param remote: the domains Userli does not host: a sender in one of
        them has no quota there, which needs no API call to know.
    """

    def __init__(
        self,
        client: UserliClient,
        limiter: RateLimiter,
        clock: IReactorTime,
        metrics: Metrics,
        delimiter: str = "",
        message: str = DEFAULT_REJECT_TEXT,
        cache_ttl: float = 0.0,
        action: str = "REJECT",
        identity: str = "sasl_or_sender",
        remote: RemoteDomains | None = None,
    ) -> None:
        self._quotas = QuotaSource(client, clock, cache_ttl)
        self._remote = remote
        self._remoteAnswers = metrics.remote_domain_answers.labels("policy")
        self._limiter = limiter
        self._clock = clock
        self._delimiter = delimiter
        # The access(5) answer for a sender over quota, and its metric label.
        self._over = f"{action} {one_line(message) or DEFAULT_REJECT_TEXT}"
        self._overLabel = action.lower()
        self._saslOnly = identity == "sasl"
        self._checked = metrics.quota_checks.labels("checked")
        self._exceeded = metrics.quota_exceeded
        self._requests = increments(metrics.policy_requests)
        self._durations = observations(metrics.policy_request_duration)
        # Every outcome's series is there from the start, at 0.
        for outcome in (
            ("skip", "dunno"),
            ("check", "dunno"),
            ("check", "error"),
            ("check", self._overLabel),
        ):
            self._requests[outcome]
            self._durations[outcome]

    def decide(self, request: PolicyRequest) -> str | defer.Deferred[str]:
        """The action for C{request}."""
        started = self._clock.seconds()
        if request.protocol_state != END_OF_MESSAGE:
            return self._done("skip", "dunno", started, DUNNO)
        raw = self._identityOf(request)
        if not raw:
            return self._done("check", "dunno", started, DUNNO)
        identity = normalise_address(raw, self._delimiter)
        if identity is None:
            # Not the identity itself: it may hold line breaks or other
            # control characters, which have no place in a log line.
            log.debug("No quota checked: the sender is not an address")
            return self._done("check", "dunno", started, DUNNO)
        quota = self._quotas.peek(identity)
        if quota is not None:
            return self._limit(quota, identity, started)
        remote = self._remote
        if remote is not None:
            domain = identity.rpartition("@")[2]
            known = remote.known(domain)
            if known:
                return self._remembered(started)
            if known is None:
                d = remote.remembered(domain).addCallback(
                    lambda remembered: (
                        self._remembered(started) if remembered else self._fetch(identity, started)
                    )
                )
                return d.addErrback(self._bug, started)
        return self._fetch(identity, started)

    def _remembered(self, started: float) -> str:
        # What a sender Userli does not know gets (no quota), without asking.
        self._remoteAnswers.inc()
        return self._done("check", "dunno", started, DUNNO)

    def _fetch(self, identity: str, started: float) -> defer.Deferred[str]:
        d = self._quotas.fetch(identity).addCallbacks(
            self._limit,
            self._noQuota,
            callbackArgs=(identity, started),
            errbackArgs=(identity, started),
        )
        return d.addErrback(self._bug, started)

    def _identityOf(self, request: PolicyRequest) -> str:
        """
        Whose message this is: the login, else (unless only authenticated
        senders count, C{RATE_LIMIT_IDENTITY=sasl}) the envelope sender,
        which anyone can forge on port 25.
        """
        if self._saslOnly:
            return request.sasl_username
        return request.sasl_username or request.sender

    def _limit(self, quota: Quota, identity: str, started: float) -> str | defer.Deferred[str]:
        if quota.unlimited:
            log.debug("No sending quota for {identity}", identity=identity)
            return self._done("check", "dunno", started, DUNNO)
        self._checked.inc()
        verdict = self._limiter.check(identity, quota)
        if isinstance(verdict, Verdict):
            return self._judge(verdict, identity, quota, started)
        d = verdict.addCallbacks(
            self._judge,
            self._noWindow,
            callbackArgs=(identity, quota, started),
            errbackArgs=(started,),
        )
        return d.addErrback(self._bug, started)

    def _judge(self, verdict: Verdict, identity: str, quota: Quota, started: float) -> str:
        if verdict.allowed:
            log.debug(
                "Message of {identity} allowed: {hour}/{per_hour} this hour, "
                "{day}/{per_day} today (0 = unlimited)",
                identity=identity,
                hour=verdict.hour_count,
                per_hour=quota.per_hour,
                day=verdict.day_count,
                per_day=quota.per_day,
            )
            return self._done("check", "dunno", started, DUNNO)
        # Every decision over quota is counted, whatever the action does
        # with the message; the action tells them apart in policy_requests.
        self._exceeded.inc()
        log.info(
            "Sending quota exceeded by {identity}: {hour}/{per_hour} this hour, "
            "{day}/{per_day} today (0 = unlimited); answered {action}",
            identity=identity,
            hour=verdict.hour_count,
            per_hour=quota.per_hour,
            day=verdict.day_count,
            per_day=quota.per_day,
            action=self._overLabel.upper(),
        )
        return self._done("check", self._overLabel, started, self._over)

    def _noQuota(
        self, failure: Failure, identity: str, started: float
    ) -> str | defer.Deferred[str]:
        known = self._quotas.lastKnown(identity)
        if known is not None:
            # Userli cannot answer: the quota it last gave still holds,
            # so an outage is no window for a spam run.
            if not failure.check(CircuitOpen):
                log.warn(
                    "Quota of {identity} unavailable, enforcing the last one learned: {error}",
                    identity=identity,
                    error=failure.value,
                )
            return self._limit(known, identity, started)
        if not failure.check(CircuitOpen):
            log.warn(
                "Quota of {identity} unavailable, message allowed: {error}",
                identity=identity,
                error=failure.value,
            )
        return self._done("check", "error", started, DUNNO)

    def _noWindow(self, failure: Failure, started: float) -> str:
        # The limiter has logged and counted the backend failure.
        return self._done("check", "error", started, DUNNO)

    def _bug(self, failure: Failure, started: float) -> str:
        log.failure("Policy decision failed, message allowed", failure)
        return self._done("check", "error", started, DUNNO)

    def _done(self, stage: str, action: str, started: float, answer: str) -> str:
        self._requests[stage, action]()
        self._durations[stage, action](self._clock.seconds() - started)
        return answer


def _frame(action: str) -> bytes:
    return b"action=" + action.encode("utf-8") + b"\n\n"


_DUNNO_REPLY = _frame(DUNNO)


class PolicyProtocol(ServingMixin, LineReceiver):
    """
    One Postfix policy connection: requests one after another, each
    answered in order, the connection kept open between them.  A line
    longer than L{MAX_LINE} or a request of more than L{MAX_ATTRIBUTES}
    lines cannot be Postfix: that connection (only) is closed.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE
    factory: PolicyFactory

    def connectionMade(self) -> None:
        self._attributes: dict[str, str] = {}
        self._lines = 0
        super().connectionMade()

    def lineReceived(self, line: bytes) -> None:
        if not self._lines:
            # Once per request, not per line: a request has about 40 lines.
            self.resetTimeout()  # type: ignore[no-untyped-call]
        if not line or line == b"\r":
            request = PolicyRequest(**self._attributes)
            self._attributes = {}
            self._lines = 0
            self.reply(self._answer(request))
            return
        self._lines += 1
        if self._lines > MAX_ATTRIBUTES:
            log.warn("Closing a policy connection: more than {n} attributes", n=MAX_ATTRIBUTES)
            self.transport.loseConnection()
            return
        attribute = parse_attribute(line)
        if attribute is not None:
            self._attributes[attribute[0]] = attribute[1]

    def _answer(self, request: PolicyRequest) -> bytes | defer.Deferred[bytes]:
        try:
            action = self.factory.policy.decide(request)
        except Exception:
            log.failure("Policy decision failed, message allowed")
            return _DUNNO_REPLY
        if isinstance(action, str):
            return _DUNNO_REPLY if action == DUNNO else _frame(action)
        return action.addCallback(_frame)

    def lineLengthExceeded(self, line: bytes) -> None:
        log.warn("Closing a policy connection: line longer than {n} bytes", n=MAX_LINE)
        self.transport.loseConnection()


class PolicyFactory(LimitedFactory):
    """Builds policy connections, at most 500 at a time."""

    protocol = PolicyProtocol
    noisy = False

    def __init__(
        self,
        clock: IReactorTime,
        policy: QuotaPolicy,
        metrics: Metrics,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        super().__init__(
            clock,
            idle_timeout,
            active=metrics.policy_active_connections,
            refused=metrics.policy_connection_pool_full,
            max_connections=max_connections,
        )
        self.policy = policy


def makePolicyFactory(
    config: Config,
    clock: IReactorTime,
    client: UserliClient,
    metrics: Metrics,
    limiter: RateLimiter,
    remote: RemoteDomains | None = None,
) -> PolicyFactory:
    """The policy listener's factory, as configured."""
    policy = QuotaPolicy(
        client,
        limiter,
        clock,
        metrics,
        delimiter=config.recipient_delimiter,
        message=config.rate_limit_message,
        cache_ttl=config.quota_cache_ttl,
        action=config.rate_limit_action,
        identity=config.rate_limit_identity,
        remote=remote,
    )
    return PolicyFactory(clock, policy, metrics)
