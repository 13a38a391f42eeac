"""
The remote side of the C{tls_policy} map, all on loopback: an
authoritative C{twisted.names} DNS server serving test zones, and fake
SMTP servers on addresses of 127.0.0.0/8 (and C{::1}) that share one port,
each behaving as one kind of mail exchanger.  Every fake records what it
saw, so a test asserts what the daemon (or Postfix) did on the wire.

 - L{LoopbackBlock}() -> .address(n): addresses in a block of 127.0.0.0/8
   that nothing else uses (a refusing host is one with no fake on it)
 - L{Zone}(apex, records): the test zone (MX, A, AAAA, null MX; names not
   in it are NXDOMAIN); L{mail_domain}(domain, (preference, address), ...)
   gives the records of a domain and its MX hosts
 - L{FakeDNS}(zone, addresses).start() / .stop() / .queries() /
   .nameservers
 - L{FakeMX}(behaviours, port=None).start() / .stop() / .port /
   .sessions(address) / .wait_for_sessions(address, n) /
   .set_behaviour(address, behaviour, delay)

The DNS server runs on a private reactor in a thread, like the fake
Userli.  The SMTP fakes are threads with blocking sockets and the standard
library's C{ssl}: C{startTLS} on a private reactor would flush its writes
through the global one, which does not run in the test process.

Nothing ever leaves the machine: every address is a loopback address.
"""

from __future__ import annotations

import enum
import random
import socket
import socketserver
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twisted.internet import threads
from twisted.internet.error import CannotListenError
from twisted.names import dns, server
from twisted.names.authority import FileAuthority

from tests.certificates import self_signed
from tests.fake_userli import private_reactor
from tests.integration.harness import STARTUP_DEADLINE, free_port, wait_for

#: How long a fake waits for the client before it gives up on a session.
SESSION_TIMEOUT = 60.0

#: What the hostile fakes send at most before they close themselves.
FLOOD_LIMIT = 64 * 1024 * 1024

#: The size of the C{EHLO} reply of L{Behaviour.HUGE_EHLO}.
HUGE_EHLO_SIZE = 16 * 1024 * 1024

#: A TLS alert record: fatal, handshake_failure.  What a broken TLS stack
#: (or a middlebox) answers to a ClientHello.
HANDSHAKE_FAILURE = b"\x15\x03\x03\x00\x02\x02\x28"


class LoopbackBlock:
    """
    Addresses C{127.A.B.1} to C{127.A.B.254} of a block picked at random
    outside 127.0.0.0/16, so that tests running side by side on one machine
    do not meet on the same addresses.
    """

    def __init__(self) -> None:
        self.prefix = f"127.{random.randint(16, 254)}.{random.randint(0, 255)}"

    def address(self, number: int) -> str:
        """The address ending in C{number} (1 to 254)."""
        if not 1 <= number <= 254:
            raise ValueError(f"no host number {number} in a /24")
        return f"{self.prefix}.{number}"


def has_ipv6_loopback() -> bool:
    """Whether C{::1} can be bound here."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# DNS


def mx(preference: int, host: str) -> dns.Record_MX:
    """An MX record; C{host} C{"."} makes a null MX (RFC 7505)."""
    return dns.Record_MX(preference, host.rstrip(".").encode("ascii"), ttl=0)


def address_record(address: str) -> dns.Record_A | dns.Record_AAAA:
    """An A record, or an AAAA record for an IPv6 address."""
    if ":" in address:
        return dns.Record_AAAA(address, ttl=0)
    return dns.Record_A(address, ttl=0)


def mail_domain(domain: str, *exchangers: tuple[int, str]) -> dict[str, list[Any]]:
    """
    The records of C{domain} with one MX per (preference, address) in
    C{exchangers}, named C{mx<preference>.<domain>}, listed in the order
    given (so a test can list them out of preference order).
    """
    records: dict[str, list[Any]] = {
        domain: [mx(preference, f"mx{preference}.{domain}") for preference, _ in exchangers]
    }
    for preference, address in exchangers:
        records[f"mx{preference}.{domain}"] = [address_record(address)]
    return records


class Zone(FileAuthority):
    """
    An authoritative zone built from records given in code.

    C{FileAuthority} is meant to be subclassed with a C{loadFile} that fills
    C{soa} and C{records}; here the "file" is the C{(apex, records)} given
    to the initialiser.  Every record has a TTL of 0 (those in the additional
    section too: the default TTL is 0), so no resolver keeps
    an answer from one test to the next.
    """

    def __init__(self, apex: str, records: Mapping[str, Sequence[Any]]) -> None:
        super().__init__((apex, records))

    def loadFile(self, source: tuple[str, Mapping[str, Sequence[Any]]]) -> None:
        apex, records = source
        soa = dns.Record_SOA(
            mname=f"ns.{apex}",
            rname=f"hostmaster.{apex}",
            serial=1,
            refresh=60,
            retry=60,
            expire=0,
            minimum=0,
            ttl=0,
        )
        self.soa = (apex.encode("ascii"), soa)
        self.records = {apex.encode("ascii"): [soa]}
        for name, given in records.items():
            self.records.setdefault(name.lower().encode("ascii"), []).extend(given)


class _RecordingServerFactory(server.DNSServerFactory):
    """A DNS server factory that notes every question before answering it."""

    def __init__(self, zone: Zone, seen: Callable[[str, str], None]) -> None:
        super().__init__(authorities=[zone])
        self._seen = seen

    def handleQuery(self, message: dns.Message, protocol: Any, address: Any) -> Any:
        for query in message.queries:
            self._seen(
                query.name.name.decode("ascii", "replace"),
                dns.QUERY_TYPES.get(query.type, str(query.type)),
            )
        return super().handleQuery(message, protocol, address)


class FakeDNS:
    """
    The authoritative server for L{Zone}, over UDP and TCP, on each of
    C{addresses} (host, port); port 0 picks a port free for both.
    """

    def __init__(self, zone: Zone, addresses: Sequence[tuple[str, int]]) -> None:
        self.zone = zone
        self.addresses = list(addresses)
        self._lock = threading.Lock()
        self._queries: list[tuple[str, str]] = []
        self._reactor: Any = None
        self._thread: threading.Thread | None = None
        self._ports: list[Any] = []

    @property
    def nameservers(self) -> str:
        """The servers as C{TLS_POLICY_NAMESERVERS} lists them."""
        return ",".join(f"{host}:{port}" for host, port in self.addresses)

    def queries(self) -> list[tuple[str, str]]:
        """Every question asked so far: (name, type), e.g. C{("tls.test", "MX")}."""
        with self._lock:
            return list(self._queries)

    def _seen(self, name: str, kind: str) -> None:
        with self._lock:
            self._queries.append((name, kind))

    def start(self) -> None:
        self._reactor = private_reactor()
        self._thread = threading.Thread(
            target=self._reactor.run,
            kwargs={"installSignalHandlers": False},
            name="fake-dns",
            daemon=True,
        )
        self._thread.start()
        try:
            threads.blockingCallFromThread(self._reactor, self._listen)
        except BaseException:
            self.stop()
            raise

    def _listen(self) -> None:
        factory = _RecordingServerFactory(self.zone, self._seen)
        bound = []
        for host, port in self.addresses:
            for _ in range(50):
                udp = self._reactor.listenUDP(
                    port, dns.DNSDatagramProtocol(controller=factory), interface=host
                )
                chosen = udp.getHost().port
                try:
                    tcp = self._reactor.listenTCP(chosen, factory, interface=host)
                except CannotListenError:
                    udp.stopListening()
                    if port != 0:
                        raise
                    continue
                self._ports.extend([udp, tcp])
                bound.append((host, chosen))
                break
            else:
                raise OSError(f"no port free for both UDP and TCP on {host}")
        self.addresses = bound

    def stop(self) -> None:
        if self._thread is None:
            return

        def unlisten() -> None:
            for port in self._ports:
                port.stopListening()

        threads.blockingCallFromThread(self._reactor, unlisten)
        self._reactor.callFromThread(self._reactor.stop)
        self._thread.join(timeout=STARTUP_DEADLINE)
        self._thread = None

    def __enter__(self) -> FakeDNS:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# SMTP


class Behaviour(enum.Enum):
    """What kind of mail exchanger a fake is."""

    #: STARTTLS offered, the handshake works; mail accepted before or after.
    TLS = "tls"
    #: STARTTLS offered, but the ClientHello is answered with a fatal alert.
    BROKEN_TLS = "broken-tls"
    #: No STARTTLS; mail accepted in the clear.
    NO_TLS = "no-tls"
    #: Accepts the connection and never says a word.
    SILENT = "silent"
    #: A banner of continuation lines (C{220-}) that never ends.
    ENDLESS_BANNER = "endless-banner"
    #: A banner line that never ends: megabytes without CRLF.
    NO_CRLF = "no-crlf"
    #: A normal banner, then an C{EHLO} reply of megabytes of extensions
    #: ending in C{STARTTLS} (and a working handshake after that).
    HUGE_EHLO = "huge-ehlo"
    #: As L{TLS}, but the banner and every reply come after a delay.
    SLOW = "slow"


@dataclass(frozen=True)
class Message:
    """A message a fake accepted."""

    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    over_tls: bool


@dataclass(frozen=True)
class Session:
    """
    What a fake saw on one connection.

    @ivar ehlo: the names given in C{EHLO} (or C{HELO}), in order.
    @ivar starttls: the client sent C{STARTTLS}.
    @ivar handshake: the TLS handshake completed.
    @ivar tls_version: e.g. C{"TLSv1.3"}, once the handshake completed.
    @ivar quit: the client sent C{QUIT}.
    @ivar peer_closed: the client closed the connection (without C{QUIT},
        or while the fake was still sending).
    @ivar ended: the connection is over, whoever ended it.
    @ivar sent: bytes the fake managed to send.
    @ivar lasted: seconds from the accept to the end, once ended.
    """

    address: str
    behaviour: Behaviour
    ehlo: tuple[str, ...] = ()
    starttls: bool = False
    handshake: bool = False
    tls_version: str | None = None
    quit: bool = False
    peer_closed: bool = False
    ended: bool = False
    sent: int = 0
    messages: tuple[Message, ...] = ()
    lasted: float | None = None


@dataclass
class _Host:
    address: str
    behaviour: Behaviour
    delay: float = 0.0
    sessions: list[Session] = field(default_factory=list)


class _PeerClosed(Exception):
    """The client closed the connection."""


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    # Port 25 again at once when a test runs twice (TIME_WAIT).
    allow_reuse_address = True
    # socketserver's default (5) drops the connections of probes that come
    # all at once; their SYNs are retried only seconds later.
    request_queue_size = 128

    def __init__(self, mx: FakeMX, host: _Host, port: int) -> None:
        self.mx = mx
        self.host = host
        if ":" in host.address:
            self.address_family = socket.AF_INET6
        super().__init__((host.address, port), _Handler)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        _Conversation(self.server.mx, self.server.host, self.request).run()


class _Conversation:
    """One SMTP session of a fake: runs in its own thread, blocking."""

    def __init__(self, mx: FakeMX, host: _Host, sock: socket.socket) -> None:
        self.mx = mx
        self.host = host
        # The TCP socket, and what is spoken over: it or TLS over it.
        self.raw = sock
        self.sock: socket.socket = sock
        self.buffer = b""
        self.tls = False
        self.accepted = time.monotonic()
        with mx.lock:
            self.behaviour = host.behaviour
            self.delay = host.delay
            self.index = len(host.sessions)
            host.sessions.append(Session(host.address, self.behaviour))
        sock.settimeout(SESSION_TIMEOUT)

    def note(self, **changes: Any) -> None:
        with self.mx.lock:
            current = self.host.sessions[self.index]
            self.host.sessions[self.index] = replace(current, **changes)

    def session(self) -> Session:
        with self.mx.lock:
            return self.host.sessions[self.index]

    def run(self) -> None:
        self.mx.opened(self.raw)
        try:
            self.converse()
        except _PeerClosed:
            self.note(peer_closed=True)
        except (TimeoutError, OSError):
            pass
        finally:
            self.note(ended=True, lasted=time.monotonic() - self.accepted)
            self.mx.closed(self.raw)
            for sock in (self.sock, self.raw):
                try:
                    sock.close()
                except OSError:
                    pass

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError) as error:
            raise _PeerClosed() from error
        self.note(sent=self.session().sent + len(data))

    def reply(self, line: str) -> None:
        if self.delay and self.mx.stopping.wait(self.delay):
            raise OSError("the fake is stopping")
        self.send(line.encode("ascii") + b"\r\n")

    def line(self) -> str:
        while b"\n" not in self.buffer:
            if len(self.buffer) > 65536:
                raise OSError("the client sent a line that never ends")
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLEOFError) as error:
                raise _PeerClosed() from error
            if not chunk:
                raise _PeerClosed()
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.rstrip(b"\r").decode("utf-8", "replace")

    def flood(self, chunk: bytes) -> None:
        """Send C{chunk} over and over until the client closes (or the limit)."""
        while self.session().sent < FLOOD_LIMIT:
            self.send(chunk)

    def converse(self) -> None:
        if self.behaviour is Behaviour.SILENT:
            while True:
                self.line()
        if self.behaviour is Behaviour.ENDLESS_BANNER:
            self.flood(b"220-endless.banner.test this greeting goes on and on\r\n" * 1024)
            return
        if self.behaviour is Behaviour.NO_CRLF:
            self.send(b"220 ")
            self.flood(b"x" * 65536)
            return
        self.reply(f"220 mx-{self.host.address} ESMTP fake")
        mail_from: str | None = None
        recipients: list[str] = []
        while True:
            command = self.line()
            verb = command.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                self.note(ehlo=(*self.session().ehlo, command[5:].strip()))
                mail_from, recipients = None, []
                self.ehlo(verb)
            elif verb == "STARTTLS" and not self.tls and self.offersTLS():
                if not self.starttls():
                    return
            elif verb == "MAIL":
                mail_from, recipients = _angle(command), []
                self.reply("250 2.1.0 Ok")
            elif verb == "RCPT" and mail_from is not None:
                recipients.append(_angle(command))
                self.reply("250 2.1.5 Ok")
            elif verb == "DATA" and mail_from is not None and recipients:
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                message = Message(mail_from, tuple(recipients), self.data(), self.tls)
                self.note(messages=(*self.session().messages, message))
                mail_from, recipients = None, []
                self.reply("250 2.0.0 Ok: queued")
            elif verb in ("RSET", "NOOP"):
                if verb == "RSET":
                    mail_from, recipients = None, []
                self.reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.note(quit=True)
                self.reply("221 2.0.0 Bye")
                return
            else:
                self.reply("502 5.5.2 Error: command not recognized")

    def offersTLS(self) -> bool:
        return self.behaviour is not Behaviour.NO_TLS

    def ehlo(self, verb: str) -> None:
        if verb == "HELO":
            self.reply(f"250 mx-{self.host.address}")
            return
        extensions = ["PIPELINING", "SIZE 10240000", "8BITMIME"]
        if self.offersTLS() and not self.tls:
            extensions.append("STARTTLS")
        if self.behaviour is Behaviour.HUGE_EHLO and not self.tls:
            self.send(f"250-mx-{self.host.address}\r\n".encode("ascii"))
            padding = b"250-X-PADDING " + b"x" * 984 + b"\r\n"
            self.send(padding * (HUGE_EHLO_SIZE // len(padding)))
            self.send(b"250 STARTTLS\r\n")
            return
        lines = [f"mx-{self.host.address}", *extensions]
        self.reply("\r\n".join(f"250-{line}" for line in lines[:-1]) + f"\r\n250 {lines[-1]}")

    def starttls(self) -> bool:
        """Go over to TLS; whether the handshake completed (if not, hang up)."""
        self.note(starttls=True)
        self.reply("220 2.0.0 Ready to start TLS")
        if self.behaviour is Behaviour.BROKEN_TLS:
            self.sock.recv(65536)
            self.send(HANDSHAKE_FAILURE)
            return False
        try:
            wrapped = self.mx.tls_context.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError):
            return False
        self.sock, self.buffer, self.tls = wrapped, b"", True
        self.note(handshake=True, tls_version=wrapped.version())
        return True

    def data(self) -> bytes:
        lines: list[str] = []
        while True:
            line = self.line()
            if line == ".":
                return "".join(f"{text}\r\n" for text in lines).encode("utf-8")
            lines.append(line[1:] if line.startswith("..") else line)


def _angle(command: str) -> str:
    """The address between the first C{<} and the next C{>}."""
    start = command.find("<")
    end = command.find(">", start + 1)
    return command[start + 1 : end] if start >= 0 and end > start else ""


class FakeMX:
    """
    Fake SMTP servers, one per address of C{behaviours}, all on one port
    (C{port}, or one free on every address when C{None}).  Each accepts
    any number of connections, in a thread each, and records a L{Session}
    for every one.  The C{TLS} fakes present a self-signed certificate for
    C{localhost}, as a mail server's often is.
    """

    def __init__(self, behaviours: Mapping[str, Behaviour], port: int | None = None) -> None:
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._hosts = {address: _Host(address, b) for address, b in behaviours.items()}
        self._requestedPort = port
        self.port = 0
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self.tls_context = _serverContext()

    def start(self) -> None:
        """Listen on every address; return once all of them accept."""
        for _ in range(50):
            port = self._requestedPort if self._requestedPort is not None else free_port()
            try:
                self._servers = self._bind(port)
            except OSError:
                if self._requestedPort is not None:
                    raise
                continue
            self.port = port
            break
        else:
            raise OSError("no port free on every fake MX address")
        for s in self._servers:
            thread = threading.Thread(
                target=s.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _bind(self, port: int) -> list[_Server]:
        servers: list[_Server] = []
        try:
            for host in self._hosts.values():
                servers.append(_Server(self, host, port))
        except OSError:
            for s in servers:
                s.server_close()
            raise
        return servers

    def stop(self) -> None:
        """Stop listening and end every open session."""
        self.stopping.set()
        for s in self._servers:
            s.shutdown()
            s.server_close()
        with self.lock:
            still_open = list(self._open)
        for sock in still_open:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=STARTUP_DEADLINE)
        self._servers, self._threads = [], []

    def opened(self, sock: socket.socket) -> None:
        with self.lock:
            self._open.add(sock)

    def closed(self, sock: socket.socket) -> None:
        with self.lock:
            self._open.discard(sock)

    def set_behaviour(self, address: str, behaviour: Behaviour, delay: float = 0.0) -> None:
        """What the fake at C{address} is from its next connection on."""
        with self.lock:
            host = self._hosts[address]
            host.behaviour, host.delay = behaviour, delay

    def sessions(self, address: str) -> list[Session]:
        """Every session of the fake at C{address} so far, oldest first."""
        with self.lock:
            return list(self._hosts[address].sessions)

    def all_sessions(self) -> list[Session]:
        with self.lock:
            return [s for host in self._hosts.values() for s in host.sessions]

    def wait_for_sessions(
        self,
        address: str,
        count: int = 1,
        condition: Callable[[Session], bool] = lambda s: s.ended,
        deadline: float = STARTUP_DEADLINE,
    ) -> list[Session]:
        """Wait until C{count} sessions at C{address} satisfy C{condition} (by default, ended)."""
        wait_for(
            lambda: sum(1 for s in self.sessions(address) if condition(s)) >= count,
            f"{count} session(s) at the fake MX {address}",
            deadline,
        )
        return self.sessions(address)

    def __enter__(self) -> FakeMX:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _serverContext() -> ssl.SSLContext:
    """A server-side TLS context with a fresh self-signed certificate."""
    certificate, key = self_signed()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "cert.pem").write_bytes(certificate)
        (Path(directory) / "key.pem").write_bytes(key)
        context.load_cert_chain(Path(directory) / "cert.pem", Path(directory) / "key.pem")
    return context
