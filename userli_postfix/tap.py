"""
twistd wiring: command-line options over environment variables, and
L{makeService}.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from userli_postfix import __version__, multiprocess
from userli_postfix.config import SETTINGS, Config, ConfigError, raw_values


class Options(usage.Options):
    """
    Every setting is an environment variable (the Go program's names) and a
    twistd option; an option wins over the environment.
    """

    synopsis = "[options]"
    longdesc = (
        "Serves Postfix socketmap lookups, sending quotas (policy service) and SMTP "
        "logins (Dovecot auth protocol) from the Userli API. Every option can also be "
        "given as the environment variable shown in brackets."
    )
    optParameters = [
        [s.option, None, None, f"{s.help} [env {s.variable}; default: {s.default or 'none'}]"]
        for s in SETTINGS
    ]

    def postOptions(self) -> None:
        raw = raw_values(os.environ, self.given())
        # Before anything imports prometheus-client (see L{multiprocess}).
        multiprocess.prepare(raw["WORKERS"])
        self.config = Config.from_values(raw)

    def given(self) -> dict[str, str | None]:
        """The settings given as options, keyed by option name."""
        return {s.option: self[s.option] for s in SETTINGS}

    def parseOptions(self, options: Any = None) -> None:
        """
        Parse and check everything before twistd starts the reactor; a bad
        setting ends the process with one line naming the variable.
        """
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except ConfigError as error:
            sys.stderr.write(f"userli-postfix: configuration error: {error}\n")
            sys.stderr.flush()
            raise SystemExit(2) from None

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"userli-postfix {__version__}")
        raise SystemExit(0)


def makeService(options: Options | dict[str, Any], reactor: Any = None) -> IService:
    """Build the daemon from parsed options (or a dict holding C{config})."""
    from userli_postfix.daemon import build

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    if isinstance(options, Options):
        # Under twistd the plugin's options are a sub-command of twistd's,
        # whose own (--logfile, --syslog, -n, ...) say where the log goes.
        return build(options.config, reactor, options.given(), getattr(options, "parent", None))
    return build(options["config"], reactor, {})
