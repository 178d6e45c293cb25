#!/usr/bin/env python3
"""Attacks on the boundary, as a workload would send them. Each carries a marker (`ENFX-...`)
that the test hosts' capture logs where it arrives (see host.py), so a test asserts on the
receiving side, not on what the sender was told.

Usage: attack.py KIND ARGS...  Prints one line: `sent`, `reply` (an answer came back), `EPERM`,
or `error: ...`. Exits 0 unless the arguments are wrong.

  udp DST PORT MARKER                 a plain UDP datagram (the allowed control)
  udp-tos DST PORT MARKER             connected UDP, sendmsg with an IP_TOS/IPV6_TCLASS cmsg
  udp-big DST PORT MARKER SIZE        a UDP datagram larger than the MTU (fragmented)
  raw-udp DST PORT MARKER [SPORT]     UDP built by hand on SOCK_RAW (IPv4 or IPv6)
  raw-ip SRC DST PORT MARKER [FRAG] [SPORT]
                                      a whole IPv4/UDP packet (IP_HDRINCL) from SRC; FRAG is a
                                      fragment offset in 8-byte units (a later fragment)
  ping DST MARKER                     an ICMP datagram ("ping") socket
  udplite DST PORT MARKER             UDP-Lite: connect, then send
  sctp DST PORT                       SCTP connect (its INIT)
  mptcp DST PORT MARKER               MPTCP connect, then send
  lsrr HOP DST PORT MARKER            UDP with IP_OPTIONS loose source route via HOP
  lsrr-cmsg HOP DST PORT MARKER       the same route in an IP_RETOPTS control message
  rthdr HOP DST PORT MARKER           UDP over IPv6 with IPV6_RTHDR (a segment routing header,
                                      which needs no privilege) via HOP. In a control message
                                      the kernel takes only type 2 (mobile IPv6), where built in.
  dstopts DST PORT MARKER             UDP over IPv6 with a destination-options header
  ndp DST MARKER                      a neighbour solicitation with a payload, hop limit 255
  frame IFACE DSTMAC VLANS SRC DST SPORT DPORT MARKER
                                      an Ethernet frame by AF_PACKET: IPv4/UDP from SRC (any),
                                      behind VLANS priority tags (0, 1, 2)
"""
import errno
import ipaddress
import socket
import struct
import sys

WAIT = 1.0
IPPROTO_MPTCP = 262
IPPROTO_UDPLITE = 136


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ipv4_header(src, dst, proto, length, frag=0, ident=0x4242):
    head = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + length, ident, frag, 64, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )
    return head[:10] + struct.pack("!H", checksum(head)) + head[12:]


def udp_header(sport, dport, payload):
    # Checksum 0: none, which IPv4 allows.
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)


def answered(sock):
    sock.settimeout(WAIT)
    try:
        sock.recv(4096)
        return "reply"
    except OSError:
        return "sent"


def udp(dst, port, marker):
    s = socket.socket(family(dst), socket.SOCK_DGRAM)
    s.sendto(marker.encode(), (dst, int(port)))
    return answered(s)


def udp_tos(dst, port, marker):
    s = socket.socket(family(dst), socket.SOCK_DGRAM)
    s.connect((dst, int(port)))
    if family(dst) == socket.AF_INET6:
        cmsg = (socket.IPPROTO_IPV6, socket.IPV6_TCLASS, struct.pack("i", 2))
    else:
        cmsg = (socket.IPPROTO_IP, socket.IP_TOS, struct.pack("i", 2))
    s.sendmsg([marker.encode()], [cmsg])
    return answered(s)


def udp_big(dst, port, marker, size):
    s = socket.socket(family(dst), socket.SOCK_DGRAM)
    if family(dst) == socket.AF_INET:
        # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: let the kernel fragment.
        s.setsockopt(socket.IPPROTO_IP, 10, 0)
    payload = marker.encode() + b"." * (int(size) - len(marker))
    s.sendto(payload, (dst, int(port)))
    return answered(s)


def raw_udp(dst, port, marker, sport="40404"):
    payload = marker.encode()
    s = socket.socket(family(dst), socket.SOCK_RAW, socket.IPPROTO_UDP)
    s.sendto(udp_header(int(sport), int(port), payload) + payload, (dst, 0))
    return "sent"


def raw_ip(src, dst, port, marker, frag="0", sport="40405"):
    payload = marker.encode()
    body = payload if int(frag) else udp_header(int(sport), int(port), payload) + payload
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.sendto(ipv4_header(src, dst, 17, len(body), frag=int(frag)) + body, (dst, 0))
    return "sent"


def ping(dst, marker):
    proto = socket.IPPROTO_ICMPV6 if family(dst) == socket.AF_INET6 else socket.IPPROTO_ICMP
    kind = 128 if proto == socket.IPPROTO_ICMPV6 else 8
    s = socket.socket(family(dst), socket.SOCK_DGRAM, proto)
    s.sendto(struct.pack("!BBHHH", kind, 0, 0, 0, 1) + marker.encode(), (dst, 0))
    return answered(s)


def udplite(dst, port, marker):
    s = socket.socket(family(dst), socket.SOCK_DGRAM, IPPROTO_UDPLITE)
    s.connect((dst, int(port)))
    s.send(marker.encode())
    return "sent"


def sctp(dst, port):
    s = socket.socket(family(dst), socket.SOCK_STREAM, socket.IPPROTO_SCTP)
    s.settimeout(WAIT)
    try:
        s.connect((dst, int(port)))
    except socket.timeout:
        pass
    return "sent"


def mptcp(dst, port, marker):
    s = socket.socket(family(dst), socket.SOCK_STREAM, IPPROTO_MPTCP)
    s.settimeout(WAIT)
    s.connect((dst, int(port)))
    s.sendall(marker.encode())
    return answered(s)


def lsrr_option(hop):
    # NOP, then LSRR: type 131, length 7, pointer 4, one address; 8 bytes in all.
    return b"\x01" + bytes([131, 7, 4]) + socket.inet_aton(hop)


def lsrr(hop, dst, port, marker):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, lsrr_option(hop))
    s.sendto(marker.encode(), (dst, int(port)))
    return "sent"


def lsrr_cmsg(hop, dst, port, marker):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cmsg = (socket.IPPROTO_IP, socket.IP_RETOPTS, lsrr_option(hop))
    s.sendmsg([marker.encode()], [cmsg], 0, (dst, int(port)))
    return "sent"


def srh(hop):
    # Type 4, two segments (40 bytes): the kernel puts the destination in segment 0, and
    # segment 1 (segments left: 1) is the first hop.
    head = bytes([0, 4, 4, 1, 1, 0, 0, 0])
    return head + b"\0" * 16 + ipaddress.IPv6Address(hop).packed


def rthdr(hop, dst, port, marker):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RTHDR, srh(hop))
    s.sendto(marker.encode(), (dst, int(port)))
    return "sent"


def dstopts(dst, port, marker):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    # Next header, length 0 (8 bytes), then a PadN option filling the rest.
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))
    s.sendto(marker.encode(), (dst, int(port)))
    return answered(s)


def ndp(dst, marker):
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
    target = ipaddress.IPv6Address(dst).packed
    s.sendto(struct.pack("!BBHI", 135, 0, 0, 0) + target + marker.encode(), (dst, 0))
    return "sent"


def frame(iface, dstmac, vlans, src, dst, sport, dport, marker):
    payload = marker.encode()
    packet = ipv4_header(src, dst, 17, 8 + len(payload))
    packet += udp_header(int(sport), int(dport), payload) + payload
    tags = b"".join(struct.pack("!HH", 0x8100, 0) for _ in range(int(vlans)))
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    mine = s.getsockname()[4]
    head = bytes.fromhex(dstmac.replace(":", "")) + mine + tags + struct.pack("!H", 0x0800)
    s.send(head + packet)
    return "sent"


KINDS = {
    "udp": udp,
    "udp-tos": udp_tos,
    "udp-big": udp_big,
    "raw-udp": raw_udp,
    "raw-ip": raw_ip,
    "ping": ping,
    "udplite": udplite,
    "sctp": sctp,
    "mptcp": mptcp,
    "lsrr": lsrr,
    "lsrr-cmsg": lsrr_cmsg,
    "rthdr": rthdr,
    "dstopts": dstopts,
    "ndp": ndp,
    "frame": frame,
}


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in KINDS:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print(KINDS[sys.argv[1]](*sys.argv[2:]), flush=True)
    except PermissionError as err:
        print("EPERM" if err.errno == errno.EPERM else f"error: {err}", flush=True)
    except OSError as err:
        print(f"error: {err}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
