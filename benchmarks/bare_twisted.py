"""
The smallest Twisted socketmap server there is: a NetstringReceiver that
answers every request with ``OK 1``.  It is what the daemon's hot path
would cost if looking up the answer were free, so the benchmark shows it
beside the daemon.

    python benchmarks/bare_twisted.py PORT
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import NetstringReceiver


class Answer(NetstringReceiver):
    """Answers ``OK 1`` to everything."""

    def stringReceived(self, string: bytes) -> None:
        self.sendString(b"OK 1")


def main() -> None:
    factory = Factory.forProtocol(Answer)
    factory.noisy = False
    port = reactor.listenTCP(int(sys.argv[1]), factory, backlog=1024, interface="127.0.0.1")  # type: ignore[attr-defined]
    print(f"listening on {port.getHost().port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
