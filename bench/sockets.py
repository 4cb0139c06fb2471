"""Is TCP_NODELAY set on another process's connections? Read it off the sockets themselves.

Nagle's algorithm on a proxy's socket, against the peer's delayed ACK, holds every small
write after the first for up to ~40 ms: a streamed answer then crawls. This borrows each
connected TCP socket of a process (pidfd_getfd, Linux >= 5.6, same user or root) and asks
the kernel. Where the kernel refuses, the answer is None and the bench falls back on what
it measures anyway: the longest gap between two chunks of one stream.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from dataclasses import dataclass

_SYS_PIDFD_GETFD = 438  # the same number on x86_64 and aarch64


@dataclass(frozen=True)
class NodelayReport:
    connected: int  # connected TCP sockets seen
    nodelay: int  # of which with TCP_NODELAY on
    peers: tuple[str, ...]  # "local->remote" of those without it

    @property
    def all_set(self) -> bool:
        return self.connected > 0 and self.nodelay == self.connected


def _check_fd(libc: ctypes.CDLL, pidfd: int, target_fd: int) -> tuple[bool, str] | None:
    """(NODELAY set, "local->peer") for a connected TCP socket; None for anything else.

    Raises PermissionError when the kernel will not lend the socket.
    """
    fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0)
    if fd < 0:
        if ctypes.get_errno() in (1, 13, 38):  # EPERM, EACCES, ENOSYS
            raise PermissionError(target_fd)
        return None
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return None
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or \
                sock.type != socket.SOCK_STREAM:
            return None
        try:
            peer = sock.getpeername()
        except OSError:
            return None  # a listening socket
        local = sock.getsockname()
        on = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        return on, f"{local[0]}:{local[1]}->{peer[0]}:{peer[1]}"
    finally:
        sock.detach()
        os.close(fd)


def nodelay_report(pid: int) -> NodelayReport | None:
    """TCP_NODELAY on each connected TCP socket of `pid`; None when it cannot be read."""
    if not hasattr(os, "pidfd_open"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    connected = with_nodelay = 0
    without: list[str] = []
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
                checked = _check_fd(libc, pidfd, int(name))
            except PermissionError:
                return None
            except OSError:
                continue
            if checked is None:
                continue
            connected += 1
            if checked[0]:
                with_nodelay += 1
            else:
                without.append(checked[1])
    finally:
        with contextlib.suppress(OSError):
            os.close(pidfd)
    return NodelayReport(connected, with_nodelay, tuple(without))


def set_nodelay(transport: object) -> None:
    """Turn Nagle off on a transport's socket: small SSE writes must not wait for an ACK."""
    sock = transport.get_extra_info("socket")  # type: ignore[attr-defined]
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
