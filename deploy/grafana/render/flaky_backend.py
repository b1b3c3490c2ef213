#!/usr/bin/env python3
"""A tiny static backend for render.sh: serves /healthz and /sleep?ms=N like a
small threaded app, until SIGUSR1 "breaks" it (every request, health checks
included, gets 503); the next SIGUSR1 repairs it. Loopback only, prints its
port on stdout, exits by itself after --max-seconds."""

import argparse
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

broken = threading.Event()


def toggle(_signum, _frame):
    if broken.is_set():
        broken.clear()
    else:
        broken.set()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urlsplit(self.path)
        if broken.is_set():
            return self.reply(503, b"broken on purpose\n")
        if url.path == "/healthz":
            return self.reply(200, b"ok\n")
        if url.path == "/sleep":
            ms = int(parse_qs(url.query).get("ms", ["0"])[0])
            time.sleep(min(ms, 5000) / 1000)
        return self.reply(200, b"ok\n")

    def reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-seconds", type=float, default=300)
    args = ap.parse_args()
    signal.signal(signal.SIGUSR1, toggle)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    threading.Timer(args.max_seconds, server.shutdown).start()
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
