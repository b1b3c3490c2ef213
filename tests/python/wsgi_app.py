"""A tiny WSGI app for Usher's end-to-end tests and benchmarks.

Runs under real threaded servers, e.g.:

    waitress-serve --threads=2 --listen=127.0.0.1:PORT wsgi_app:app
    gunicorn -k gthread --threads 2 -w 1 -b 127.0.0.1:PORT wsgi_app:app
    gunicorn -k sync -w 1 -b 127.0.0.1:PORT wsgi_app:app

Endpoints:
    GET /sleep?ms=N   sleeps N milliseconds (0..60000), answers "slept N\\n"
    GET /stats        {"pid", "current", "peak", "served"} for this process;
                      /stats itself counts in none of them
    POST /stats/reset resets peak (to current) and served (to 0)
    GET /healthz      200 "ok\\n"
    anything else     200 with a short body (counts as a request)

"current" is how many requests this process is serving right now, "peak" the most
it served at once since start (or the last reset), "served" how many it finished.
A peak above the server's thread count can't happen; a peak equal to it while a
proxy promised to cap in-flight requests lower is the thing the e2e tests look for.
"""

import json
import os
import threading
import time
from urllib.parse import parse_qs

MAX_SLEEP_MS = 60_000

_lock = threading.Lock()
_current = 0
_peak = 0
_served = 0


def _enter():
    global _current, _peak
    with _lock:
        _current += 1
        if _current > _peak:
            _peak = _current


def _leave():
    global _current, _served
    with _lock:
        _current -= 1
        _served += 1


def _snapshot():
    with _lock:
        return {"pid": os.getpid(), "current": _current, "peak": _peak, "served": _served}


def _reset():
    global _peak, _served
    with _lock:
        _peak = _current
        _served = 0


def _respond(start_response, status, body, content_type="text/plain; charset=utf-8"):
    data = body.encode() if isinstance(body, str) else body
    start_response(
        status,
        [("Content-Type", content_type), ("Content-Length", str(len(data)))],
    )
    return [data]


def _stats_response(start_response):
    body = json.dumps(_snapshot()) + "\n"
    return _respond(start_response, "200 OK", body, "application/json")


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    method = environ.get("REQUEST_METHOD", "GET")

    # Bookkeeping endpoints: never counted, so they don't disturb what they measure.
    if path == "/stats":
        if method == "POST":
            _reset()
        return _stats_response(start_response)
    if path == "/stats/reset":
        _reset()
        return _stats_response(start_response)
    if path == "/healthz":
        return _respond(start_response, "200 OK", "ok\n")

    # Drain any request body so keep-alive stays usable.
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > 0:
        environ["wsgi.input"].read(length)

    _enter()
    try:
        if path == "/sleep":
            qs = parse_qs(environ.get("QUERY_STRING", ""))
            try:
                ms = int(qs.get("ms", ["0"])[0])
            except ValueError:
                return _respond(start_response, "400 Bad Request", "ms must be an integer\n")
            ms = max(0, min(ms, MAX_SLEEP_MS))
            if ms:
                time.sleep(ms / 1000.0)
            return _respond(start_response, "200 OK", f"slept {ms}\n")
        return _respond(start_response, "200 OK", f"hello from {os.getpid()}\n")
    finally:
        _leave()


application = app
