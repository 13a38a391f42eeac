"""
Replacing a stale UNIX socket file before listening on it.

A socket file outlives the process that made it.  Twisted's ``lockfile=1``
only recovers a socket left by an earlier run of this daemon (it looks for
our own stale ``.lock`` file); one left by the Go program, by Dovecot or by a
run without a lock file blocks the start with "Address already in use".  A
socket file that nobody answers on is dead and safe to remove; one that
accepts a connection belongs to a running server and is left alone, so the
start fails loudly instead of stealing it.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from twisted.logger import Logger

from userli_postfix.listening import UNIXListen, describe

log = Logger()


def socketPath(description: str) -> str | None:
    """The file a C{unix:} endpoint description listens on, else C{None}."""
    if not description.startswith("unix:"):
        return None
    request = describe(description)
    return request.path if isinstance(request, UNIXListen) else None


def isDead(path: str) -> bool:
    """Whether C{path} is a socket file that refuses connections."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as error:
        return error.errno in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return False


def removeStaleSocket(description: str) -> None:
    """Remove the socket file of a C{unix:} listener when it is dead."""
    path = socketPath(description)
    if path is None or not isDead(path):
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    log.info("Removed the stale socket {path}", path=path)
