"""A tiny WSGI app for the bench/ scripts: the waitress side of the comparisons.

bench/worker_bench.sh serves it next to usher-worker; bench/threaded.sh and
bench/gil.sh run it under waitress (`BACKEND=waitress`, their default).

GET /sleep?ms=N  sleeps N milliseconds on the serving thread (I/O-bound: the GIL
                 is released during the sleep), like usher-worker's /sleep
GET /cpu?ms=N    burns N milliseconds of this thread's CPU time in a pure-Python
                 loop (CPU-bound: it holds the GIL while it runs, so concurrent
                 /cpu requests in one process take turns, as usher-worker --gil
                 models). Measured with time.thread_time(), so the time a thread
                 waits for the GIL does not count as work.
GET /healthz     200 "ok"

/sleep/NAME and /cpu/NAME are the same views under a view name: distinct paths
for distinct views, as in a real app (bench/threaded.sh's mix uses them).

/sleep and /cpu answer {"start_us", "end_us", "thread"} (wall clock, µs).
"""
import json
import threading
import time
from urllib.parse import parse_qs

MAX_MS = 60_000


def _burn(seconds):
    """Pure-Python work until this thread has used `seconds` of CPU."""
    end = time.thread_time() + seconds
    n = 0
    while time.thread_time() < end:
        n += 1  # bytecodes between the checks: the GIL is handed over between them
    return n


def _plain(start_response, status, text):
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def app(environ, start_response):
    path = environ.get("PATH_INFO")
    if path == "/healthz":
        return _plain(start_response, "200 OK", "ok\n")
    for route in ("/sleep", "/cpu"):
        if path.startswith(route + "/"):
            path = route
    if path not in ("/sleep", "/cpu"):
        return _plain(start_response, "404 Not Found", "not found\n")
    try:
        ms = int(parse_qs(environ.get("QUERY_STRING", "")).get("ms", ["0"])[0])
    except ValueError:
        return _plain(start_response, "400 Bad Request", "bad ms\n")
    ms = max(0, min(ms, MAX_MS))
    start = time.time()
    if ms > 0:
        if path == "/sleep":
            time.sleep(ms / 1000)
        else:
            _burn(ms / 1000)
    body = json.dumps(
        {
            "start_us": int(start * 1e6),
            "end_us": int(time.time() * 1e6),
            "thread": threading.current_thread().name,
        }
    ).encode()
    start_response(
        "200 OK",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
    )
    return [body]


application = app
