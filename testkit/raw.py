#!/usr/bin/env python3
"""Sends from raw sockets, which never call connect() or sendmsg() on a UDP socket, and reports
whether an answer came back: `reply` or `silent`.

Usage: raw.py TARGET...  with TARGET one of
  udp:HOST:PORT  a UDP datagram built by hand on a SOCK_RAW socket (the test host's UDP echo
                 answers it)
  icmp:HOST      an ICMP echo request
Prints one line per target: `TARGET reply|silent`. IPv4 only. Waits at most one second each.
"""
import os
import socket
import struct
import sys
import time

WAIT = 1.0


def udp(host, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    sport = 40000 + os.getpid() % 20000
    payload = b"raw ping"
    # Checksum 0: none, which IPv4 allows.
    header = struct.pack("!HHHH", sport, port, 8 + len(payload), 0)
    sock.sendto(header + payload, (host, 0))

    def answer(packet):
        ihl = (packet[0] & 0x0F) * 4
        src = socket.inet_ntoa(packet[12:16])
        psrc, pdst = struct.unpack("!HH", packet[ihl : ihl + 4])
        return src == host and psrc == port and pdst == sport

    return wait(sock, answer)


def icmp(host):
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"raw ping"
    csum = checksum(body)
    sock.sendto(body[:2] + struct.pack("!H", csum) + body[4:], (host, 0))

    def answer(packet):
        ihl = (packet[0] & 0x0F) * 4
        kind, _, _, got = struct.unpack("!BBHH", packet[ihl : ihl + 6])
        return socket.inet_ntoa(packet[12:16]) == host and kind == 0 and got == ident

    return wait(sock, answer)


def checksum(data):
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def wait(sock, answer):
    deadline = time.monotonic() + WAIT
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if answer(sock.recv(2048)):
                return True
        except socket.timeout:
            break
    return False


def main():
    for target in sys.argv[1:]:
        kind, host, *port = target.split(":")
        got = udp(host, int(port[0])) if kind == "udp" else icmp(host)
        print(target, "reply" if got else "silent", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
