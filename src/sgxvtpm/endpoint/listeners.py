"""Listening sockets served by threads: one accept thread per socket, one thread per connection.

The endpoints' per-command path is a blocking recv, the codec, the vTPM call
and a blocking send in the connection's own thread: no event loop, timer or
task per command. :meth:`Listeners.close` wakes every thread with
shutdown(2) (a listening socket's accept(2) then fails with EINVAL, a
connection's recv(2) returns end of stream) and joins them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sgxvtpm.util import log

Handler = Callable[[socket.socket], None]

#: How long close() waits for the threads (a thread inside a slow TPM command
#: finishes it; its answer is then dropped).
JOIN_TIMEOUT = 2.0
_ACCEPT_RETRY = 0.1  # after EMFILE and the like, so a full table does not spin


class Listeners:
    """Listening sockets and the threads that serve their connections."""

    def __init__(self) -> None:
        self._listeners: list[socket.socket] = []
        self._paths: list[Path] = []
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._closed = False

    def unix(self, path: Path, handler: Handler, backlog: int = 128) -> None:
        """Listen on unix socket ``path`` (mode 0600), replacing a stale one."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        self._paths.append(path)
        self._listen(sock, handler)

    def tcp(self, host: str, port: int, handler: Handler) -> int:
        """Listen on ``host:port`` (0: any free port); the port bound."""
        sock = socket.create_server((host, port))  # SO_REUSEADDR, as asyncio's servers
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
        for path in self._paths:
            with contextlib.suppress(FileNotFoundError):
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
