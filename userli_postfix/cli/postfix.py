"""
The Postfix side of a configuration: the ``main.cf`` and ``master.cf``
lines that point Postfix at the daemon's listeners, for C{userli-postfix
check}.  Pure functions of the checked L{Config}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from userli_postfix.config import LISTENERS, Config

# Where Postfix's chrooted services find their private sockets: a socket
# path under it is given relative to the queue directory.
QUEUE_DIRECTORY = "/var/spool/postfix/"

# Postfix runs the policy only where the master.cf services say so: the
# submission ports, where every sender has logged in.
SUBMISSION_SERVICES = ("submission", "submissions")


def split_description(description: str) -> tuple[str, list[str], dict[str, str]]:
    """
    A Twisted endpoint description as (type, positional arguments, keyword
    arguments), honouring backslash escapes (C{tcp6:10001:interface=\\:\\:1}).
    """
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    kind, args = parts[0], parts[1:]
    positional = [a for a in args if "=" not in a]
    keywords = dict(a.split("=", 1) for a in args if "=" in a)
    return kind, positional, keywords


def postfix_address(description: str) -> str | None:
    """
    How Postfix reaches a listener (C{inet:HOST:PORT} or C{unix:PATH}), or
    C{None} when it cannot (TLS, or a socket systemd passes in).  A
    listener on every interface is reached on the IPv4 loopback address.
    """
    kind, positional, keywords = split_description(description)
    if kind in ("tcp", "tcp6"):
        port = keywords.get("port") or (positional[0] if positional else "")
        interface = keywords.get("interface", "")
        if interface in ("", "::", "0.0.0.0"):
            # Every address (IPv6 on Linux takes IPv4 too): IPv4 loopback
            # works whatever Postfix's inet_protocols says.
            return f"inet:127.0.0.1:{port}"
        if ":" in interface:
            return f"inet:[{interface}]:{port}"
        host = interface
        return f"inet:{host}:{port}"
    if kind == "unix":
        path = keywords.get("address") or (positional[0] if positional else "")
        return f"unix:{path}"
    return None


def _sasl_path(address: str) -> str:
    """C{smtpd_sasl_path}: a socket in Postfix's queue directory is given relative to it."""
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        return path[len(QUEUE_DIRECTORY) :] if path.startswith(QUEUE_DIRECTORY) else path
    return address


@dataclass(frozen=True)
class PostfixLines:
    """What to put into Postfix's configuration, and what cannot be put there."""

    main_cf: list[str] = field(default_factory=list)
    master_cf: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def postfix_lines(config: Config) -> PostfixLines:
    """The lines that connect Postfix to the configured listeners."""
    lines = PostfixLines()
    addresses: dict[str, str] = {}
    for listener in LISTENERS:
        description = config.endpoint(listener)
        if description is None or not listener.postfix:
            continue
        variable = listener.variable
        address = postfix_address(description)
        if address is None:
            lines.notes.append(
                f"{variable} ({description}): Postfix cannot connect to this listener "
                "itself (TLS, or a socket passed in by systemd): use the address it is "
                "reached at"
            )
        else:
            addresses[variable] = address
    socketmap = addresses.get("SOCKETMAP_LISTEN_ADDR")
    if socketmap is not None:
        lines.main_cf.extend(
            [
                f"virtual_mailbox_domains = socketmap:{socketmap}:domain",
                f"virtual_mailbox_maps = socketmap:{socketmap}:mailbox",
                f"virtual_alias_maps = socketmap:{socketmap}:alias",
                f"smtpd_sender_login_maps = socketmap:{socketmap}:senders",
            ]
        )
    policy = addresses.get("POLICY_LISTEN_ADDR")
    sasl = addresses.get("SASL_LISTEN_ADDR")
    if policy is not None:
        lines.main_cf.append(f"userli_policy = check_policy_service {policy}")
    if sasl is not None:
        lines.main_cf.extend(["smtpd_sasl_type = dovecot", f"smtpd_sasl_path = {_sasl_path(sasl)}"])
    if policy is not None or sasl is not None:
        for service in SUBMISSION_SERVICES:
            lines.master_cf.append(f"{service} inet n - y - - smtpd")
            if service == "submissions":
                lines.master_cf.append("  -o smtpd_tls_wrappermode=yes")
            if sasl is not None:
                lines.master_cf.append("  -o smtpd_sasl_auth_enable=yes")
            if policy is not None:
                lines.master_cf.append("  -o smtpd_end_of_data_restrictions=$userli_policy")
    if config.rate_limit_identity != "sasl":
        lines.notes.append(
            "RATE_LIMIT_IDENTITY=sasl_or_sender counts unauthenticated senders too: "
            "with the policy on port 25, anyone can use up a local user's quota by "
            "forging the sender; RATE_LIMIT_IDENTITY=sasl is recommended"
        )
    return lines
