//! The contract between the server and application code.
//!
//! A [`Handler`] is plain blocking code. It runs on one of the pool's OS threads and
//! may sleep, block on a database driver or burn CPU; the async front never waits on
//! it directly, so slow handlers cannot stall connection handling.

use bytes::Bytes;
use http::{Request, Response};

/// Blocking request handler run on the worker thread pool.
///
/// The request body has already been read completely by the front, so the handler
/// never waits on a slow client. One thread runs one request at a time.
///
/// A panic inside `handle` is caught: the client gets a `500` and the thread goes
/// on serving the next request.
///
/// Closures `Fn(Request<Bytes>) -> Response<Bytes>` implement this trait:
///
/// ```
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use usher_worker::Handler;
///
/// let hello = |_req: Request<Bytes>| Response::new(Bytes::from_static(b"hello\n"));
/// let resp = hello.handle(Request::new(Bytes::new()));
/// assert_eq!(resp.body().as_ref(), b"hello\n");
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Produces the response for one fully read request.
    fn handle(&self, req: Request<Bytes>) -> Response<Bytes>;

    /// Whether the server should run [`Handler::server_io`] on one I/O thread
    /// of its own for every request. Default: no.
    fn has_server_io(&self) -> bool {
        false
    }

    /// The server's own share of requests, run on its single I/O thread: one
    /// step when a request has been read (before it is queued) and one when
    /// its response is ready (before it is written). `steps` is how many were
    /// pending at once, all to be done in this call, as waitress's main
    /// thread serves every ready socket of one `poll()` under one hold of the
    /// GIL: under the GIL it waits for CPU-bound views like any thread (see
    /// `App::with_server_cpu`). A panic here is caught and logged. Only called
    /// if [`Handler::has_server_io`].
    fn server_io(&self, steps: usize) {
        let _ = steps;
    }
}

impl<F> Handler for F
where
    F: Fn(Request<Bytes>) -> Response<Bytes> + Send + Sync + 'static,
{
    fn handle(&self, req: Request<Bytes>) -> Response<Bytes> {
        self(req)
    }
}
