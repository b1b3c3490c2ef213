"""A tiny WSGI app for bench/worker_bench.sh: the waitress side of the comparison.

GET /sleep?ms=N sleeps N milliseconds on the serving thread and answers a small
JSON body, like usher-worker's built-in /sleep.
"""
import json
import threading
import time
from urllib.parse import parse_qs


def app(environ, start_response):
    if environ.get("PATH_INFO") != "/sleep":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    try:
        ms = int(parse_qs(environ.get("QUERY_STRING", "")).get("ms", ["0"])[0])
    except ValueError:
        start_response("400 Bad Request", [("Content-Type", "text/plain")])
        return [b"bad ms\n"]
    start = time.time()
    if ms > 0:
        time.sleep(ms / 1000)
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
