"""
The command line of C{userli-postfix}: the daemon's settings as options
(over the same environment variables), then a command.  Twisted's
C{usage.Options}, as the daemon's C{tap.py}: every command has C{--help},
and a bad command line raises C{usage.UsageError} before anything runs.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from userli_postfix import __version__
from userli_postfix.cli.commands import CACHE_MAPS, MAPS
from userli_postfix.config import SETTINGS


class _Command(usage.Options):
    """
    What every command shares: C{--json} (listed in every C{--help}; taken
    out of the command line by L{parse} wherever it stands, as getopt stops
    at the first argument).
    """

    optFlags = [["json", "j", "one JSON document on stdout instead of readable lines"]]
    #: The command's words without its arguments, e.g. C{"quota show"}.
    name = ""

    def command(self) -> tuple[str, ...]:
        """The command's words and arguments, e.g. C{("quota", "show", "a@x")}."""
        raise NotImplementedError

    def commandName(self) -> str:
        """The command's words without its arguments, e.g. C{"quota show"}."""
        return self.name


def _map(name: str, maps: tuple[str, ...] = MAPS) -> str:
    if name not in maps:
        raise usage.UsageError(f"unknown map {name!r} (one of {', '.join(maps)})")
    return name


class CheckOptions(_Command):
    name = "check"
    synopsis = "[--json]"
    longdesc = (
        "The configuration as the daemon sees it (secrets hidden); whether Userli is "
        "reached with the token; whether Redis is reached, its version, whether client "
        "tracking works and the Sentinel master; the Postfix lines for the listeners. "
        "Exit status 0 only when all is well."
    )

    def parseArgs(self) -> None:
        pass

    def command(self) -> tuple[str, ...]:
        return ("check",)


class LookupOptions(_Command):
    name = "lookup"
    synopsis = "[--json] MAP KEY"
    longdesc = (
        "The reply Postfix would get for KEY in MAP (alias, domain, mailbox, senders): "
        "the normalised key, whether its domain is remembered as not Userli's (then "
        "the answer is NOTFOUND without asking Userli), the answer cached in Redis "
        "and for how long, and what Userli answers now. Exit status 0 for OK, 1 "
        "otherwise."
    )

    def parseArgs(self, mapname: str, key: str) -> None:  # type: ignore[override]
        self.mapname = _map(mapname)
        self.key = key

    def command(self) -> tuple[str, ...]:
        return ("lookup", self.mapname, self.key)


class _AddressOptions(_Command):
    def parseArgs(self, address: str) -> None:  # type: ignore[override]
        self.address = address


class QuotaShowOptions(_AddressOptions):
    name = "quota show"
    synopsis = "[--json] ADDRESS"
    longdesc = (
        "The identity ADDRESS is counted as, its limits from Userli, the messages "
        "counted in the last hour and day (from Redis), and when the next message "
        "would be accepted."
    )

    def command(self) -> tuple[str, ...]:
        return ("quota", "show", self.address)


class QuotaResetOptions(_AddressOptions):
    name = "quota reset"
    synopsis = "[--json] ADDRESS"
    longdesc = "Forget the messages counted for ADDRESS: its next message is accepted."

    def command(self) -> tuple[str, ...]:
        return ("quota", "reset", self.address)


class CacheDropOptions(_Command):
    name = "cache drop"
    synopsis = "[--json] MAP KEY"
    longdesc = (
        "Remove the cached answer of KEY (as given and normalised) in MAP, so the "
        "next lookup asks Userli; for the domain map, also forget that Userli does "
        "not host it; for tls_policy, the next lookup probes the domain again. "
        "Exit status 1 when nothing was cached."
    )

    def parseArgs(self, mapname: str, key: str) -> None:  # type: ignore[override]
        self.mapname = _map(mapname, CACHE_MAPS)
        self.key = key

    def command(self) -> tuple[str, ...]:
        return ("cache", "drop", self.mapname, self.key)


class CacheFlushOptions(_Command):
    name = "cache flush"
    synopsis = "[--json] [MAP]"
    longdesc = (
        "Remove every cached answer, or those of MAP only (SCAN and UNLINK, never KEYS); "
        "both, and flush domain, also forget every domain remembered as not Userli's."
    )

    def parseArgs(self, mapname: str | None = None) -> None:
        self.mapname = None if mapname is None else _map(mapname, CACHE_MAPS)

    def command(self) -> tuple[str, ...]:
        return ("cache", "flush") if self.mapname is None else ("cache", "flush", self.mapname)


class TLSPolicyOptions(_Command):
    name = "tls-policy"
    synopsis = "[--json] [--probe] DOMAIN"
    longdesc = (
        "The tls_policy answer Postfix gets for DOMAIN (or an address's domain): the "
        "verdict cached in Redis and for how long. With --probe, probe the domain's "
        "mail servers now (nothing is stored) and show, for each, its banner, whether "
        "it offers STARTTLS, whether the TLS handshake completed, the TLS version and "
        "cipher, or the error. Exit status 0 when the answer (the probe's, with "
        "--probe) is OK encrypt, 1 otherwise."
    )
    optFlags = [
        *_Command.optFlags,
        ["probe", "p", "probe the domain's mail servers now"],
    ]

    def parseArgs(self, domain: str) -> None:  # type: ignore[override]
        self.domain = domain

    def command(self) -> tuple[str, ...]:
        return ("tls-policy", self.domain, "probe" if self["probe"] else "cached")


class _Group(_Command):
    """A command with sub-commands (C{quota}, C{cache})."""

    subCommands: list[list[Any]]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("which one? " + ", ".join(c[0] for c in self.subCommands))

    def command(self) -> tuple[str, ...]:
        assert isinstance(self.subOptions, _Command)
        return self.subOptions.command()

    def commandName(self) -> str:
        assert isinstance(self.subOptions, _Command)
        return self.subOptions.commandName()


class QuotaOptions(_Group):
    synopsis = "show|reset ..."
    subCommands = [
        ["show", None, QuotaShowOptions, "a sender's limits and counted messages"],
        ["reset", None, QuotaResetOptions, "forget a sender's counted messages"],
    ]


class CacheOptions(_Group):
    synopsis = "drop|flush ..."
    subCommands = [
        ["drop", None, CacheDropOptions, "remove one cached answer"],
        ["flush", None, CacheFlushOptions, "remove every cached answer (of one map)"],
    ]


class Options(_Group):
    """
    C{userli-postfix [settings] COMMAND ...}: the daemon's settings as
    options, each over its environment variable, as for C{twistd
    userli-postfix}.
    """

    synopsis = "Usage: userli-postfix [options] check|lookup|quota|cache|tls-policy ..."
    longdesc = (
        "The operator's tool for userli-postfix. It reads the daemon's environment "
        "variables (and the same options), validated the same way. Exit status: 0 ok, "
        "1 not found or not ok, 2 usage or configuration error."
    )
    optParameters = [
        [s.option, None, None, f"{s.help} [env {s.variable}; default: {s.default or 'none'}]"]
        for s in SETTINGS
    ]
    subCommands = [
        ["check", None, CheckOptions, "check the configuration, Userli and Redis"],
        ["lookup", None, LookupOptions, "what Postfix would get for a key"],
        ["quota", None, QuotaOptions, "show or reset a sender's quota windows"],
        ["cache", None, CacheOptions, "drop cached lookup answers"],
        ["tls-policy", None, TLSPolicyOptions, "a domain's tls_policy answer; --probe: probe now"],
    ]

    def given(self) -> dict[str, str | None]:
        """The settings given as options, keyed by option name."""
        return {s.option: self[s.option] for s in SETTINGS}

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"userli-postfix {__version__}")
        raise SystemExit(0)


def parse(argv: list[str]) -> tuple[Options, bool]:
    """
    Parse C{argv} (without the program name): the options, and whether
    C{--json} was given anywhere before C{--}.  Raises C{usage.UsageError}.
    """
    as_json = False
    rest: list[str] = []
    for index, argument in enumerate(argv):
        if argument == "--":
            rest.extend(argv[index:])
            break
        if argument in ("--json", "-j"):
            as_json = True
        else:
            rest.append(argument)
    options = Options()  # type: ignore[no-untyped-call]
    options.parseOptions(rest)  # type: ignore[no-untyped-call]
    return options, as_json
