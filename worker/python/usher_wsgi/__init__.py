"""Report a WSGI app's load to Usher, the way usher-worker does.

Wrap the app (``application = UsherLoad(get_wsgi_application())``) and every
response carries ``X-Usher-Load: threads=4, busy=1, queued=0``, and ``GET
/healthz`` answers ``{"threads":4,"busy":1,"queued":0,"served":123,
"peak_busy":4}``, without calling the app. Usher takes ``threads`` as the
backend's capacity (``max_in_flight: auto``) and ``busy``/``queued`` to share
the threads among several Usher replicas, so the numbers are exact:

- ``busy`` counts requests inside the app: from the call until the server
  closes the response iterable (PEP 3333 requires it to). On a response it
  leaves out the request being answered, as usher-worker counts that thread
  free already: Usher stops counting it when the response arrives.
- ``queued`` counts requests the server accepted that wait for a thread.
- ``served`` counts requests that left the app (also the ones that raised);
  ``peak_busy`` is the highest ``busy`` since start. ``/healthz`` counts in
  none of them: it never enters the app.

The middleware cannot see the server's pool through WSGI, so it finds it from
the thread serving the request (read once, then cached):

- waitress: ``threading.current_thread()._target.__self__`` is the
  ``waitress.task.ThreadedTaskDispatcher``; threads = ``len(d.threads) -
  d.stop_count``, queued = ``len(d.queue)`` (channels waiting for a thread,
  each with one parsed request under the default
  ``channel_request_lookahead=0``).
- gunicorn ``-k gthread``: the thread runs ``concurrent.futures``'
  ``_worker`` with ``_args[0]`` a weakref to the ``ThreadPoolExecutor``;
  threads = ``executor._max_workers`` (``--threads``), queued =
  ``executor._work_queue.qsize()`` (connections handed to the pool, each
  with a request ready). What gthread holds elsewhere is invisible here:
  connections past ``--worker-connections`` wait in the kernel's accept
  backlog, kept-alive and deferred connections wait in its poller (no request
  read yet), and a pool thread may wait up to 5 s for a new connection's
  first bytes (occupied, yet not busy).

Anything else (gunicorn's sync worker, wsgiref, ...): pass ``threads=`` or set
``USHER_THREADS``; ``queued`` is then 0. Without a thread count no
``X-Usher-Load`` header is sent (a wrong capacity is worse than none) and one
warning is logged; ``/healthz`` still answers, without ``threads``.

Each process reports its own pool: run one gunicorn worker per address (as
Usher's fleet does), or the report describes only the process that answered.

Responses made with ``wsgi.file_wrapper`` are wrapped like any other, so the
server streams them by iterating (correct, but without ``sendfile``).
"""

import json
import logging
import os
import sys
import threading
import weakref

__all__ = ["UsherLoad", "HEADER"]
__version__ = "0.1.0"

#: The response header Usher reads the load from.
HEADER = "X-Usher-Load"

log = logging.getLogger("usher_wsgi")


class UsherLoad:
    """WSGI middleware: the load report on every response, and ``/healthz``.

    ``threads``: the server's thread count; default ``USHER_THREADS`` from
    the environment, else found from the server (waitress, gunicorn
    gthread). ``healthz_path``: answered by the middleware itself on ``GET``;
    default ``/healthz``, as Usher's health check and capacity probe ask.
    """

    def __init__(self, app, threads=None, healthz_path="/healthz"):
        self.app = app
        self.healthz_path = healthz_path
        self._threads = _threads_setting(threads)
        self._load = _Load()
        self._pool = None

    def __call__(self, environ, start_response):
        pool = self._find_pool()
        if environ.get("PATH_INFO") == self.healthz_path and environ.get("REQUEST_METHOD") == "GET":
            return self._healthz(pool, start_response)

        claim = self._load.enter()

        def reporting_start_response(status, headers, exc_info=None):
            # This request is still inside the app: leave it out.
            report = self._report(pool, exclude=1)
            if report is not None:
                headers = [(k, v) for k, v in headers if k.lower() != "x-usher-load"]
                headers.append((HEADER, report))
            return start_response(status, headers, exc_info)

        try:
            result = self.app(environ, reporting_start_response)
        except BaseException:
            claim.release()
            raise
        if hasattr(result, "__len__"):
            # waitress sets Content-Length for a one-item body it can measure.
            return _SizedResponse(result, claim)
        return _Response(result, claim)

    def _threads_now(self, pool):
        if self._threads is not None:
            return self._threads
        return pool.threads if pool is not None else None

    def _report(self, pool, exclude):
        threads = self._threads_now(pool)
        if threads is None:
            return None
        busy, _, _ = self._load.snapshot()
        queued = pool.queued() if pool is not None else 0
        return f"threads={threads}, busy={busy - exclude}, queued={queued}"

    def _healthz(self, pool, start_response):
        busy, served, peak = self._load.snapshot()
        queued = pool.queued() if pool is not None else 0
        threads = self._threads_now(pool)
        facts = {} if threads is None else {"threads": threads}
        facts.update(busy=busy, queued=queued, served=served, peak_busy=peak)
        body = json.dumps(facts, separators=(",", ":")).encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
        if threads is not None:
            headers.append((HEADER, f"threads={threads}, busy={busy}, queued={queued}"))
        start_response("200 OK", headers)
        return [body]

    def _find_pool(self):
        pool = self._pool
        if pool is not None:
            return pool
        pool = _detect_pool(threading.current_thread())
        if pool is not None:
            self._pool = pool
            log.info("usher_wsgi: %s, %d threads", pool.name, pool.threads)
        elif self._threads is None and self._load.first_time_unknown():
            log.warning(
                "usher_wsgi: cannot tell this server's thread count (only waitress and "
                "gunicorn -k gthread are recognised), so no %s header is sent; pass "
                "UsherLoad(app, threads=N) or set USHER_THREADS=N",
                HEADER,
            )
        return pool


class _Load:
    """The counters, under one lock: requests in the app, served, peak."""

    def __init__(self):
        self._lock = threading.Lock()
        self._busy = 0
        self._served = 0
        self._peak = 0
        self._warned = False

    def enter(self):
        with self._lock:
            self._busy += 1
            if self._busy > self._peak:
                self._peak = self._busy
        return _Claim(self)

    def _leave(self, claim):
        with self._lock:
            if claim.released:
                return
            claim.released = True
            self._busy -= 1
            self._served += 1

    def snapshot(self):
        """``(busy, served, peak_busy)``, read together."""
        with self._lock:
            return self._busy, self._served, self._peak

    def first_time_unknown(self):
        """True once: whoever gets it logs the unknown-thread-count warning."""
        with self._lock:
            first, self._warned = not self._warned, True
            return first


class _Claim:
    """One request's place in ``busy``; releasing it twice counts once."""

    __slots__ = ("_load", "released")

    def __init__(self, load):
        self._load = load
        self.released = False

    def release(self):
        self._load._leave(self)


class _Response:
    """The app's response iterable, holding its request's claim until the
    server closes it."""

    __slots__ = ("_inner", "_claim")

    def __init__(self, inner, claim):
        self._inner = inner
        self._claim = claim

    def __iter__(self):
        return iter(self._inner)

    def close(self):
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            self._claim.release()

    def __del__(self):
        # A server that drops the response without closing it (against PEP
        # 3333) would otherwise leave the request busy for good.
        claim = getattr(self, "_claim", None)
        if claim is not None:
            claim.release()


class _SizedResponse(_Response):
    __slots__ = ()

    def __len__(self):
        return len(self._inner)


class _Pool:
    """The server's thread pool: its size when found, its queue read live."""

    __slots__ = ("name", "threads", "_depth")

    def __init__(self, name, threads, depth):
        self.name = name
        self.threads = threads
        self._depth = depth

    def queued(self):
        try:
            return max(0, int(self._depth()))
        except Exception:
            return 0


def _threads_setting(threads):
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a whole number above 0, not {threads!r}")
        return threads
    raw = os.environ.get("USHER_THREADS", "").strip()
    if not raw:
        return None
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    log.warning("usher_wsgi: ignoring USHER_THREADS=%r: not a whole number above 0", raw)
    return None


def _detect_pool(thread):
    """The pool that runs ``thread``, or None. Never raises: these are other
    projects' private attributes, and a version that moved them must cost the
    report, not the request."""
    for detect in (_waitress_pool, _executor_pool):
        try:
            pool = detect(thread)
        except Exception:
            pool = None
        if pool is not None:
            return pool
    return None


def _waitress_pool(thread):
    task = sys.modules.get("waitress.task")
    dispatcher = getattr(getattr(thread, "_target", None), "__self__", None)
    if task is None or not isinstance(dispatcher, task.ThreadedTaskDispatcher):
        return None
    threads = len(dispatcher.threads) - dispatcher.stop_count
    if threads < 1:
        return None
    queue = dispatcher.queue
    return _Pool("waitress ThreadedTaskDispatcher", threads, queue.__len__)


def _executor_pool(thread):
    futures = sys.modules.get("concurrent.futures.thread")
    if futures is None:
        return None
    for arg in getattr(thread, "_args", None) or ():
        if not isinstance(arg, weakref.ref):
            continue
        executor = arg()
        if isinstance(executor, futures.ThreadPoolExecutor) and executor._max_workers >= 1:
            return _Pool(
                "concurrent.futures.ThreadPoolExecutor (gunicorn gthread)",
                executor._max_workers,
                executor._work_queue.qsize,
            )
    return None
