"""The loopback interface of a sandbox's network namespace.

PID 1 brings ``lo`` up. A networked sandbox's ``eth0`` is configured earlier,
by the Engine (``netlink.configure_inside``).
"""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFF_RUNNING = 0x40


def setup_loopback() -> None:
    """Bring up ``lo`` in the caller's network namespace.

    Two ioctls on a socket are cheaper than a netlink session, and loopback
    needs no address or route: the kernel adds 127.0.0.1/8 and ::1 itself.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        request = struct.pack("16sH14x", b"lo", flags | IFF_UP | IFF_RUNNING)
        try:
            fcntl.ioctl(sock, SIOCSIFFLAGS, request)
        except OSError as error:
            raise OSError(
                error.errno, f"ioctl(SIOCSIFFLAGS, 'lo' up) failed: {error.strerror}"
            ) from error
