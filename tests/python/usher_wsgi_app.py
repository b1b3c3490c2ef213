"""A tiny WSGI app wrapped in usher_wsgi.UsherLoad, for the e2e tests of the
middleware (tests/tests/wsgi_middleware.rs). Runs under real servers:

    waitress-serve --threads=4 --listen=127.0.0.1:PORT usher_wsgi_app:application
    gunicorn -k gthread --threads 4 -w 1 -b 127.0.0.1:PORT usher_wsgi_app:application

with worker/python on PYTHONPATH (or usher-wsgi installed).

Endpoints:
    GET /sleep?ms=N   sleeps N milliseconds (0..60000), answers "slept N\\n"
    GET /healthz      answered by UsherLoad: the load as JSON
    anything else     200 "hello\\n"
"""

import time
from urllib.parse import parse_qs

from usher_wsgi import UsherLoad

MAX_SLEEP_MS = 60_000


def _respond(start_response, status, text):
    data = text.encode()
    start_response(
        status,
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))],
    )
    return [data]


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/sleep":
        qs = parse_qs(environ.get("QUERY_STRING", ""))
        try:
            ms = int(qs.get("ms", ["0"])[0])
        except ValueError:
            return _respond(start_response, "400 Bad Request", "ms must be an integer\n")
        ms = max(0, min(ms, MAX_SLEEP_MS))
        if ms:
            time.sleep(ms / 1000.0)
        return _respond(start_response, "200 OK", f"slept {ms}\n")
    return _respond(start_response, "200 OK", "hello\n")


application = UsherLoad(app)
