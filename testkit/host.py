#!/usr/bin/env python3
"""A test host: TCP and UDP listeners on every address of its network namespace.

TCP answers HTTP requests with 200 and any other first message (probe.py sends one) with a
one-line greeting; UDP echoes.
Every reply names the local address and port, so a client can tell which host it reached.
Usage: host.py --tcp 80,443 --udp 9999 --addrs 198.51.100.10,2001:db8::10 [--log FILE]
UDP binds each address on its own, so that replies come from the address a client sent to.
With --log, every TCP connection and UDP datagram that arrives is one line in FILE,
`tcp|udp LOCAL_ADDR:PORT from PEER_ADDR`: what a test asserts reached (or never reached) a host.
On a long-lived TCP flow (its first line starts with ECHO) every line that arrives is logged too,
`line LOCAL_ADDR:PORT from PEER_ADDR: TEXT`, so a test can count what still gets through.
"""
import argparse
import ipaddress
import re
import socket
import socketserver
import struct
import threading


class Dual(socketserver.ThreadingMixIn):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class TCPServer(Dual, socketserver.TCPServer):
    pass


class UDP4Server(socketserver.ThreadingMixIn, socketserver.UDPServer):
    allow_reuse_address = True
    daemon_threads = True


class UDP6Server(UDP4Server):
    address_family = socket.AF_INET6


LOG = None
LOG_LOCK = threading.Lock()


def record(kind, sock, peer):
    if LOG is None:
        return
    peer = peer[0][7:] if peer[0].startswith("::ffff:") else peer[0]
    with LOG_LOCK, open(LOG, "a") as f:
        f.write(f"{kind} {local(sock)} from {peer}\n")


def record_lines(sock, peer, text):
    if LOG is None:
        return
    peer = peer[0][7:] if peer[0].startswith("::ffff:") else peer[0]
    with LOG_LOCK, open(LOG, "a") as f:
        for line in text:
            f.write(f"line {local(sock)} from {peer}: {line}\n")


def local(sock):
    host, port = sock.getsockname()[:2]
    if host.startswith("::ffff:"):
        host = host[7:]
    return f"{host}:{port}"


class TCPHandler(socketserver.BaseRequestHandler):
    def handle(self):
        record("tcp", self.request, self.client_address)
        # The client speaks first (HTTP, or probe.py's hello), so there is nothing to time out on.
        self.request.settimeout(5)
        try:
            data = self.request.recv(1024)
        except OSError:
            return
        if data.startswith(b"ECHO"):
            # A long-lived flow: echo every line until the client stops.
            pending = b""
            try:
                while data:
                    self.request.sendall(data)
                    *lines, pending = (pending + data).split(b"\n")
                    record_lines(self.request, self.client_address,
                                 [l.decode(errors="replace") for l in lines])
                    data = self.request.recv(1024)
            except OSError:
                pass
            return
        body = f"hello from {local(self.request)}\n".encode()
        if data.split(b" ", 1)[0] in (b"GET", b"HEAD", b"POST"):
            head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\nContent-Type: text/plain\r\n\r\n"
            self.request.sendall(head.encode() + (b"" if data.startswith(b"HEAD") else body))
        else:
            self.request.sendall(body)


class UDPHandler(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        record("udp", sock, self.client_address)
        sock.sendto(f"pong from {local(sock)}\n".encode(), self.client_address)


MARKER = re.compile(rb"ENFX-[A-Za-z0-9-]+")
PLAIN = (1, 6, 17, 58)


def capture(sock):
    """Logs marked and unusual packets that arrive on any interface of the namespace."""
    while True:
        frame, addr = sock.recvfrom(65535)
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        line = describe(frame)
        if line:
            with LOG_LOCK, open(LOG, "a") as f:
                f.write(line + "\n")


def describe(frame):
    ethertype, off = struct.unpack("!H", frame[12:14])[0], 14
    # VLAN tags, in case one gets this far.
    while ethertype in (0x8100, 0x88A8) and len(frame) >= off + 4:
        ethertype, off = struct.unpack("!H", frame[off + 2 : off + 4])[0], off + 4
    if ethertype == 0x0800 and len(frame) >= off + 20:
        proto = frame[off + 9]
        src, dst = frame[off + 12 : off + 16], frame[off + 16 : off + 20]
        l4 = off + (frame[off] & 0x0F) * 4
        if proto == 6 and len(frame) >= l4 + 14 and frame[l4 + 13] & 0x12 == 0x02:
            port = struct.unpack("!H", frame[l4 + 2 : l4 + 4])[0]
            return f"syn {socket.inet_ntoa(dst)}:{port} from {socket.inet_ntoa(src)}"
    elif ethertype == 0x86DD and len(frame) >= off + 40:
        proto = frame[off + 6]
        src, dst = frame[off + 8 : off + 24], frame[off + 24 : off + 40]
    else:
        return None
    marker = MARKER.search(frame)
    if not marker and proto in PLAIN:
        return None
    name = marker.group().decode() if marker else "-"
    src, dst = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return f"pkt {name} {proto} {dst} from {src}"


def mptcp_server(port):
    """MPTCP on PORT: reads what arrives, on whichever subflow, and logs marked lines."""
    server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM, 262)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    server.bind(("::", port))
    server.listen(16)

    def serve(conn):
        with conn:
            while conn.recv(4096):
                pass

    def accept():
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tcp", default="")
    parser.add_argument("--udp", default="")
    parser.add_argument("--addrs", default="")
    parser.add_argument("--log")
    parser.add_argument("--mptcp", type=int, help="an MPTCP listener on this port")
    args = parser.parse_args()
    global LOG
    LOG = args.log
    servers = [TCPServer(("::", int(p)), TCPHandler) for p in args.tcp.split(",") if p]
    for addr in filter(None, args.addrs.split(",")):
        for port in filter(None, args.udp.split(",")):
            server = UDP6Server if ":" in addr else UDP4Server
            servers.append(server((addr, int(port)), UDPHandler))
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    if args.mptcp:
        mptcp_server(args.mptcp)
    if LOG is not None:
        # Open before "ready", so that nothing sent after it goes unseen.
        sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        threading.Thread(target=capture, args=(sniffer,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
