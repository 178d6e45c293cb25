#!/usr/bin/env python3
"""An authoritative DNS server for the kernel tests: zones come from the arguments, answers
come over UDP and TCP (RFC 1035 two-byte length framing, several and pipelined queries on
one connection), and every query is one line in a log, so that a test can tell which server
was asked what and what it answered.

Usage: dns_server.py --listen ADDR:PORT [--listen ...] [zone options] [--ttl N]
                     [--log FILE] [--ready FILE]
  --listen 203.0.113.53:53 | [2001:db8::53]:53   UDP and TCP on this address (repeatable)
  --rotate SUFFIX=CIDR    every A (IPv4 CIDR) or AAAA (IPv6 CIDR) query for SUFFIX or any
                          name under it gets the next host of CIDR (a counter that wraps;
                          IPv4 skips the network and broadcast addresses), so that two
                          queries in a row never get the same address: a CDN, in short.
                          One CIDR per family and suffix; the longest suffix wins.
  --static NAME=ADDR      an A or AAAA record (by the family of ADDR); repeat for more
  --cname NAME=TARGET     NAME is an alias: the answer holds the CNAME and then the records
                          of TARGET (chains are followed up to 8 links)
  --truncate NAME         over UDP, NAME gets TC=1 and no answers (over TCP, the full
                          answer); `*.SUFFIX` matches SUFFIX and every name under it
  --ttl N                 the TTL of every record (default 1)
  --log FILE              one line per question, flushed at once:
                          `query udp|tcp QNAME QTYPE from SRC_IP:PORT -> ADDR,ADDR`, or
                          `-> NXDOMAIN`, `-> TC`, `-> NODATA` (the name exists, but has no
                          record of that type), `-> CNAME:TARGET` (a CNAME query). QNAME
                          is as sent (0x20 case kept, no trailing dot); SRC_IP is written
                          without brackets, like host.py. Written before the reply leaves.
  --ready FILE            created once every socket listens (tests wait for it)

Names compare case-insensitively; a name with a CNAME has nothing else, and a --static name
hides the --rotate pool above it. Unknown names get NXDOMAIN. A query with an EDNS OPT record
gets one back (UDP payload 1232); a UDP reply larger than the client takes is sent truncated.
Malformed queries are dropped (UDP) or end the connection (TCP). SIGTERM exits cleanly.
One thread per UDP socket answers in a loop (a thread per datagram would cost more than the
answer); each TCP connection has its own thread, so a slow client holds up no one else.
"""
import argparse
import ipaddress
import os
import signal
import socket
import struct
import sys
import threading

TYPE_A, TYPE_CNAME, TYPE_AAAA, TYPE_OPT, TYPE_ANY = 1, 5, 28, 41, 255
TYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT",
              28: "AAAA", 33: "SRV", 64: "SVCB", 65: "HTTPS", 255: "ANY"}
CLASS_IN = 1
NOERROR, FORMERR, NXDOMAIN, NOTIMP = 0, 1, 3, 4
EDNS_PAYLOAD = 1232
MAX_CHAIN = 8


class Malformed(Exception):
    """The query cannot be parsed: drop it (UDP) or close the connection (TCP)."""


def canon(name):
    return name.rstrip(".").lower()


class Pool:
    """The hosts of one CIDR, handed out in turn. Threads share it, hence the lock."""

    def __init__(self, cidr):
        self.net = ipaddress.ip_network(cidr, strict=False)
        size = self.net.num_addresses
        # Skip the network address (and the IPv4 broadcast) except in the tiny networks
        # where every address is a host (/31 and /32, /127 and /128).
        skip_first = size > 2
        skip_last = skip_first and self.net.version == 4
        self.first = int(self.net.network_address) + skip_first
        self.count = size - skip_first - skip_last
        self.next = 0
        self.lock = threading.Lock()

    def take(self):
        with self.lock:
            index = self.next
            self.next = (self.next + 1) % self.count
        return ipaddress.ip_address(self.first + index)


class Zone:
    def __init__(self, args):
        self.ttl = args.ttl
        self.static = {}  # name -> [ip_address]
        self.cname = {}  # name -> target as written
        self.rotate = {}  # suffix -> {4: Pool, 6: Pool}
        self.truncate = set()
        self.truncate_suffix = set()
        for spec in args.rotate:
            suffix, cidr = split_spec(spec, "--rotate")
            pool = Pool(cidr)
            pools = self.rotate.setdefault(canon(suffix), {})
            if pool.net.version in pools:
                raise ValueError(f"--rotate {spec}: two IPv{pool.net.version} pools for {suffix}")
            pools[pool.net.version] = pool
        for spec in args.static:
            name, addr = split_spec(spec, "--static")
            self.static.setdefault(canon(name), []).append(ipaddress.ip_address(addr))
        for spec in args.cname:
            name, target = split_spec(spec, "--cname")
            if canon(name) in self.static:
                raise ValueError(f"--cname {spec}: {name} has --static records too")
            self.cname[canon(name)] = target.rstrip(".")
        for name in args.truncate:
            if name.startswith("*."):
                self.truncate_suffix.add(canon(name[2:]))
            else:
                self.truncate.add(canon(name))
        # Names that only have names below them (example.test above www.example.test)
        # exist all the same: NOERROR with no records, not NXDOMAIN.
        self.parents = set()
        for name in list(self.static) + list(self.cname) + list(self.rotate):
            labels = name.split(".")
            self.parents.update(".".join(labels[i:]) for i in range(1, len(labels)))

    def pools(self, name):
        """The pools of the longest --rotate suffix that NAME is, or is under."""
        labels = name.split(".")
        for i in range(len(labels)):
            pools = self.rotate.get(".".join(labels[i:]))
            if pools is not None:
                return pools
        return None

    def truncated(self, name):
        if name in self.truncate:
            return True
        labels = name.split(".")
        return any(".".join(labels[i:]) in self.truncate_suffix for i in range(len(labels)))

    def lookup(self, name, qtype):
        """Returns (exists, [(owner, type, rdata value)]) for one name and type, following
        CNAMEs: the value is an ip_address or, for a CNAME, the target name."""
        records = []
        for _ in range(MAX_CHAIN + 1):
            key = canon(name)
            if key in self.cname:
                target = self.cname[key]
                records.append((name, TYPE_CNAME, target))
                if qtype == TYPE_CNAME:
                    return True, records
                name = target
                continue
            if key in self.static:
                addrs = self.static[key]
            elif (pools := self.pools(key)) is not None:
                addrs = [pools[v].take() for v in (4, 6) if v in pools and wanted(qtype, v)]
            elif key in self.parents:
                addrs = []
            else:
                # An alias that leads nowhere still shows its CNAMEs (and NXDOMAIN).
                return False, records
            records += [(name, TYPE_A if a.version == 4 else TYPE_AAAA, a)
                        for a in addrs if wanted(qtype, a.version)]
            return True, records
        # A chain longer than we follow: what we have, as a real server would give up.
        return True, records


def wanted(qtype, version):
    return qtype == TYPE_ANY or qtype == (TYPE_A if version == 4 else TYPE_AAAA)


def split_spec(spec, option):
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise ValueError(f"{option} {spec}: expected NAME=VALUE")
    return name, value


# --- Wire format -------------------------------------------------------------------------

def read_name(msg, off):
    """Returns (labels as bytes, offset after the name). Follows compression pointers, but
    only backwards, so a loop of pointers cannot hang us."""
    labels, end, jumps, total = [], None, 0, 0
    while True:
        if off >= len(msg):
            raise Malformed("name runs past the end")
        length = msg[off]
        if length & 0xC0 == 0xC0:
            if off + 1 >= len(msg):
                raise Malformed("truncated pointer")
            target = ((length & 0x3F) << 8) | msg[off + 1]
            if target >= off or jumps > 64:
                raise Malformed("pointer loop")
            if end is None:
                end = off + 2
            off, jumps = target, jumps + 1
            continue
        if length & 0xC0:
            raise Malformed("unknown label type")
        off += 1
        if length == 0:
            return labels, (end if end is not None else off)
        if off + length > len(msg):
            raise Malformed("label runs past the end")
        total += length + 1
        if total > 255:
            raise Malformed("name too long")
        labels.append(msg[off:off + length])
        off += length


def parse_query(msg):
    """Returns (id, flags, [(labels, qtype, qclass)], edns) or raises Malformed; edns is
    the UDP payload size of the query's OPT record, or None without one."""
    if len(msg) < 12:
        raise Malformed("short header")
    qid, flags, qd, an, ns, ar = struct.unpack("!6H", msg[:12])
    if flags & 0x8000:
        raise Malformed("a response, not a query")
    off, questions = 12, []
    for _ in range(qd):
        labels, off = read_name(msg, off)
        if off + 4 > len(msg):
            raise Malformed("short question")
        qtype, qclass = struct.unpack("!HH", msg[off:off + 4])
        questions.append((labels, qtype, qclass))
        off += 4
    edns = None
    for index in range(an + ns + ar):
        _, off = read_name(msg, off)
        if off + 10 > len(msg):
            raise Malformed("short record")
        rtype, rclass, _, rdlen = struct.unpack("!HHIH", msg[off:off + 10])
        off += 10 + rdlen
        if off > len(msg):
            raise Malformed("record data runs past the end")
        if index >= an + ns and rtype == TYPE_OPT:
            edns = rclass
    return qid, flags, questions, edns


class Writer:
    """Builds a message, compressing names against the suffixes written so far (the question
    first, so the answers' owners point at it and keep the case the client sent)."""

    def __init__(self):
        self.buf = bytearray(12)
        self.offsets = {}

    def name(self, labels):
        for i in range(len(labels)):
            key = b".".join(labels[i:]).lower()
            if key in self.offsets:
                self.buf += struct.pack("!H", 0xC000 | self.offsets[key])
                return
            if len(self.buf) < 0x4000:
                self.offsets[key] = len(self.buf)
            self.buf += bytes([len(labels[i])]) + labels[i]
        self.buf += b"\0"

    def record(self, labels, rtype, ttl, rdata_fn):
        self.name(labels)
        self.buf += struct.pack("!HHI", rtype, CLASS_IN, ttl)
        at = len(self.buf)
        self.buf += b"\0\0"
        rdata_fn()
        struct.pack_into("!H", self.buf, at, len(self.buf) - at - 2)


def to_labels(name):
    # Latin-1 both ways, so that any byte of a query's name comes back as it was.
    return [label.encode("latin-1") for label in name.split(".") if label]


def answer(zone, msg, udp):
    """Returns (reply bytes, [(qname, qtype, log tail)]) for one query, or raises Malformed."""
    qid, flags, questions, edns = parse_query(msg)
    # The largest UDP reply the client takes: 512, or what its OPT record says (up to ours).
    limit = (max(512, min(edns, EDNS_PAYLOAD)) if edns is not None else 512) if udp else None
    opcode = (flags >> 11) & 0xF
    # RD copied; QR and AA set; RA stays clear: we recurse for no one.
    out_flags = 0x8400 | (flags & 0x0100)
    if opcode != 0:
        return header(qid, out_flags | (opcode << 11) | NOTIMP, 0, 0, 0), [("-", "-", "NOTIMP")]
    if not questions:
        return header(qid, out_flags | FORMERR, 0, 0, 0), [("-", "-", "FORMERR")]
    names = [b".".join(labels).decode("latin-1") for labels, _, _ in questions]
    if limit is not None and any(zone.truncated(canon(n)) for n in names):
        return build(qid, out_flags | 0x0200, questions, [], edns), \
            [(n, q[1], "TC") for n, q in zip(names, questions)]
    answers, logs, rcodes = [], [], []
    for name, (labels, qtype, qclass) in zip(names, questions):
        exists, records = zone.lookup(name, qtype) if qclass in (CLASS_IN, 255) else (True, [])
        answers += records
        rcodes.append(NOERROR if exists else NXDOMAIN)
        addrs = [str(value) for _, rtype, value in records if rtype != TYPE_CNAME]
        if not exists:
            tail = "NXDOMAIN"
        elif addrs:
            tail = ",".join(addrs)
        elif qtype == TYPE_CNAME and records:
            tail = "CNAME:" + records[0][2]
        else:
            tail = "NODATA"
        logs.append((name, qtype, tail))
    # One rcode for the whole message: NXDOMAIN only when no question has an answer.
    rcode = NXDOMAIN if all(r == NXDOMAIN for r in rcodes) else NOERROR
    reply = build(qid, out_flags | rcode, questions, answers, edns, zone.ttl)
    if limit is not None and len(reply) > limit:
        reply = build(qid, out_flags | 0x0200, questions, [], edns)
        logs = [(n, t, "TC") for n, t, _ in logs]
    if len(reply) > 0xFFFF:
        # Only thousands of questions in one query get here; TCP framing cannot carry it.
        raise Malformed("reply too large")
    return reply, logs


def header(qid, flags, qd, an, ar):
    return struct.pack("!6H", qid, flags, qd, an, 0, ar)


def build(qid, flags, questions, answers, edns, ttl=0):
    w = Writer()
    for labels, qtype, qclass in questions:
        w.name(labels)
        w.buf += struct.pack("!HH", qtype, qclass)
    for owner, rtype, value in answers:
        if rtype == TYPE_CNAME:
            w.record(to_labels(owner), rtype, ttl, lambda v=value: w.name(to_labels(v)))
        else:
            w.record(to_labels(owner), rtype, ttl, lambda v=value: w.buf.extend(v.packed))
    if edns is not None:
        # Root owner, TYPE OPT, CLASS = our UDP payload size, extended rcode/version/flags 0.
        w.buf += b"\0" + struct.pack("!HHIH", TYPE_OPT, EDNS_PAYLOAD, 0, 0)
    w.buf[:12] = header(qid, flags, len(questions), len(answers), 1 if edns is not None else 0)
    return bytes(w.buf)


# --- Logging -----------------------------------------------------------------------------

class Log:
    def __init__(self, path):
        self.file = open(path, "a", buffering=1) if path else None
        self.lock = threading.Lock()

    def write(self, transport, peer, entries):
        if self.file is None:
            return
        host = peer[0][7:] if peer[0].startswith("::ffff:") else peer[0]
        lines = "".join(f"query {transport} {show(name)} {type_name(qtype)}"
                        f" from {host}:{peer[1]} -> {tail}\n" for name, qtype, tail in entries)
        with self.lock:
            self.file.write(lines)
            self.file.flush()


def show(name):
    """NAME in presentation form, so that a query with odd bytes stays one parsable line."""
    if name.isascii() and name.isprintable() and " " not in name:
        return name or "."
    return "".join(c if "!" <= c <= "~" else f"\\{ord(c):03d}" for c in name)


def type_name(qtype):
    return qtype if isinstance(qtype, str) else TYPE_NAMES.get(qtype, f"TYPE{qtype}")


# --- Serving -----------------------------------------------------------------------------

def parse_listen(spec):
    """`203.0.113.53:53` or `[2001:db8::53]:53` -> (family, address, port)."""
    if spec.startswith("["):
        host, sep, port = spec[1:].partition("]:")
    else:
        host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen {spec}: expected ADDR:PORT or [ADDR6]:PORT")
    addr = ipaddress.ip_address(host)
    return (socket.AF_INET if addr.version == 4 else socket.AF_INET6), str(addr), int(port)


def open_sockets(spec):
    family, host, port = parse_listen(spec)
    udp = socket.socket(family, socket.SOCK_DGRAM)
    tcp = socket.socket(family, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # [::]:53 must not take 0.0.0.0:53 too, or a second --listen for IPv4 fails.
        for s in (udp, tcp):
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    # Room for a burst of queries while the thread is busy answering.
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    try:
        udp.bind((host, port))
        tcp.bind((host, port))
    except OSError as e:
        raise ValueError(f"--listen {spec}: {e.strerror}")
    tcp.listen(128)
    return udp, tcp


def serve_udp(sock, zone, log):
    while True:
        try:
            msg, peer = sock.recvfrom(65535)
        except OSError:
            return  # closed at exit
        try:
            reply, entries = answer(zone, msg, udp=True)
        except (Malformed, struct.error, UnicodeError, ValueError):
            continue
        # Logged before the reply leaves, so a test that got its answer finds the line.
        log.write("udp", peer, entries)
        try:
            sock.sendto(reply, peer)
        except OSError:
            pass  # e.g. EPERM from a filter on the way back: the test sees the client's side


def serve_tcp(listener, zone, log):
    while True:
        try:
            conn, peer = listener.accept()
        except OSError:
            return
        threading.Thread(target=tcp_connection, args=(conn, peer, zone, log),
                         daemon=True).start()


def tcp_connection(conn, peer, zone, log):
    # Idle clients are let go, as real servers do, so threads do not pile up.
    conn.settimeout(30)
    pending = b""
    with conn:
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                pending += data
                # Answer every whole query that has arrived, in order (pipelining).
                while len(pending) >= 2:
                    size = struct.unpack("!H", pending[:2])[0]
                    if size == 0:
                        return
                    if len(pending) < 2 + size:
                        break
                    msg, pending = pending[2:2 + size], pending[2 + size:]
                    try:
                        reply, entries = answer(zone, msg, udp=False)
                    except (Malformed, struct.error, UnicodeError, ValueError):
                        return
                    log.write("tcp", peer, entries)
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", action="append", required=True,
                        help="ADDR:PORT or [ADDR6]:PORT")
    parser.add_argument("--rotate", action="append", default=[], help="SUFFIX=CIDR")
    parser.add_argument("--static", action="append", default=[], help="NAME=ADDR")
    parser.add_argument("--cname", action="append", default=[], help="NAME=TARGET")
    parser.add_argument("--truncate", action="append", default=[], help="NAME or *.SUFFIX")
    parser.add_argument("--ttl", type=int, default=1)
    parser.add_argument("--log")
    parser.add_argument("--ready")
    args = parser.parse_args()
    try:
        zone = Zone(args)
        sockets = [open_sockets(spec) for spec in args.listen]
    except ValueError as e:
        parser.error(str(e))
    log = Log(args.log)

    # Blocked in every thread (they inherit the mask) and taken by sigwait in this one, so
    # that the exit is at once, whatever the serving threads are blocked in.
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    for udp, tcp in sockets:
        threading.Thread(target=serve_udp, args=(udp, zone, log), daemon=True).start()
        threading.Thread(target=serve_tcp, args=(tcp, zone, log), daemon=True).start()
    if args.ready:
        # Written then renamed, so a test polling for the file never sees it half made.
        with open(args.ready + ".tmp", "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(args.ready + ".tmp", args.ready)
    signal.sigwait(stop)
    # The serving threads are daemons and the kernel closes the sockets; only the log needs us.
    if log.file:
        log.file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
