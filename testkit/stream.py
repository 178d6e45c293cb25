#!/usr/bin/env python3
"""A long-lived TCP flow: echo a line every 50 ms and report each round trip.

Usage: stream.py HOST PORT SECONDS
Prints "ok N" per echoed line and "stalled N" when one is not echoed within 0.5 s (exit 3);
exits 0 after SECONDS of echoes. Output is flushed per line so a watcher sees it live.
"""
import socket
import sys
import time


def main():
    host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    sock = socket.create_connection((host, port), timeout=2)
    sock.settimeout(0.5)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        line = f"ECHO {n}\n".encode()
        try:
            sock.sendall(line)
            got = b""
            while not got.endswith(b"\n"):
                chunk = sock.recv(64)
                if not chunk:
                    raise OSError("closed")
                got += chunk
        except OSError:
            print(f"stalled {n}", flush=True)
            sys.exit(3)
        print(f"ok {n}", flush=True)
        n += 1
        time.sleep(0.05)
    print("done", flush=True)


if __name__ == "__main__":
    main()
