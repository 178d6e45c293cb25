#!/usr/bin/env python3
"""A TLS test host: answers every HTTP request with 200 and a body naming the SNI it was sent.

Usage: tls_server.py --cert CERT --key KEY [--listen 127.0.0.1:0]
Prints `ready PORT` once listening, so a test behind a proxy can check that the connection it
made reached this server (and with which server name) end to end.
"""
import argparse
import socket
import socketserver
import ssl


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    names = {}

    def remember(sock, name, _context):
        names[id(sock)] = name or "-"

    context.sni_callback = remember

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            try:
                tls = context.wrap_socket(self.request, server_side=True)
            except (ssl.SSLError, OSError):
                return
            with tls:
                reader = tls.makefile("rb")
                while reader.readline() not in (b"\r\n", b"\n", b""):
                    pass
                body = f"tls hello {names.pop(id(tls), '-')}\n".encode()
                tls.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: "
                            + str(len(body)).encode() + b"\r\n\r\n" + body)

    class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
        allow_reuse_address = True
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    with Server((host.strip("[]"), int(port)), Handler) as server:
        print(f"ready {server.server_address[1]}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
