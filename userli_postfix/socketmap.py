"""
The Postfix socketmap protocol (``socketmap_table(5)``): netstrings in,
netstrings out.  Framing only; the answers come from L{Lookups}.
"""

from __future__ import annotations

from prometheus_client import Gauge
from twisted.internet.interfaces import IReactorTime
from twisted.protocols.basic import NetstringReceiver

from userli_postfix.lookups import Lookups
from userli_postfix.metrics import Metrics
from userli_postfix.serving import LimitedFactory, ServingMixin

# Longer than any "<map> <address>" Postfix sends (an address is at most a
# few hundred bytes); anything longer is garbage or an attack.
MAX_REQUEST = 4096

# Postfix closes an idle socketmap connection after about 10 s; we wait
# longer so that Postfix, not us, normally ends a connection.
IDLE_TIMEOUT = 30.0


def netstring(data: bytes) -> bytes:
    """Frame C{data} as a netstring."""
    return b"%d:%s," % (len(data), data)


class SocketmapProtocol(ServingMixin, NetstringReceiver):
    """One Postfix socketmap connection."""

    MAX_LENGTH = MAX_REQUEST
    factory: SocketmapFactory

    def stringReceived(self, string: bytes) -> None:
        answer = self.factory.lookups.answer(string)
        if isinstance(answer, bytes):
            self.reply(netstring(answer))
        else:
            self.reply(answer.addCallback(netstring))


class SocketmapFactory(LimitedFactory):
    """Builds socketmap connections, at most 500 at a time."""

    protocol = SocketmapProtocol
    noisy = False

    def __init__(self, clock: IReactorTime, lookups: Lookups, metrics: Metrics) -> None:
        usage: Gauge = metrics.connection_pool_usage
        super().__init__(
            clock,
            IDLE_TIMEOUT,
            active=metrics.active_connections,
            usage=usage,
        )
        self.lookups = lookups
