#!/usr/bin/env python3
"""Tries one connection and prints what happened: `ok <reply>`, `EPERM`, or another errno name.

Exit status: 0 connected (and got a reply), 1 refused with EPERM, 2 anything else.
Usage: probe.py tcp|tcp-connect|tcp6mapped|udp|udp-sendto HOST PORT [TIMEOUT_SECONDS]
  tcp-connect only connects (for servers that do not answer a line, such as HTTP ones).
  tcp6mapped connects an AF_INET6 socket to ::ffff:HOST (HOST is IPv4).
  udp connects a UDP socket then sends; udp-sendto sends without connecting.
"""
import errno
import socket
import sys


def main():
    kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if kind == "tcp6mapped":
        family, addr = socket.AF_INET6, ("::ffff:" + host, port)
    else:
        info = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
        family, addr = info[0], info[4]
    stype = socket.SOCK_DGRAM if kind.startswith("udp") else socket.SOCK_STREAM
    sock = socket.socket(family, stype)
    sock.settimeout(float(sys.argv[4]) if len(sys.argv) > 4 else 2)
    try:
        if kind == "udp-sendto":
            sock.sendto(b"ping", addr)
            reply = sock.recv(1024)
        elif kind == "udp":
            sock.connect(addr)
            sock.send(b"ping")
            reply = sock.recv(1024)
        elif kind == "tcp-connect":
            sock.connect(addr)
            reply = b"connected"
        else:
            sock.connect(addr)
            sock.sendall(b"hello\n")
            reply = sock.recv(1024)
    except PermissionError:
        print("EPERM")
        return 1
    except socket.timeout:
        print("ETIMEDOUT")
        return 2
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e)))
        return 2
    print("ok " + reply.decode(errors="replace").strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
