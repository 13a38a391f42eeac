"""Tests for L{userli_postfix.unixsocket}: dead socket files are replaced, live ones kept."""

from __future__ import annotations

import os
import socket
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.unixsocket import isDead, removeStaleSocket, socketPath


class UnixSocketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.path = os.path.join(self.directory, "auth")

    def tearDown(self) -> None:
        for name in os.listdir(self.directory):
            os.unlink(os.path.join(self.directory, name))
        os.rmdir(self.directory)

    def bound(self, listen: bool) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        if listen:
            sock.listen(1)
        return sock

    def test_socketPath(self) -> None:
        """The path comes out of unix: descriptions, escapes undone; other types have none."""
        self.assertEqual(socketPath("unix:/run/x\\:y.sock:mode=660:lockfile=1"), "/run/x:y.sock")
        self.assertIsNone(socketPath("tcp:10001"))

    def test_deadSocketRemoved(self) -> None:
        """A socket file nobody listens on (left by another program) is removed."""
        self.bound(listen=False).close()
        self.assertTrue(isDead(self.path))
        removeStaleSocket(f"unix:{self.path}:mode=666")
        self.assertFalse(os.path.exists(self.path))

    def test_liveSocketKept(self) -> None:
        """A socket a running server accepts on is left alone."""
        server = self.bound(listen=True)
        self.addCleanup(server.close)
        self.assertFalse(isDead(self.path))
        removeStaleSocket(f"unix:{self.path}")
        self.assertTrue(os.path.exists(self.path))

    def test_regularFileKept(self) -> None:
        """A file that is not a socket is never deleted."""
        with open(self.path, "w") as f:
            f.write("data")
        removeStaleSocket(f"unix:{self.path}")
        self.assertTrue(os.path.exists(self.path))

    def test_missingIsFine(self) -> None:
        """No file at all: nothing to do, no error."""
        removeStaleSocket(f"unix:{self.path}")
        self.assertFalse(os.path.exists(self.path))
