#!/usr/bin/env python3
"""Long-lived flows that keep sending numbered lines and never reconnect.

Usage: flows.py SECONDS FLOW [FLOW...], each FLOW `tcp:HOST:PORT` or `udp:HOST:PORT` (an IPv6
HOST in brackets: `tcp:[2001:db8::10]:443`). Every flow is connected first (TCP, or a connected
UDP socket); then, every 50 ms until SECONDS have passed, each flow still open sends
`ECHO FLOW N` (N counts up per flow) and drains whatever came back. A send that fails closes
that flow for good: the line `closed FLOW N ERRNO` is printed, and no new socket is opened.
Prints `ready` once every flow is connected (exit 2 if one cannot be), `done` at the end.
"""
import errno
import socket
import sys
import time


def parse(spec):
    kind, rest = spec.split(":", 1)
    host, port = rest.rsplit(":", 1)
    return kind, host.strip("[]"), int(port)


def open_flow(kind, host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    stype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, stype)
    sock.settimeout(2)
    sock.connect((host, port))
    sock.setblocking(False)
    return sock


def drain(sock):
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, OSError):
        pass


def main():
    seconds = float(sys.argv[1])
    flows = {}
    for spec in sys.argv[2:]:
        try:
            flows[spec] = open_flow(*parse(spec))
        except OSError as e:
            print(f"cannot open {spec}: {errno.errorcode.get(e.errno, e)}", flush=True)
            sys.exit(2)
    print("ready", flush=True)
    sent = {spec: 0 for spec in flows}
    end = time.monotonic() + seconds
    while time.monotonic() < end and flows:
        for spec, sock in list(flows.items()):
            try:
                sock.send(f"ECHO {spec} {sent[spec]}\n".encode())
                sent[spec] += 1
            except BlockingIOError:
                pass
            except OSError as e:
                print(f"closed {spec} {sent[spec]} {errno.errorcode.get(e.errno, e)}", flush=True)
                sock.close()
                del flows[spec]
                continue
            drain(sock)
        time.sleep(0.05)
    print("done", flush=True)


if __name__ == "__main__":
    main()
