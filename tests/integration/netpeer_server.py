"""Servers of the test "remote host": TCP echo, UDP echo and a tiny DNS responder.

Run inside the test's own network namespace as
``python netpeer_server.py ADDRESS LOG`` by ``netpeer.RemoteHost``. Every
connection, datagram and query is appended to LOG as one JSON line, so a
test can check what reached the remote host and from which source address.
The DNS responder answers A queries for names under ``test.`` with ADDRESS
and every other query with NXDOMAIN.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading

TCP_PORT = 7000
UDP_PORT = 7001
DNS_PORT = 53


def main() -> None:
    address, log_path = sys.argv[1], sys.argv[2]
    log_lock = threading.Lock()
    log = open(log_path, "a", buffering=1)  # noqa: SIM115

    def record(**event: object) -> None:
        with log_lock:
            log.write(json.dumps(event) + "\n")

    tcp = socket.create_server((address, TCP_PORT), backlog=64)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((address, UDP_PORT))
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.bind((address, DNS_PORT))
    threading.Thread(target=_serve_udp, args=(udp, record), daemon=True).start()
    threading.Thread(
        target=_serve_dns, args=(dns, address, record), daemon=True
    ).start()
    record(event="ready")
    while True:
        client, peer = tcp.accept()
        record(event="tcp", source=peer[0])
        threading.Thread(target=_echo, args=(client,), daemon=True).start()


def _echo(client: socket.socket) -> None:
    with client:
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                return
            if not data:
                return
            client.sendall(data)


def _serve_udp(sock: socket.socket, record) -> None:  # type: ignore[no-untyped-def]
    while True:
        data, peer = sock.recvfrom(65536)
        record(event="udp", source=peer[0])
        sock.sendto(data, peer)


def _serve_dns(sock: socket.socket, address: str, record) -> None:  # type: ignore[no-untyped-def]
    while True:
        query, peer = sock.recvfrom(512)
        if len(query) < 12:
            continue
        name, end = _read_name(query, 12)
        record(event="dns", source=peer[0], name=name)
        qtype = struct.unpack("!H", query[end : end + 2])[0]
        question = query[12 : end + 4]
        (ident,) = struct.unpack("!H", query[:2])
        answers = b""
        rcode = 3
        if name.endswith(".test"):
            rcode = 0
            if qtype == 1:
                answers = (
                    b"\xc0\x0c"
                    + struct.pack("!HHIH", 1, 1, 60, 4)
                    + socket.inet_aton(address)
                )
        count = 1 if answers else 0
        header = struct.pack("!HHHHHH", ident, 0x8180 | rcode, 1, count, 0, 0)
        sock.sendto(header + question + answers, peer)


def _read_name(packet: bytes, offset: int) -> tuple[str, int]:
    labels = []
    while packet[offset]:
        length = packet[offset]
        labels.append(packet[offset + 1 : offset + 1 + length].decode())
        offset += 1 + length
    return ".".join(labels).lower(), offset + 1


if __name__ == "__main__":
    main()
