"""
Keeps OpenSSL out of a process whose configuration uses no TLS.

Twisted imports pyOpenSSL, and with it cryptography's bindings to OpenSSL,
as soon as the reactor or L{twisted.internet.endpoints} is imported,
whether or not a TLS connection is ever made.  That is about 13 MB of every
process's memory (a quarter of the daemon's), for nothing when Userli is
reached over C{http://} (on the same host or a private network), Redis over
C{redis://} and the listeners are plain TCP or UNIX sockets.

L{loadWithoutTLS} therefore imports Twisted's networking with pyOpenSSL
hidden, before anything else has imported it: Twisted then runs exactly as
on a machine without pyOpenSSL, its TLS support switched off.  txredisapi
imports two of Twisted's TLS modules unconditionally; while it is loaded
they are stood in for by placeholders that fail loudly if ever used.  The
caller decides from the configuration (L{userli_postfix.config.uses_tls}),
and with any TLS configured the import happens normally.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from types import ModuleType
from typing import Any, NoReturn

# Imported with pyOpenSSL hidden, in this order: Twisted's networking
# (which treats TLS as optional), then what imports TLS unconditionally.
TWISTED_MODULES = (
    "twisted.internet.reactor",
    "twisted.internet.endpoints",
    "twisted.web.client",
)
PLACEHOLDER_MODULES = ("twisted.internet.ssl", "twisted.protocols.tls")


class TLSNotLoaded(RuntimeError):
    """A TLS feature was used in a process started without TLS support."""


class _Placeholder(ModuleType):
    """
    Stands in for a TLS module while a library that imports it
    unconditionally is loaded: every name is a class that cannot be used.
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        qualified = f"{self.__name__}.{name}"

        def refuse(*args: Any, **kwargs: Any) -> NoReturn:
            raise TLSNotLoaded(
                f"{qualified}: TLS support was not loaded, because the "
                "configuration asks for no TLS"
            )

        return type(name, (), {"__new__": refuse, "__module__": self.__name__})


def tlsLoaded() -> bool:
    """Whether pyOpenSSL is in this process."""
    return "OpenSSL" in sys.modules


def loadWithoutTLS(modules: Iterable[str] = ()) -> bool:
    """
    Import Twisted's networking, then C{modules}, with pyOpenSSL hidden.

    @param modules: what else to import while TLS is hidden: everything the
        process will use, so nothing imports TLS later.
    @return: whether TLS was kept out; C{False} when it is too late (pyOpenSSL
        or Twisted's networking was already imported), in which case the
        modules are imported as usual.
    """
    if tlsLoaded() or any(name in sys.modules for name in TWISTED_MODULES):
        for name in modules:
            importlib.import_module(name)
        return False
    hidden: dict[str, ModuleType | None] = {"OpenSSL": None}
    # None in sys.modules makes "import OpenSSL" fail with ImportError.
    sys.modules.update(hidden)  # type: ignore[arg-type]
    try:
        for name in TWISTED_MODULES:
            importlib.import_module(name)
        placeholders = {name: _Placeholder(name) for name in PLACEHOLDER_MODULES}
        sys.modules.update(placeholders)
        hidden.update(placeholders)
        for name in modules:
            importlib.import_module(name)
    finally:
        for name, module in hidden.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
    return True
