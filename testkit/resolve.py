#!/usr/bin/env python3
"""Resolves a name and connects to its first address at once, in a loop: the way to catch a
race where an address a workload was just told is not allowed yet when it connects.

Usage: resolve.py --server IP [--port 53] (--name NAME [--name ...] | --pattern 'r{i}.x.test')
                  --count N --mode glibc|udp-connected|udp-unconnected|tcp [--family 4|6|any]
                  [--connect-port 443] [--connect-timeout 2] [--no-connect] [--deadline SECS]
                  [--private-resolv [--search a.test,b.test] [--ndots N]] [--json]

Iteration i asks for the next --name (they are taken in turn) or the --pattern with {i} put
in, then opens a TCP connection to the FIRST address of the answer on --connect-port with no
pause in between, and closes it (with a RST, so that thousands of iterations leave no
TIME_WAIT behind). --no-connect only resolves. Each iteration is one of
  ok, eperm (connect failed with EPERM/EACCES), refused (ECONNREFUSED), timeout,
  resolve_failed (NXDOMAIN, SERVFAIL, no address, no reply, a socket error while resolving),
  other (another errno, or a UDP socket connected to someone else than --server).
The loop stops early after --deadline seconds (default 120). At the end one JSON object is
printed (indented; on one line with --json): the counts, iterations, elapsed seconds, the
first 5 failures of any kind and the first 5 resolution failures (name, address, error), and
the resolution latency p50/p99/max in ms (over every iteration, failed ones included).
Exit status: 0 when every iteration was ok, 1 otherwise, 2 for wrong arguments.

Modes, each the way a real resolver sends DNS:
  glibc            socket.getaddrinfo(), i.e. glibc's stub and /etc/resolv.conf, so --server
                   and --port are not used unless --private-resolv. --family any is AF_UNSPEC:
                   glibc then sends the A and AAAA queries together from one socket, and
                   sorts the answer (RFC 6724), so the first address may well be IPv6.
  udp-connected    as glibc's stub does: a UDP socket connect()ed to the server, send, recv;
                   getpeername() must name the server (else `other`).
  udp-unconnected  as musl does: sendto() and recvfrom(); a reply from any other address or
                   port is dropped (musl drops it too): with no right reply, `reply from X`.
  tcp              a TCP connection, length-framed query and reply.
The udp modes wait 1 s for a reply, twice, and ask again over TCP when the reply has TC=1.
They send one question, A (--family 4, the default) or AAAA (6), with a random ID and RD=1,
and follow CNAMEs inside the answer.

--private-resolv (glibc mode; needs root) first enters a new mount namespace and bind-mounts
over /etc/resolv.conf one that says `nameserver SERVER`, `options timeout:1 attempts:2`, and
the --search and --ndots given, so that glibc asks --server. glibc cannot ask a port other
than 53, hence --port must be 53 there. /etc/hosts is still read first (nsswitch), and an
nscd or systemd-resolved in the hosts line of /etc/nsswitch.conf would bypass the file.
"""
import argparse
import ctypes
import errno
import ipaddress
import json
import math
import os
import random
import socket
import struct
import sys
import tempfile
import time

TIMEOUT = 1.0
ATTEMPTS = 2
TYPE_A, TYPE_CNAME, TYPE_AAAA = 1, 5, 28
RCODES = {1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
CLASSES = ("ok", "eperm", "refused", "timeout", "resolve_failed", "other")
KEEP = 5

CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000


class ResolveFailed(Exception):
    pass


class WrongPeer(Exception):
    """The kernel connected our DNS socket to someone else than the server we named."""


# --- DNS messages (parsed here, not shared with dns_server.py: the client checks the server) -

def build_query(name, qtype):
    qid = random.getrandbits(16)
    labels = b"".join(bytes([len(l)]) + l for l in name.rstrip(".").encode().split(b".") if l)
    return qid, struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + \
        struct.pack("!HH", qtype, 1)


def read_name(msg, off):
    """Returns (lower-case name, offset after it), following pointers backwards only."""
    labels, end, jumps = [], None, 0
    while True:
        length = msg[off]
        if length & 0xC0 == 0xC0:
            target = ((length & 0x3F) << 8) | msg[off + 1]
            if target >= off or jumps > 64:
                raise ResolveFailed("bad compression pointer in reply")
            end = off + 2 if end is None else end
            off, jumps = target, jumps + 1
            continue
        off += 1
        if length == 0:
            return b".".join(labels).decode("latin-1").lower(), (off if end is None else end)
        labels.append(msg[off:off + length])
        off += length


def check_reply(msg, qid, name, qtype):
    """Returns None when MSG is not the reply to our query (to be ignored, as glibc ignores
    it), "TC" when it is truncated, or the addresses it gives NAME (ResolveFailed if none)."""
    try:
        rid, flags, qd, an, _, _ = struct.unpack("!6H", msg[:12])
        if rid != qid or not flags & 0x8000 or qd != 1:
            return None
        qname, off = read_name(msg, 12)
        rtype_q, _ = struct.unpack("!HH", msg[off:off + 4])
        if qname != name.rstrip(".").lower() or rtype_q != qtype:
            return None
        off += 4
        if flags & 0x0200:
            return "TC"
        rcode = flags & 0xF
        if rcode:
            raise ResolveFailed(RCODES.get(rcode, f"rcode {rcode}"))
        cnames, addrs = {}, {}
        for _ in range(an):
            owner, off = read_name(msg, off)
            rtype, _, _, rdlen = struct.unpack("!HHIH", msg[off:off + 10])
            off += 10
            rdata = msg[off:off + rdlen]
            if rtype == TYPE_CNAME:
                cnames[owner] = read_name(msg, off)[0]
            elif rtype == qtype and rdlen in (4, 16):
                addrs.setdefault(owner, []).append(str(ipaddress.ip_address(rdata)))
            off += rdlen
    except (struct.error, IndexError, ValueError) as e:
        raise ResolveFailed(f"malformed reply: {e}")
    current = asked = name.rstrip(".").lower()
    for _ in range(9):
        if current in addrs:
            return addrs[current]
        if current not in cnames:
            break
        current = cnames[current]
    raise ResolveFailed("no address in the answer"
                        + (f" (CNAME to {current})" if current != asked else ""))


# --- The ways to ask ---------------------------------------------------------------------

def same_peer(a, b):
    """Socket addresses equal, IPv4-mapped or not, flow info and scope aside."""
    def norm(addr):
        ip = ipaddress.ip_address(addr[0].split("%")[0])
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return ip, addr[1]
    return norm(a) == norm(b)


def family_of(ip):
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


def resolve_udp(server, name, qtype, connected):
    qid, query = build_query(name, qtype)
    sock = socket.socket(family_of(server[0]), socket.SOCK_DGRAM)
    stray = None
    try:
        if connected:
            sock.connect(server)
            peer = sock.getpeername()
            if not same_peer(peer, server):
                raise WrongPeer(f"DNS socket connected to {server[0]}:{server[1]}, "
                                f"but getpeername() says {peer[0]}:{peer[1]}")
        for _ in range(ATTEMPTS):
            if connected:
                sock.send(query)
            else:
                sock.sendto(query, server)
            until = time.monotonic() + TIMEOUT
            while (left := until - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data, source = sock.recvfrom(65535)
                except socket.timeout:
                    break
                if not same_peer(source, server):
                    stray = source  # musl's check: only the server may answer
                    continue
                result = check_reply(data, qid, name, qtype)
                if result == "TC":
                    # As glibc does: the same question again over TCP.
                    return resolve_tcp(server, name, qtype, (qid, query))
                if result is not None:
                    return result
        if stray:
            raise ResolveFailed(f"reply from {stray[0]}:{stray[1]}")
        raise ResolveFailed("no reply")
    except OSError as e:
        raise ResolveFailed(f"{errname(e)} while resolving over UDP")
    finally:
        sock.close()


def resolve_tcp(server, name, qtype, built=None):
    qid, query = built or build_query(name, qtype)
    error = "no reply"
    for _ in range(ATTEMPTS):
        sock = socket.socket(family_of(server[0]), socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(server)
            sock.sendall(struct.pack("!H", len(query)) + query)
            size = struct.unpack("!H", recv_exact(sock, 2))[0]
            result = check_reply(recv_exact(sock, size), qid, name, qtype)
            if result == "TC" or result is None:
                raise ResolveFailed("a truncated or unrelated reply over TCP")
            return result
        except OSError as e:
            error = f"{errname(e)} while resolving over TCP"
        finally:
            sock.close()
    raise ResolveFailed(error)


def recv_exact(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "closed mid-reply")
        data += chunk
    return data


def resolve_glibc(name, family, port):
    try:
        infos = socket.getaddrinfo(name, port, family, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ResolveFailed(f"getaddrinfo: {e}")
    if not infos:
        raise ResolveFailed("getaddrinfo: no address")
    return [info[4][0] for info in infos]


def errname(e):
    if isinstance(e, socket.timeout) and e.errno is None:
        return "timeout"
    return errno.errorcode.get(e.errno, str(e))


# --- The loop ----------------------------------------------------------------------------

def connect(addr, port, timeout):
    """Returns (class, error text or None)."""
    sock = socket.socket(family_of(addr), socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((addr, port))
        # Abortive close: no TIME_WAIT per iteration.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return "ok", None
    except PermissionError as e:
        return "eperm", errname(e)
    except ConnectionRefusedError as e:
        return "refused", errname(e)
    except (socket.timeout, TimeoutError) as e:
        return "timeout", errname(e)
    except OSError as e:
        return "other", errname(e)
    finally:
        sock.close()


def private_resolv(server, search, ndots):
    """A mount namespace of our own where /etc/resolv.conf names SERVER."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                           ctypes.c_ulong, ctypes.c_void_p]

    def check(result, what):
        if result != 0:
            code = ctypes.get_errno()
            sys.exit(f"--private-resolv: {what}: {os.strerror(code)} (needs root)")

    check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Private first, or the bind mount would spread back to the host's namespace.
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    lines = [f"nameserver {server}"]
    if search:
        lines.append("search " + " ".join(search.split(",")))
    options = "options timeout:1 attempts:2" + (f" ndots:{ndots}" if ndots is not None else "")
    lines.append(options)
    fd, path = tempfile.mkstemp(prefix="resolv.", suffix=".conf")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o644)
    try:
        check(libc.mount(path.encode(), b"/etc/resolv.conf", None, MS_BIND, None),
              "bind-mount over /etc/resolv.conf")
    finally:
        # The mount holds the file; nothing is left behind in /tmp.
        os.unlink(path)


def percentile(values, p):
    """The nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(p * len(ordered)) - 1)], 3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", help="the DNS server's IP (glibc: with --private-resolv)")
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--name", action="append", default=[])
    parser.add_argument("--pattern", help="a name with {i}, the iteration number")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--mode", required=True,
                        choices=("glibc", "udp-connected", "udp-unconnected", "tcp"))
    parser.add_argument("--family", choices=("4", "6", "any"), default="4")
    parser.add_argument("--connect-port", type=int, default=443)
    parser.add_argument("--connect-timeout", type=float, default=2)
    parser.add_argument("--no-connect", action="store_true", help="only resolve")
    parser.add_argument("--deadline", type=float, default=120)
    parser.add_argument("--private-resolv", action="store_true")
    parser.add_argument("--search", help="search domains for --private-resolv, a,b")
    parser.add_argument("--ndots", type=int)
    parser.add_argument("--json", action="store_true", help="the result on one line")
    args = parser.parse_args()
    if not args.name and not args.pattern:
        parser.error("give --name or --pattern")
    if args.mode != "glibc" or args.private_resolv:
        try:
            ipaddress.ip_address(args.server or "")
        except ValueError:
            parser.error("--server IP is needed")
    if args.mode != "glibc" and (args.family == "any" or args.private_resolv):
        parser.error("--family any and --private-resolv are for glibc mode")
    if args.private_resolv and args.port != 53:
        parser.error("glibc asks port 53 only (resolv.conf has no port)")
    if args.private_resolv:
        private_resolv(args.server, args.search, args.ndots)

    server = (args.server, args.port)
    qtype = TYPE_AAAA if args.family == "6" else TYPE_A
    family = {"4": socket.AF_INET, "6": socket.AF_INET6, "any": socket.AF_UNSPEC}[args.family]
    counts = dict.fromkeys(CLASSES, 0)
    other_errors, failures, resolve_errors, latencies = {}, [], [], []
    start = time.monotonic()
    done = 0
    for i in range(args.count):
        if time.monotonic() - start > args.deadline:
            break
        if args.pattern:
            name = args.pattern.replace("{i}", str(i))
        else:
            name = args.name[i % len(args.name)]
        addr, error = None, None
        began = time.monotonic()
        try:
            if args.mode == "glibc":
                addrs = resolve_glibc(name, family, args.connect_port)
            elif args.mode == "tcp":
                addrs = resolve_tcp(server, name, qtype)
            else:
                addrs = resolve_udp(server, name, qtype, args.mode == "udp-connected")
            latencies.append((time.monotonic() - began) * 1000)
            addr = addrs[0]
            kind, error = ("ok", None) if args.no_connect else \
                connect(addr, args.connect_port, args.connect_timeout)
        except ResolveFailed as e:
            latencies.append((time.monotonic() - began) * 1000)
            kind, error = "resolve_failed", str(e)
        except WrongPeer as e:
            kind, error = "other", str(e)
        counts[kind] += 1
        done += 1
        if kind == "other":
            other_errors[error] = other_errors.get(error, 0) + 1
        if kind != "ok" and len(failures) < KEEP:
            failures.append({"i": i, "name": name, "class": kind, "address": addr, "error": error})
        if kind == "resolve_failed" and len(resolve_errors) < KEEP:
            resolve_errors.append({"i": i, "name": name, "error": error})
    elapsed = time.monotonic() - start

    result = {
        "mode": args.mode,
        "server": args.server if args.mode != "glibc" or args.private_resolv else "resolv.conf",
        "iterations": done,
        "elapsed_s": round(elapsed, 3),
        "lookups_per_s": round(done / elapsed, 1) if elapsed > 0 else None,
        "counts": counts,
        "other_errors": other_errors,
        "failures": failures,
        "resolve_errors": resolve_errors,
        "resolve_ms": {"p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99),
                       "max": round(max(latencies), 3) if latencies else None},
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2), flush=True)
    return 0 if counts["ok"] == done == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
