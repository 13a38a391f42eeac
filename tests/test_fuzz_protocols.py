"""
Property-based tests of the three wire parsers: socketmap (netstrings),
policy (``name=value`` lines) and Dovecot auth (TAB-separated lines).

Each listener faces whatever a broken or hostile client sends, so for
arbitrary bytes cut into arbitrary chunks these tests pin that:

 - nothing raises out of a protocol and nothing is logged as an error;
 - every reply written is well-formed for its protocol;
 - what a connection buffers stays bounded by the protocol's line or
   request limit;
 - a valid request on a new connection afterwards gets the right answer
   (garbage on one connection leaves no trace in shared state);
 - keys full of URL syntax (``/``, ``..``, ``?``, ``#``, ``%``), NUL,
   non-UTF-8 bytes or 100 kB long reach the fake Userli, if at all, as the
   one intended, correctly encoded path: the test asserts on what the fake
   received, not on what the client meant to send.

Hypothesis runs derandomised and without its example database, so every
run (and CI) tries the same inputs; the counts are modest so the file runs
in seconds.
"""

from __future__ import annotations

import itertools
import re
from base64 import b64encode
from typing import Any
from urllib.parse import unquote_to_bytes

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import LineReceiver, NetstringReceiver
from twisted.trial.unittest import SynchronousTestCase

from tests.fake_userli import TOKEN, FakeUserli, FakeUserliResource, ReceivedRequest, UserliData
from userli_postfix.addresses import normalise_address, normalise_domain
from userli_postfix.dovecotauth import EXCHANGE_TIMEOUT
from userli_postfix.dovecotauth import MAX_LINE as SASL_MAX_LINE
from userli_postfix.logins import Authenticator
from userli_postfix.lookups import Lookups
from userli_postfix.metrics import Metrics
from userli_postfix.policy import MAX_LINE as POLICY_MAX_LINE
from userli_postfix.policy import PolicyFactory, PolicyProtocol, QuotaPolicy
from userli_postfix.ratelimit import MemoryRateLimiter
from userli_postfix.sasl import SASLFactory, SASLServerProtocol
from userli_postfix.socketmap import MAX_REQUEST, SocketmapFactory, SocketmapProtocol
from userli_postfix.userli import UserliClient

BASE = "http://userli.test"
DOMAIN = "example.org"
DELIMITER = "+"
ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)
REJECT_TEXT = "Rate limit exceeded, please try again later"

#: Inputs tried per test: 1,200 for the six tests, in seconds.
EXAMPLES = 200

FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def userli_data() -> UserliData:
    """A small Userli: mailboxes, aliases, one domain, two quotas."""
    return UserliData(
        users={
            f"alice@{DOMAIN}": "alice-password",
            f"bob@{DOMAIN}": "bob-password",
            f"limited@{DOMAIN}": "limited-password",
            f"once@{DOMAIN}": "once-password",
        },
        aliases={
            f"info@{DOMAIN}": [f"alice@{DOMAIN}"],
            f"team@{DOMAIN}": [f"alice@{DOMAIN}", f"bob@{DOMAIN}"],
        },
        domains={DOMAIN},
        quotas={f"limited@{DOMAIN}": (2, 3), f"once@{DOMAIN}": (1, 1)},
    )


class World:
    """
    One fresh daemon's worth of state for one example: a fake Userli in
    memory, a fake clock, and the factory of each listener built as
    C{tap.py} builds them (no cache, so every valid lookup reaches the
    fake and can be checked).
    """

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.metrics = Metrics(process=False)
        self.fake = FakeUserli(userli_data())
        self.stub = StubTreq(FakeUserliResource(self.fake, self.clock))
        self.client = UserliClient(self.stub.request, BASE, TOKEN, self.clock, self.metrics)
        lookups = Lookups(self.client, None, self.metrics, self.clock, DELIMITER)
        self.socketmap = SocketmapFactory(self.clock, lookups, self.metrics)
        policy = QuotaPolicy(
            self.client,
            MemoryRateLimiter(self.clock),
            self.clock,
            self.metrics,
            delimiter=DELIMITER,
            message=REJECT_TEXT,
        )
        self.policy = PolicyFactory(self.clock, policy, self.metrics)
        authenticator = Authenticator(
            self.client, self.clock, self.metrics, delimiter=DELIMITER, failure_delay=2.0
        )
        self.sasl = SASLFactory(
            authenticator, self.clock, self.metrics, pid=4242, cookie=lambda: "ab" * 16
        )

    def connect(self, factory: Any) -> tuple[Any, StringTransport]:
        protocol = factory.buildProtocol(ADDRESS)
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def settle(self) -> None:
        """Let every API answer arrive and every timer (failure delay, deadline) run."""
        for _ in range(4):
            self.stub.flush()
            self.clock.advance(3)
        self.stub.flush()

    def feed(self, protocol: Any, transport: StringTransport, chunks: list[bytes]) -> None:
        """
        Deliver C{chunks} as a TCP connection would: one C{dataReceived}
        each, answers arriving in between, and nothing more once the
        protocol has asked to close (a real transport stops reading then).
        """
        for chunk in chunks:
            if transport.disconnecting:
                break
            protocol.dataReceived(chunk)
            self.stub.flush()
        self.settle()


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """C{data} cut at the given offsets (taken modulo its length)."""
    if not data:
        return [data]
    points = sorted({c % len(data) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def netstring(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def parse_netstrings(data: bytes) -> list[bytes]:
    """Split C{data} into netstrings; fail the test on any malformed byte."""
    out = []
    while data:
        match = re.match(rb"(0|[1-9][0-9]*):", data)
        assert match is not None, f"reply does not start with a length: {data[:40]!r}"
        size = int(match.group(1))
        start = match.end()
        assert len(data) >= start + size + 1, f"torn reply {data[:60]!r}"
        assert data[start + size : start + size + 1] == b",", f"missing comma {data[:60]!r}"
        out.append(data[start : start + size])
        data = data[start + size + 1 :]
    return out


def assert_socketmap_reply(reply: bytes) -> None:
    """A reply Postfix's socketmap client accepts (socketmap_table(5))."""
    assert len(reply) <= 100_000, len(reply)
    assert re.match(rb"(OK .+|NOTFOUND ?|TEMP .*|TIMEOUT .*|PERM .*)\Z", reply, re.S), reply


POLICY_REPLY = re.compile(rb"action=(DUNNO|REJECT " + re.escape(REJECT_TEXT.encode()) + rb")\n\n")


def parse_policy_replies(data: bytes) -> list[bytes]:
    """Split policy output into replies; fail on anything but C{action=...} blocks."""
    out = []
    while data:
        match = POLICY_REPLY.match(data)
        assert match is not None, f"malformed policy reply {data[:80]!r}"
        out.append(match.group(1))
        data = data[match.end() :]
    return out


HANDSHAKE = (
    b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n"
    b"SPID\t4242\nCUID\t%d\nCOOKIE\t" + b"ab" * 16 + b"\nDONE\n"
)
_FIELD = rb"[^\t\n\r\x00\x01]*"
SASL_LINE = re.compile(
    rb"(OK\t%(f)s\tuser=%(f)s"
    rb"|FAIL\t%(f)s(\tuser=%(f)s)?(\ttemp)?\treason=%(f)s"
    rb"|CONT\t%(f)s\t[A-Za-z0-9+/=]*)\Z" % {b"f": _FIELD}
)


def parse_sasl_replies(data: bytes, cuid: int) -> list[bytes]:
    """Check the handshake and every reply line; return the reply lines."""
    handshake = HANDSHAKE % cuid
    assert data.startswith(handshake), data[:200]
    body = data[len(handshake) :]
    assert body == b"" or body.endswith(b"\n"), f"torn SASL reply {body[-80:]!r}"
    lines = body.split(b"\n")[:-1]
    for line in lines:
        assert SASL_LINE.match(line), f"malformed SASL reply {line!r}"
        assert len(line) <= 2 * SASL_MAX_LINE
    return lines


def netstring_buffered(protocol: NetstringReceiver) -> int:
    """Bytes a netstring connection holds while it waits for the rest of a request."""
    payload = getattr(protocol, "_payload", None)
    held = payload.tell() if payload is not None else 0
    return len(protocol._remainingData) + held  # type: ignore[attr-defined]


def line_buffered(protocol: LineReceiver) -> int:
    return len(protocol._buffer)  # type: ignore[attr-defined]


# Inputs.  Random bytes rarely look like a request, so the garbage is built
# from fragments of each protocol mixed with raw bytes: real requests, half
# requests, bad lengths, stray separators, huge lines.

_ADDRESS_PIECES = [
    "alice",
    "ALICE",
    "info",
    "team",
    "limited",
    "@",
    "@@",
    DOMAIN,
    "+tag",
    "/",
    "..",
    ".",
    "?",
    "#",
    "%",
    "%2F",
    "%2e%2e",
    "\0",
    " ",
    "\t",
    "\u200b",
    "\ufeff",
    "\u00e9",
    "\r\n",
    "\\",
    "&x=1",
    ";",
    "api/postfix/auth",
]

text_keys = st.lists(
    st.one_of(st.sampled_from(_ADDRESS_PIECES), st.text(max_size=4)), max_size=10
).map(lambda parts: "".join(parts).encode("utf-8", "surrogatepass"))

#: Keys of 100 kB, far beyond any limit of the daemon or of Postfix.
huge_keys = st.sampled_from(
    [
        b"a" * 100_000 + b"@" + DOMAIN.encode(),
        b"/" * 100_000,
        b"..%2F" * 20_000,
        b"alice@" + b"x." * 50_000 + b"org",
    ]
)

_PADDING = ["", " ", "\t", "\u200b", "\ufeff", "\r\n", "\0", "\x7f"]
_LOCAL_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
_LABEL_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-\u00e9\u00fc\u00df\u4e2d\u0436"

domains = st.one_of(
    st.sampled_from([DOMAIN, DOMAIN.upper(), DOMAIN + ".", "example.com"]),
    st.lists(st.text(_LABEL_ALPHABET, min_size=1, max_size=8), min_size=1, max_size=3).map(
        ".".join
    ),
)

#: Addresses that survive normalisation (or come close) while carrying URL
#: syntax, NUL and invisible characters where normalisation removes them:
#: after the recipient delimiter, around the key, in upper case.
address_keys = st.builds(
    lambda pad1, local, tag, domain, pad2: (pad1 + local + tag + "@" + domain + pad2).encode(
        "utf-8"
    ),
    st.sampled_from(_PADDING),
    st.one_of(
        st.sampled_from(["alice", "Info", "TEAM", "limited", "bob", ".."]),
        st.text(_LOCAL_ALPHABET, min_size=1, max_size=12),
    ),
    st.one_of(
        st.just(""),
        st.lists(st.sampled_from(_ADDRESS_PIECES[9:]), max_size=6).map(lambda p: "+" + "".join(p)),
    ),
    domains,
    st.sampled_from(_PADDING),
)

domain_keys = st.builds(
    lambda pad1, domain, pad2: (pad1 + domain + pad2).encode("utf-8"),
    st.sampled_from(_PADDING),
    domains,
    st.sampled_from(_PADDING),
)

#: Half plausible keys, half hostile ones.
keys = st.one_of(
    st.one_of(address_keys, domain_keys),
    st.one_of(text_keys, st.binary(max_size=40), huge_keys),
)

MAPS = [b"alias", b"domain", b"mailbox", b"senders"]

socketmap_fragments = st.one_of(
    st.builds(lambda m, k: netstring(m + b" " + k), st.sampled_from(MAPS), text_keys),
    st.sampled_from(
        [
            netstring(b"alias info@example.org"),
            netstring(b"mailbox alice@example.org"),
            netstring(b"nomap x"),
            netstring(b"alias"),
            netstring(b""),
            b"5:alias",
            b"00:,",
            b"-1:x,",
            b"99999999999999999999:",
            b"4097:",
            b"3:abc;",
            b":",
            b",",
            b"12",
        ]
    ),
    st.binary(max_size=30),
)

policy_lines = st.one_of(
    st.sampled_from(
        [
            b"request=smtpd_access_policy",
            b"protocol_state=END-OF-MESSAGE",
            b"protocol_state=RCPT",
            b"sender=limited@example.org",
            b"sasl_username=LIMITED+x@example.org",
            b"sasl_username=alice@example.org",
            b"sender=",
            b"=",
            b"noequals",
            b"\r",
            b"",
            b"x" * 9000,
        ]
    ),
    st.builds(lambda k: b"sender=" + k, text_keys),
    st.binary(max_size=30),
)

policy_fragments = st.one_of(policy_lines.map(lambda line: line + b"\n"), st.binary(max_size=20))


def _b64(data: bytes) -> bytes:
    return b64encode(data)


sasl_lines = st.one_of(
    st.sampled_from(
        [
            b"VERSION\t1\t2",
            b"VERSION\t2\t0",
            b"CPID\t123",
            b"AUTH\t1\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=192.0.2.1",
            b"AUTH\t2\tLOGIN\tservice=smtp",
            b"AUTH\t3\tPLAIN\tservice=smtp\tresp=",
            b"AUTH\t4\tPLAIN\tservice=smtp\tresp=!!!",
            b"AUTH\t5\tCRAM-MD5\tservice=smtp",
            b"AUTH",
            b"AUTH\t",
            b"AUTH\t\x01\tPLAIN",
            b"CONT\t1\t" + _b64(b"\0alice@example.org\0alice-password"),
            b"CONT\t2\t" + _b64(b"alice@example.org"),
            b"CONT\t2\t" + _b64(b"wrong"),
            b"CONT\t9\t",
            b"CONT",
            b"CANCEL\t1",
            b"\t\t\t",
            b"x" * 70_000,
        ]
    ),
    st.builds(
        lambda i, login, password: (
            b"AUTH\t%d\tPLAIN\tservice=smtp\tresp=%s" % (i, _b64(b"\0" + login + b"\0" + password))
        ),
        st.integers(0, 9),
        text_keys,
        st.binary(max_size=12),
    ),
    st.builds(lambda i, data: b"CONT\t%d\t%s" % (i, _b64(data)), st.integers(0, 9), text_keys),
    st.binary(max_size=30),
)

sasl_fragments = st.one_of(sasl_lines.map(lambda line: line + b"\n"), st.binary(max_size=20))

cuts = st.lists(st.integers(min_value=0, max_value=10**6), max_size=12)


def garbage(fragments: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.lists(fragments, max_size=25).map(b"".join)


def assert_api_path(request: ReceivedRequest, endpoint: str, expected_key: str) -> None:
    """
    C{request} reached exactly C{/api/postfix/<endpoint>/<key>} with the key
    as one percent-encoded path segment: no raw separator, no query, no
    fragment, no dot segment, and decoding gives back exactly the key.
    """
    path = request.raw_path
    prefix = f"/api/postfix/{endpoint}/"
    assert path.startswith(prefix), path
    segment = path[len(prefix) :]
    assert segment, path
    assert re.fullmatch(r"(?:[A-Za-z0-9\-._~@]|%[0-9A-F]{2})+", segment), path
    assert segment not in (".", ".."), path
    assert unquote_to_bytes(segment) == expected_key.encode("utf-8"), path
    assert request.method == "GET"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"


class SocketmapFuzzTests(SynchronousTestCase):
    """The netstring parser and the lookups behind it, under garbage."""

    def check_clean(self) -> None:
        self.assertEqual(self.flushLoggedErrors(), [])

    @FUZZ
    @given(data=garbage(socketmap_fragments), cut=cuts, valid=st.integers(0, 3))
    def test_garbage(self, data: bytes, cut: list[int], valid: int) -> None:
        """
        Arbitrary bytes in arbitrary chunks: no exception, only well-formed
        replies, a bounded buffer, and a correct answer on a new connection.
        """
        world = World()
        protocol, transport = world.connect(world.socketmap)
        assert isinstance(protocol, SocketmapProtocol)
        for chunk in chunked(data, cut):
            if transport.disconnecting:
                break
            protocol.dataReceived(chunk)
            world.stub.flush()
            # The length prefix is checked before the payload is read, so a
            # connection never holds more than one request's worth.
            assert netstring_buffered(protocol) <= MAX_REQUEST + 16, netstring_buffered(protocol)
        world.settle()
        replies = parse_netstrings(transport.value())
        for reply in replies:
            assert_socketmap_reply(reply)
        event(f"socketmap garbage: {'closed' if transport.disconnecting else 'open'}")
        event(f"socketmap garbage: {min(len(replies), 3)}+ replies")
        self.check_clean()

        request, expected = [
            (b"alias info@example.org", b"OK alice@example.org"),
            (b"alias TEAM+x@example.org", b"OK alice@example.org,bob@example.org"),
            (b"mailbox alice@example.org", b"OK 1"),
            (b"domain example.org", b"OK 1"),
        ][valid]
        fresh, fresh_transport = world.connect(world.socketmap)
        world.feed(fresh, fresh_transport, [netstring(request)])
        self.assertEqual(parse_netstrings(fresh_transport.value()), [expected])
        self.assertFalse(fresh_transport.disconnecting)
        self.check_clean()

    @FUZZ
    @given(mapname=st.sampled_from(MAPS), key=keys)
    def test_key_reaches_one_path(self, mapname: bytes, key: bytes) -> None:
        """
        Whatever the key, the fake Userli sees at most one request, for the
        map asked, with the normalised key as one encoded path segment; and
        the reply is what Userli's answer for that key means.
        """
        world = World()
        protocol, transport = world.connect(world.socketmap)
        frame = netstring(mapname + b" " + key)
        world.feed(protocol, transport, [frame])
        received = world.fake.requests()
        endpoint = mapname.decode()

        if len(mapname) + 1 + len(key) > MAX_REQUEST:
            event("socketmap: too long, connection closed")
            self.assertEqual(received, [])
            self.assertTrue(transport.disconnecting)
            self.assertEqual(transport.value(), b"")
            return

        (reply,) = parse_netstrings(transport.value())
        assert_socketmap_reply(reply)
        if not key.strip():
            self.assertEqual((received, reply), ([], b"PERM request without a key"))
            return
        try:
            text = key.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None:
            normalised = None
        elif endpoint == "domain":
            normalised = normalise_domain(text)
        else:
            normalised = normalise_address(text, DELIMITER)
        if normalised is None:
            event("socketmap: refused without an API call")
            self.assertEqual((received, reply), ([], b"NOTFOUND "))
            return
        event(f"socketmap: one API call, {reply.split(b' ')[0].decode()}")
        (request,) = received
        assert_api_path(request, endpoint, normalised)
        status, value = world.fake.lookup(endpoint, normalised)
        self.assertEqual(status, 200)
        if value in (True, False):
            self.assertEqual(reply, b"OK 1" if value else b"NOTFOUND ")
        else:
            self.assertEqual(reply, b"OK " + ",".join(value).encode() if value else b"NOTFOUND ")
        self.check_clean()


class PolicyFuzzTests(SynchronousTestCase):
    """The policy line parser and the quota decision behind it, under garbage."""

    @FUZZ
    @given(data=garbage(policy_fragments), cut=cuts)
    def test_garbage(self, data: bytes, cut: list[int]) -> None:
        """
        Arbitrary bytes in arbitrary chunks: no exception, only
        C{action=...} replies, one per empty line, a bounded buffer, and a
        quota still enforced on a new connection.
        """
        world = World()
        protocol, transport = world.connect(world.policy)
        assert isinstance(protocol, PolicyProtocol)
        for chunk in chunked(data, cut):
            if transport.disconnecting:
                break
            protocol.dataReceived(chunk)
            world.stub.flush()
            assert line_buffered(protocol) <= POLICY_MAX_LINE + 1, line_buffered(protocol)
        world.settle()
        replies = parse_policy_replies(transport.value())
        event(f"policy garbage: {'closed' if transport.disconnecting else 'open'}")
        event(f"policy garbage: {min(len(replies), 3)}+ replies")
        if not transport.disconnecting:
            # Every request (an empty line ends one) got exactly one answer.
            complete = data.split(b"\n")[:-1]
            self.assertEqual(len(replies), sum(line in (b"", b"\r") for line in complete))
        self.assertEqual(self.flushLoggedErrors(), [])

        # "once" may send one message an hour; the garbage never names it.
        fresh, fresh_transport = world.connect(world.policy)
        message = b"request=smtpd_access_policy\nprotocol_state=END-OF-MESSAGE\n"
        message += b"sender=once@example.org\n\n"
        world.feed(fresh, fresh_transport, [message, message])
        self.assertEqual(
            parse_policy_replies(fresh_transport.value()),
            [b"DUNNO", b"REJECT " + REJECT_TEXT.encode()],
        )
        self.assertEqual(self.flushLoggedErrors(), [])

    @FUZZ
    @given(key=keys, attribute=st.sampled_from([b"sender", b"sasl_username"]))
    def test_identity_reaches_one_path(self, key: bytes, attribute: bytes) -> None:
        """
        Whatever the sender or login, the fake Userli sees at most one
        quota request, with the normalised identity as one encoded segment,
        and the answer is DUNNO (no quota in this Userli for strangers).
        """
        # A value cannot hold a line break in this protocol.
        value = key.replace(b"\n", b"")
        world = World()
        protocol, transport = world.connect(world.policy)
        message = b"protocol_state=END-OF-MESSAGE\n" + attribute + b"=" + value + b"\n\n"
        world.feed(protocol, transport, [message])
        received = world.fake.requests()
        if len(attribute) + 1 + len(value) > POLICY_MAX_LINE:
            event("policy: too long, connection closed")
            self.assertEqual(received, [])
            self.assertTrue(transport.disconnecting)
            return
        (reply,) = parse_policy_replies(transport.value())
        # A first message is within every quota of this Userli.
        self.assertEqual(reply, b"DUNNO")
        text = value.removesuffix(b"\r").decode("utf-8", "replace")
        identity = normalise_address(text, DELIMITER)
        if identity is None:
            event("policy: no quota asked")
            self.assertEqual(received, [])
        else:
            event("policy: one quota request")
            (request,) = received
            assert_api_path(request, "smtp_quota", identity)
        self.assertEqual(self.flushLoggedErrors(), [])


def plain(login: bytes, password: bytes, authzid: bytes = b"") -> bytes:
    return _b64(authzid + b"\0" + login + b"\0" + password)


class SASLFuzzTests(SynchronousTestCase):
    """The Dovecot-auth parser and the login decision behind it, under garbage."""

    @FUZZ
    @given(data=garbage(sasl_fragments), cut=cuts)
    def test_garbage(self, data: bytes, cut: list[int]) -> None:
        """
        Arbitrary bytes in arbitrary chunks: no exception, the handshake and
        then only well-formed OK/FAIL/CONT lines, a bounded buffer, and a
        correct login on a new connection.
        """
        world = World()
        protocol, transport = world.connect(world.sasl)
        assert isinstance(protocol, SASLServerProtocol)
        for chunk in chunked(data, cut):
            if transport.disconnecting:
                break
            protocol.dataReceived(chunk)
            world.stub.flush()
            assert line_buffered(protocol) <= SASL_MAX_LINE + 1, line_buffered(protocol)
        world.settle()
        parse_sasl_replies(transport.value(), 1)
        event(f"sasl garbage: {'closed' if transport.disconnecting else 'open'}")
        self.assertEqual(self.flushLoggedErrors(), [])
        # Once abandoned exchanges have expired, nothing the garbage left
        # behind is still outstanding.
        world.clock.advance(EXCHANGE_TIMEOUT + 1)
        self.assertEqual(protocol.outstanding, 0)

        fresh, fresh_transport = world.connect(world.sasl)
        login = b"AUTH\t7\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=192.0.2.1\tresp="
        login += plain(b"Alice@Example.org", b"alice-password") + b"\n"
        world.feed(fresh, fresh_transport, [b"VERSION\t1\t2\nCPID\t99\n", login])
        self.assertEqual(
            parse_sasl_replies(fresh_transport.value(), 2), [b"OK\t7\tuser=alice@example.org"]
        )
        self.assertEqual(self.flushLoggedErrors(), [])

    @FUZZ
    @given(
        login=keys,
        password=st.one_of(
            st.sampled_from([b"alice-password", b"bob-password", b"", b"pass\0word"]),
            st.binary(max_size=30),
            st.text(max_size=10).map(str.encode),
        ),
        mechanism=st.sampled_from(["PLAIN", "LOGIN"]),
    )
    def test_login_reaches_one_path(self, login: bytes, password: bytes, mechanism: str) -> None:
        """
        Whatever the login and password, the fake Userli sees at most one
        request: a POST to C{/api/postfix/auth} itself, whose JSON carries
        the normalised login and the password exactly as sent; and the
        reply is one OK or FAIL for the request id.
        """
        world = World()
        protocol, transport = world.connect(world.sasl)
        lines = [b"VERSION\t1\t2\n", b"CPID\t1\n"]
        if mechanism == "PLAIN":
            lines.append(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + plain(login, password) + b"\n")
        else:
            lines.append(b"AUTH\t1\tLOGIN\tservice=smtp\tresp=" + _b64(login) + b"\n")
            lines.append(b"CONT\t1\t" + _b64(password) + b"\n")
        world.feed(protocol, transport, lines)
        received = world.fake.requests()
        if any(len(line) > SASL_MAX_LINE + 1 for line in lines):
            event("sasl: too long, connection closed")
            self.assertEqual(received, [])
            self.assertTrue(transport.disconnecting)
            return
        replies = parse_sasl_replies(transport.value(), 1)
        text_login, text_password = _utf8(login), _utf8(password)
        if mechanism == "LOGIN" and text_login is not None:
            self.assertEqual(replies[0], b"CONT\t1\t" + _b64(b"Password:"))
            replies = replies[1:]
        (reply,) = replies
        self.assertRegex(reply, rb"\A(OK|FAIL)\t1\t")

        readable = text_login is not None and text_password is not None
        if mechanism == "PLAIN" and (b"\0" in login or b"\0" in password):
            readable = False
        address = normalise_address(text_login, DELIMITER) if readable and text_login else None
        if address is None or not text_password:
            event("sasl: refused without an API call")
            self.assertEqual(received, [])
            self.assertTrue(reply.startswith(b"FAIL\t1\t"), reply)
            return
        event("sasl: one API call")
        (request,) = received
        self.assertEqual((request.method, request.raw_path), ("POST", "/api/postfix/auth"))
        self.assertEqual(request.json(), {"email": address, "password": text_password})
        if world.fake.data.users.get(address) == text_password:
            self.assertEqual(reply, b"OK\t1\tuser=" + address.encode())
        else:
            self.assertTrue(reply.startswith(b"FAIL\t1\t"), reply)
        self.assertEqual(self.flushLoggedErrors(), [])


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
