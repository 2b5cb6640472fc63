"""``swtpm socket`` for libvirt: the control socket first, then sgxvtpm's ``vm attach``.

libvirt waits one second for the control socket to appear after it started
swtpm. Importing the endpoint machinery (TLS, the sim platform's verifier,
the cryptography package) costs more than that on a loaded machine, so this
module binds and listens on the socket with the standard library only, and
only then imports :mod:`sgxvtpm.endpoint.libvirt.run`, which attaches to the
VM's instance over K2 and serves the connections that waited in the
listen backlog meanwhile.

Everything libvirt needs of swtpm's process is kept here: it may hold a
locked pidfile whose descriptor we inherit (never closed: Python keeps
inherited descriptors open); after the socket is up, stdout and stderr go to
``--log file=`` (libvirt stops reading them); ``--daemon`` forks into the
background once the socket exists; ``--pid file=`` gets the serving
process's pid.

What runs before the socket exists is kept to the bare interpreter: the
script ``sgxvtpm libvirt path`` writes runs Python with ``-I -S`` (no
site-packages scan, no ``.pth`` files, no sitecustomize) and this module
imports only ``os``, ``stat``, ``sys``, ``_socket`` and options.py (no
``socket``, ``signal``, ``contextlib``, ``typing``: each costs milliseconds,
tens of them on a loaded host). Once the socket listens, :func:`main` runs
``site.main()`` (the site-packages the heavy part needs) and imports the rest.
"""

from __future__ import annotations

import _socket
import os
import stat
import sys

from sgxvtpm.endpoint.libvirt.options import (
    SWTPM_FEATURES,
    VERSION,
    OptionError,
    SwtpmSocketArgs,
    info_text,
    parse_swtpm,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Sequence

MAX_SOCKET_PATH = 107  # sun_path less its NUL (unix(7))
BACKLOG = 16  # QEMU and swtpm_ioctl may both wait here while the heavy imports run


def _exists(path: str) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    return True


def _unlink(path: str) -> None:
    try:  # noqa: SIM105 - contextlib is one import more before the socket is up
        os.unlink(path)
    except OSError:
        pass


def bind_ctrl(args: SwtpmSocketArgs) -> _socket.socket:
    """The listening control socket, with the mode, owner and group asked for.

    Created under a umask that leaves exactly ``mode`` (no thread runs yet,
    so the process-wide umask may change), chowned before listen(2): no
    connection is accepted under other permissions. libvirt starts QEMU as
    soon as the path exists, so the socket is bound and listening under a
    temporary name first and renamed into place: whoever sees the path can
    connect. A stale socket at the path is replaced; anything else there is
    an error.
    """
    if args.ctrl_fd is not None:
        return _socket.socket(fileno=args.ctrl_fd)
    path = args.ctrl_path
    _exists(path)
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.{os.getpid()}")
    if len(os.fsencode(tmp)) > MAX_SOCKET_PATH:
        tmp = path  # no room for a temporary name: bind in place
        if _exists(path):
            os.unlink(path)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        old = os.umask(0o777 & ~args.ctrl_mode)
        try:
            sock.bind(tmp)
        finally:
            os.umask(old)
        if args.ctrl_uid != -1 or args.ctrl_gid != -1:
            os.chown(tmp, args.ctrl_uid, args.ctrl_gid, follow_symlinks=False)
        sock.listen(BACKLOG)
        if tmp != path:
            os.rename(tmp, path)
    except OSError:
        sock.close()
        if tmp != path:
            _unlink(tmp)
        raise
    return sock


def _redirect_output(args: SwtpmSocketArgs) -> None:
    """stdout and stderr to the log (libvirt closes its end of them once we run)."""
    if args.log_fd is not None:
        fd = args.log_fd
    elif args.log_file is not None:
        fd = os.open(args.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    else:
        fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if fd > 2:
        os.close(fd)


def _write_pid(args: SwtpmSocketArgs, pid: int) -> None:
    text = f"{pid}\n".encode()
    if args.pid_fd is not None:
        os.write(args.pid_fd, text)
        os.close(args.pid_fd)
    elif args.pid_file is not None:
        fd = os.open(args.pid_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, text)
        finally:
            os.close(fd)


def _daemonize(args: SwtpmSocketArgs) -> None:
    """Fork into a new session; the parent writes the child's pid file and leaves, so
    that the pid file exists when the command libvirt ran has returned."""
    child = os.fork()
    if child != 0:
        code = 0
        try:
            _write_pid(args, child)
        except OSError as exc:
            print(f"swtpm: --pid: {exc}", file=sys.stderr)
            import signal

            os.kill(child, signal.SIGTERM)
            code = 1
        os._exit(code)
    os.setsid()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"TPM emulator version {VERSION} (sgxvtpm)")
        return 0
    if argv[:1] != ["socket"]:
        print("swtpm: sgxvtpm provides `swtpm socket` only (TPM 2.0, unix control socket)",
              file=sys.stderr)
        return 1
    try:
        args = parse_swtpm(argv[1:])
    except OptionError as exc:
        print(f"swtpm: {exc}", file=sys.stderr)
        return 1
    info = info_text(args, "swtpm", SWTPM_FEATURES, f"TPM emulator version {VERSION} (sgxvtpm)")
    if info is not None:
        print(info)
        return 0
    try:
        listener = bind_ctrl(args)
    except OSError as exc:
        print(f"swtpm: --ctrl {args.ctrl_path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        if args.daemon:
            _daemonize(args)  # the socket is up; only the child returns, and serves it
        else:
            _write_pid(args, os.getpid())
        _redirect_output(args)
    except OSError as exc:
        print(f"swtpm: {exc}", file=sys.stderr)
        return 1
    # Only now the heavy part: connections queue in the backlog meanwhile.
    if sys.flags.no_site:
        import site

        site.main()  # the site-packages -S left out (cryptography, ...)
    import socket

    from sgxvtpm.endpoint.libvirt.run import serve

    return serve(args, socket.socket(fileno=listener.detach()))


if __name__ == "__main__":
    sys.exit(main())
