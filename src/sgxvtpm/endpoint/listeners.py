"""Listening sockets served by threads: one accept thread per socket, one thread per connection.

The endpoints' per-command path is a blocking recv, the codec, the vTPM call
and a blocking send in the connection's own thread: no event loop, timer or
task per command. :meth:`Listeners.close` wakes every thread with
shutdown(2) (a listening socket's accept(2) then fails with EINVAL, a
connection's recv(2) returns end of stream) and joins them.

Who may connect: whoever can connect to an endpoint's socket can use the
VM's TPM. A unix socket gets the mode, owner and group of its
:class:`SocketAccess` (default 0600, the endpoint's own user: as swtpm's
``--server type=unixio,mode=,uid=,gid=``), set before listen(2), so no
connection is ever accepted under other permissions. TCP has no such
control (any local user can connect), so TCP listens on loopback only.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import os
import pwd
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sgxvtpm.util import log

Handler = Callable[[socket.socket], None]

# bind(2) creates a unix socket with 0777 & ~umask; the umask is per process,
# so binds here are serialised and restore it at once.
_UMASK_LOCK = threading.Lock()


@dataclass(frozen=True)
class SocketAccess:
    """Mode, owner and group of a unix socket (-1: the process's own uid/gid)."""

    mode: int = 0o600
    uid: int = -1
    gid: int = -1

    def __post_init__(self) -> None:
        if not 0 <= self.mode <= 0o777:
            raise ValueError(f"socket mode must be permission bits 0..0777, got {self.mode:#o}")

    @classmethod
    def parse(cls, mode: str | None = None, owner: str | None = None,
              group: str | None = None) -> SocketAccess:
        """From command-line text: octal mode, user and group by name or number."""
        bits = 0o600
        if mode is not None:
            try:
                bits = int(mode, 8)
            except ValueError:
                raise ValueError(f"--mode: expected octal permission bits such as 0660, "
                                 f"got {mode!r}") from None
        return cls(bits, _uid(owner), _gid(group))


#: The default: mode 0600, the endpoint's own user.
OWNER_ONLY = SocketAccess()


def _uid(owner: str | None) -> int:
    return _lookup_id(owner, lambda name: pwd.getpwnam(name).pw_uid, "--owner: no user")


def _gid(group: str | None) -> int:
    return _lookup_id(group, lambda name: grp.getgrnam(name).gr_gid, "--group: no group")


def _lookup_id(name: str | None, lookup: Callable[[str], int], missing: str) -> int:
    """-1 for None (chown: unchanged), a number as itself, else ``lookup(name)``."""
    if name is None:
        return -1
    if name.isdigit():
        return int(name)
    try:
        return lookup(name)
    except KeyError:
        raise ValueError(f"{missing} {name!r}") from None


def loopback_host(host: str) -> str:
    """``host`` as a loopback address literal; ValueError for anything else.

    TCP reaches the endpoint from wherever the address is routed; only
    loopback keeps it on this machine. ``localhost`` means 127.0.0.1 (a
    name that resolves elsewhere is not followed).
    """
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ValueError(f"refusing to listen on {host!r}: TCP endpoints listen on loopback "
                         "only (127.0.0.1 or ::1)")
    return str(address)

#: How long close() waits for the threads (a thread inside a slow TPM command
#: finishes it; its answer is then dropped).
JOIN_TIMEOUT = 2.0
_ACCEPT_RETRY = 0.1  # after EMFILE and the like, so a full table does not spin


class Listeners:
    """Listening sockets and the threads that serve their connections."""

    def __init__(self) -> None:
        self._listeners: list[socket.socket] = []
        self._paths: list[tuple[Path, tuple[int, int]]] = []  # with (st_dev, st_ino)
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._closed = False

    def unix(
        self, path: Path, handler: Handler, backlog: int = 128,
        access: SocketAccess = OWNER_ONLY,
    ) -> None:
        """Listen on unix socket ``path`` with ``access``, replacing a stale socket there.

        Anything at ``path`` that is not a socket is left alone (an error):
        a mistyped path must not cost a file.
        """
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            path.unlink()
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _UMASK_LOCK:
                old = os.umask(0o777 & ~access.mode)  # created with exactly access.mode
                try:
                    sock.bind(str(path))
                finally:
                    os.umask(old)
            if access.uid != -1 or access.gid != -1:
                os.chown(path, access.uid, access.gid, follow_symlinks=False)
            made = os.lstat(path)
            sock.listen(backlog)  # connections are possible from here on, not before
        except OSError:
            sock.close()
            raise
        self._paths.append((path, (made.st_dev, made.st_ino)))
        self._listen(sock, handler)

    def adopt(self, sock: socket.socket, handler: Handler, path: Path | None = None) -> None:
        """Serve ``sock``, a unix socket already bound and listening (its permissions set
        by whoever bound it); ``path``, its file, is removed by :meth:`close`."""
        if path is not None:
            made = os.lstat(path)
            self._paths.append((path, (made.st_dev, made.st_ino)))
        self._listen(sock, handler)

    def tcp(self, host: str, port: int, handler: Handler) -> int:
        """Listen on loopback ``host:port`` (0: any free port); the port bound."""
        address = loopback_host(host)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        # SO_REUSEADDR, as asyncio's servers
        sock = socket.create_server((address, port), family=family)
        self._listen(sock, handler)
        return int(sock.getsockname()[1])

    def serve(self, sock: socket.socket, handler: Handler) -> threading.Thread | None:
        """Serve the connected ``sock`` in a thread of its own, which closes it.

        None (and ``sock`` closed) once :meth:`close` has begun.
        """
        with self._lock:
            if self._closed:
                sock.close()
                return None
            self._conns.add(sock)  # now, so that shutdown() and close() reach it at once
        try:
            return self._spawn(self._serve, sock, handler)
        except RuntimeError as exc:  # can't start new thread: refuse this connection
            log.log("endpoint.connection_refused", reason=str(exc))
            with self._lock:
                self._conns.discard(sock)
                sock.close()
            return None

    def shutdown(self, sock: socket.socket) -> None:
        """Wake the thread serving ``sock`` (its reads see end of stream, its writes fail)."""
        with self._lock:
            if sock in self._conns:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self, timeout: float = JOIN_TIMEOUT) -> None:
        with self._lock:
            self._closed = True
            for sock in (*self._listeners, *self._conns):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        for path, made in self._paths:
            # Only the socket made here: a later endpoint may have replaced it.
            with contextlib.suppress(FileNotFoundError):
                now = os.lstat(path)
                if (now.st_dev, now.st_ino) == made:
                    path.unlink()
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        self._paths.clear()

    # ------------------------------------------------------------ threads

    def _listen(self, sock: socket.socket, handler: Handler) -> None:
        self._listeners.append(sock)
        self._spawn(self._accept_loop, sock, handler)

    def _spawn(self, target: Callable[..., None], *args: object) -> threading.Thread:
        def run() -> None:
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(thread)

        thread = threading.Thread(target=run, daemon=True)
        with self._lock:
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError:
            with self._lock:
                self._threads.discard(thread)
            raise
        return thread

    def _accept_loop(self, listener: socket.socket, handler: Handler) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                if self._closed:
                    return
                log.log("endpoint.accept_failed", error=type(exc).__name__, reason=str(exc))
                time.sleep(_ACCEPT_RETRY)
                continue
            self.serve(conn, handler)

    def _serve(self, sock: socket.socket, handler: Handler) -> None:
        try:
            handler(sock)
        except OSError:
            pass  # the peer went away or close() shut the socket down
        except Exception as exc:  # a bug must cost one connection, not the endpoint
            log.log("endpoint.connection_failed", error=type(exc).__name__, reason=str(exc))
        finally:
            with self._lock:
                self._conns.discard(sock)
                sock.close()
