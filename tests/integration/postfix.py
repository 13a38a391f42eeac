"""
A private, real Postfix for end-to-end tests, and an LMTP sink it delivers to.

L{PostfixInstance} runs a whole Postfix instance from its own configuration
directory (C{postfix -c DIR start}): its own queue and data directories,
C{smtpd} on a free loopback port, no chroot, no DNS, logs in a file, and
every message delivered over LMTP to an L{LMTPSink} in the test process, so
a test sees what was delivered and to whom.  The system's Postfix
configuration is neither read nor touched.

    with LMTPSink() as sink, PostfixInstance(sink.port, main={
        "smtpd_end_of_data_restrictions": "check_policy_service inet:127.0.0.1:10003",
    }) as postfix:
        smtplib.SMTP("127.0.0.1", postfix.smtp_port).sendmail(...)
        sink.wait_for(1)

For outgoing mail through DNS (the C{tls_policy} tests), C{resolv_conf=}
gives the instance an C{/etc/resolv.conf} of its own: it then runs in a
private mount namespace (C{unshare -m}) where that file is bind-mounted
over the system's, which nothing else sees.

Any C{main.cf} parameter can be added (C{main=}), the C{smtpd} service can
be given C{-o} options (C{smtpd_options=}), more C{smtpd} listeners can be
added before the start (L{PostfixInstance.add_smtpd}), and any other
C{master.cf} line too (C{services=}): SASL tests use C{smtpd_sasl_type =
dovecot} with C{smtpd_sasl_path}, C{smtpd_sender_login_maps = socketmap:...},
and C{-o max_use=1} on the service whose SASL server they restart.

Postfix must run as root (it drops privileges to C{mail_owner} itself), and
every directory above the instance must be traversable by the C{postfix}
user: the default instance directory is a fresh one under the system's
temporary directory, made traversable.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socketserver
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import STARTUP_DEADLINE, accepts, free_port, wait_for

#: Where Debian and most distributions install Postfix's commands; often
#: not on a non-root PATH.
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def postfix_command(name: str) -> str | None:
    """The path of a Postfix command (C{postfix}, C{postqueue}), or C{None}."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    return shutil.which(name, path=path)


#: Marks a test that needs a real Postfix; it is skipped, saying why, only
#: where Postfix is not installed.
requires_postfix = pytest.mark.skipif(
    postfix_command("postfix") is None, reason="not installed: postfix"
)

#: A shell in a mount namespace of its own, whose mounts nobody else sees.
_PRIVATE_MOUNTS = ("unshare", "--mount", "--propagation", "private", "sh", "-c")


def can_bind_resolv_conf() -> bool:
    """
    Whether a process may get a private C{/etc/resolv.conf} here: a mount
    namespace of its own (root, or C{CAP_SYS_ADMIN}) where a bind mount
    works.  Tried on the file itself, inside a namespace that vanishes.
    """
    if shutil.which("unshare") is None or not Path("/etc/resolv.conf").is_file():
        return False
    result = subprocess.run(
        [*_PRIVATE_MOUNTS, "mount --bind /etc/resolv.conf /etc/resolv.conf"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=STARTUP_DEADLINE,
        check=False,
    )
    return result.returncode == 0


#: Marks a test whose Postfix needs a resolv.conf of its own.
requires_private_resolv_conf = pytest.mark.skipif(
    not can_bind_resolv_conf(),
    reason="cannot give Postfix its own /etc/resolv.conf here (unshare -m and mount --bind)",
)


@dataclass(frozen=True)
class Delivery:
    """One message as the LMTP sink received it."""

    mail_from: str
    recipients: tuple[str, ...]
    data: bytes


class _LMTPHandler(socketserver.StreamRequestHandler):
    """Just enough LMTP (RFC 2033) to accept everything Postfix delivers."""

    server: _LMTPServer

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode("ascii") + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        self.reply("220 sink LMTP ready")
        mail_from: str | None = None
        recipients: list[str] = []
        while True:
            line = self.rfile.readline()
            if not line:
                return
            command = line.rstrip(b"\r\n").decode("utf-8", "replace")
            verb = command.split(" ", 1)[0].upper()
            if verb == "LHLO":
                self.reply("250-sink")
                self.reply("250-8BITMIME")
                self.reply("250 ENHANCEDSTATUSCODES")
            elif verb == "MAIL":
                mail_from = _angle(command)
                recipients = []
                self.reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                recipients.append(_angle(command))
                self.reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if mail_from is None or not recipients:
                    self.reply("503 5.5.1 MAIL and RCPT first")
                    continue
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                data = self._readData()
                if data is None:
                    return
                self.server.sink.received(Delivery(mail_from, tuple(recipients), data))
                for _ in recipients:
                    self.reply("250 2.0.0 Ok: delivered")
                mail_from, recipients = None, []
            elif verb == "RSET":
                mail_from, recipients = None, []
                self.reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                self.reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:
                self.reply("502 5.5.2 Command not recognised")

    def _readData(self) -> bytes | None:
        lines: list[bytes] = []
        while True:
            line = self.rfile.readline()
            if not line:
                return None
            if line in (b".\r\n", b".\n"):
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b"..") else line)


def _angle(command: str) -> str:
    """The address between the first C{<} and C{>} of an SMTP command."""
    start = command.find("<")
    end = command.find(">", start + 1)
    return command[start + 1 : end] if start >= 0 and end > start else ""


class _LMTPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, sink: LMTPSink) -> None:
        self.sink = sink
        super().__init__(("127.0.0.1", 0), _LMTPHandler)


class LMTPSink:
    """
    An LMTP server on a free loopback port, in a thread of the test
    process, that accepts and records every message.
    """

    def __init__(self) -> None:
        self._server = _LMTPServer(self)
        self.port: int = self._server.server_address[1]
        self._lock = threading.Lock()
        self._deliveries: list[Delivery] = []
        self._thread: threading.Thread | None = None

    @property
    def transport(self) -> str:
        """The Postfix transport that delivers here."""
        return f"lmtp:inet:127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="lmtp-sink", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=STARTUP_DEADLINE)
            self._thread = None
        self._server.server_close()

    def received(self, delivery: Delivery) -> None:
        with self._lock:
            self._deliveries.append(delivery)

    @property
    def deliveries(self) -> list[Delivery]:
        """Every message received so far."""
        with self._lock:
            return list(self._deliveries)

    def wait_for(self, count: int, deadline: float = STARTUP_DEADLINE) -> list[Delivery]:
        """Wait until at least C{count} messages arrived; all of them."""
        wait_for(lambda: len(self.deliveries) >= count, f"{count} LMTP deliveries", deadline)
        return self.deliveries

    def __enter__(self) -> LMTPSink:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def readme_configuration(
    socketmap: tuple[str, int], policy: tuple[str, int], sasl: tuple[str, int]
) -> tuple[dict[str, str], dict[str, str]]:
    """
    The set-up the README gives, for a daemon listening on these TCP
    addresses: the C{main.cf} parameters (the four maps, SASL logins,
    C{reject_sender_login_mismatch}) and the C{-o} options of a submission
    C{smtpd} (logins required to relay, the quota policy at the end of
    data), for L{PostfixInstance}'s C{main=} and L{PostfixInstance.add_smtpd}.
    """

    def table(name: str) -> str:
        return f"socketmap:inet:{socketmap[0]}:{socketmap[1]}:{name}"

    main = {
        "virtual_mailbox_domains": table("domain"),
        "virtual_mailbox_maps": table("mailbox"),
        "virtual_alias_maps": table("alias"),
        "smtpd_sender_login_maps": table("senders"),
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_type": "dovecot",
        "smtpd_sasl_path": f"inet:{sasl[0]}:{sasl[1]}",
        "smtpd_sender_restrictions": "reject_sender_login_mismatch",
        # A -o option cannot hold a space: master.cf refers to this.
        "userli_policy": f"check_policy_service inet:{policy[0]}:{policy[1]}",
    }
    submission = {
        "smtpd_relay_restrictions": "permit_sasl_authenticated,reject",
        "smtpd_end_of_data_restrictions": "$userli_policy",
    }
    return main, submission


#: The services of a working instance, chroot off everywhere.
_MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_running: list[PostfixInstance] = []


@atexit.register
def _stopLeftovers() -> None:
    """An instance a crashed test left running stops with the test process."""
    for instance in list(_running):
        instance.stop()


class PostfixInstance:
    """
    A private Postfix instance delivering everything to C{lmtp_port}.

    @param lmtp_port: where L{LMTPSink} listens.
    @param main: C{main.cf} parameters added to (or replacing) the defaults.
    @param smtpd_options: C{-o name=value} options of the main C{smtpd}
        service (on L{smtp_port}).
    @param services: further C{master.cf} lines, verbatim.
    @param directory: the instance's directory (created if missing);
        by default a fresh temporary one, removed by L{cleanup}.
    @param resolv_conf: the text of the C{/etc/resolv.conf} this instance
        sees (in a mount namespace of its own), or C{None} for the system's.
    """

    def __init__(
        self,
        lmtp_port: int,
        main: Mapping[str, str] | None = None,
        smtpd_options: Mapping[str, str] | None = None,
        services: Iterable[str] = (),
        directory: Path | None = None,
        resolv_conf: str | None = None,
    ) -> None:
        self._ownDirectory = directory is None
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix="postfix-"))
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # mkdtemp makes it 0700; the postfix user must get through it.
        os.chmod(self.directory, 0o755)
        self.config_directory = self.directory / "etc"
        self.queue_directory = self.directory / "queue"
        self.data_directory = self.directory / "data"
        self.log_path = self.directory / "maillog"
        self.lmtp_port = lmtp_port
        self.smtp_port = free_port()
        self.main: dict[str, str] = dict(main or {})
        self.services = list(services)
        self._smtpd: list[tuple[int, dict[str, str]]] = [
            (self.smtp_port, dict(smtpd_options or {}))
        ]
        self._postfix = postfix_command("postfix") or "postfix"
        self._masterPid: int | None = None
        self.resolv_conf = resolv_conf

    def add_smtpd(self, options: Mapping[str, str] | None = None) -> int:
        """
        Another C{smtpd} listener, with its own C{-o} options, on a free
        port; call before L{start}.  Its port.
        """
        port = free_port()
        self._smtpd.append((port, dict(options or {})))
        return port

    def main_cf(self) -> dict[str, str]:
        """The C{main.cf} parameters of this instance."""
        lmtp = f"lmtp:inet:127.0.0.1:{self.lmtp_port}"
        parameters = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_directory),
            "data_directory": str(self.data_directory),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "mx.example.test",
            "mydomain": "example.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "relay_domains": "",
            "mynetworks": "127.0.0.0/8",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "default_transport": lmtp,
            "relay_transport": lmtp,
            "virtual_transport": lmtp,
            "local_transport": lmtp,
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.directory),
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtpd_error_sleep_time": "0",
            # A service whose process died at start (e.g. while a test had
            # the daemon down) is throttled for 60 s by default, longer than
            # a test waits for a greeting.
            "service_throttle_time": "1s",
            "in_flow_delay": "0",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "delay_warning_time": "0",
            "smtputf8_enable": "no",
        }
        parameters.update(self.main)
        return parameters

    def master_cf(self) -> str:
        """The C{master.cf} of this instance."""
        lines = []
        for port, options in self._smtpd:
            lines.append(f"127.0.0.1:{port} inet n - n - - smtpd")
            lines.extend(f"  -o {name}={value}" for name, value in options.items())
        return (
            "\n".join(lines)
            + "\n"
            + _MASTER_SERVICES
            + "".join(line.rstrip("\n") + "\n" for line in self.services)
        )

    def write_configuration(self) -> None:
        """Write C{main.cf} and C{master.cf}, and make the directories Postfix needs."""
        self.config_directory.mkdir(exist_ok=True)
        (self.config_directory / "main.cf").write_text(
            "".join(f"{name} = {value}\n" for name, value in self.main_cf().items())
        )
        (self.config_directory / "master.cf").write_text(self.master_cf())
        self.queue_directory.mkdir(exist_ok=True)
        self.data_directory.mkdir(exist_ok=True)
        shutil.chown(self.data_directory, "postfix")
        os.chmod(self.data_directory, 0o700)

    def postfix(
        self, *arguments: str, check: bool = True, namespace: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """
        Run C{postfix -c CONFIG_DIR ARGUMENTS}; with C{namespace}, in a
        mount namespace of its own with L{resolv_conf} as C{/etc/resolv.conf}
        (the processes it starts stay there).
        """
        command = [self._postfix, "-c", str(self.config_directory), *arguments]
        if namespace:
            resolv_conf = self.directory / "resolv.conf"
            resolv_conf.write_text(self.resolv_conf or "")
            os.chmod(resolv_conf, 0o644)
            command = [
                *_PRIVATE_MOUNTS,
                'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"',
                "sh",
                str(resolv_conf),
                *command,
            ]
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=STARTUP_DEADLINE,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"postfix {' '.join(arguments)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n--- maillog ---\n{self.log()}"
            )
        return result

    @property
    def pid_file(self) -> Path:
        return self.queue_directory / "pid" / "master.pid"

    def master_pid(self) -> int | None:
        """The master process's pid from its pid file, if there is one."""
        try:
            return int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def start(self) -> None:
        """Start the instance; return when every C{smtpd} listener accepts."""
        self.write_configuration()
        self.postfix("start", namespace=self.resolv_conf is not None)
        _running.append(self)
        self._masterPid = self.master_pid()
        for port, _ in self._smtpd:
            address = ("127.0.0.1", port)
            wait_for(lambda a=address: accepts(a), f"Postfix smtpd on port {port}")  # type: ignore[misc]

    def stop(self) -> None:
        """Stop the instance and wait until its master process has gone."""
        if self in _running:
            _running.remove(self)
        pid = self.master_pid() or self._masterPid
        if pid is None or not _alive(pid):
            return
        self.postfix("stop", check=False)
        try:
            wait_for(lambda: not _alive(pid), "the Postfix master to exit")
        except TimeoutError:
            os.kill(pid, 9)
            wait_for(lambda: not _alive(pid), "the Postfix master to die")

    def cleanup(self) -> None:
        """Stop, and remove the instance directory if it was made here."""
        self.stop()
        if self._ownDirectory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def log(self) -> str:
        """Postfix's log so far."""
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, deadline: float = STARTUP_DEADLINE) -> None:
        """Wait until C{text} appears in Postfix's log."""
        wait_for(lambda: text in self.log(), f"{text!r} in the Postfix log", deadline)

    def queue(self) -> str:
        """C{postqueue -p}: what is still queued."""
        postqueue = postfix_command("postqueue") or "postqueue"
        return subprocess.run(
            [postqueue, "-c", str(self.config_directory), "-p"],
            capture_output=True,
            text=True,
            timeout=STARTUP_DEADLINE,
            check=False,
        ).stdout

    def queued(self) -> list[dict[str, Any]]:
        """C{postqueue -j}: one JSON object per queued message (C{queue_name}, C{sender}, ...)."""
        postqueue = postfix_command("postqueue") or "postqueue"
        output = subprocess.run(
            [postqueue, "-c", str(self.config_directory), "-j"],
            capture_output=True,
            text=True,
            timeout=STARTUP_DEADLINE,
            check=False,
        ).stdout
        return [json.loads(line) for line in output.splitlines() if line.strip()]

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()


def _alive(pid: int) -> bool:
    """Whether C{pid} runs (a zombie nobody reaps counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
