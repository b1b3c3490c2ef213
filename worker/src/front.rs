//! The async front: what happens to a request between hyper and the pool.
//!
//! 1. `GET /healthz` and `GET /metrics` are answered right here, so they stay
//!    answerable when every thread is busy and the queue is full.
//! 2. The body is read whole, with a size limit (413) and a timeout between chunks
//!    (408), so a slow client never holds a pool thread.
//! 3. The request goes into the bounded queue, or is refused with 503.
//! 4. Every response gets `X-Usher-Load` and `X-Usher-Worker`.
//!
//! With a handler that has server I/O (`usher-worker --gil`: waitress's main
//! thread), a step on that one thread comes before 3 and another before the
//! response is written; a request in the first step is neither queued nor
//! busy in the load report, and a refusal waits for that step.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderName, HeaderValue, Method, Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Body;
use tokio::sync::oneshot;

use crate::error::Rejection;
use crate::load::X_USHER_LOAD;
use crate::metrics::Metrics;
use crate::pool::{Job, Shared};
use crate::queue::PushError;
use crate::Handler;

/// The worker that answered, by default its listen address.
pub const X_USHER_WORKER: HeaderName = HeaderName::from_static("x-usher-worker");

#[derive(Debug)]
pub(crate) struct Front {
    pub(crate) shared: Arc<Shared>,
    pub(crate) metrics: Metrics,
    pub(crate) max_body: usize,
    pub(crate) body_read_timeout: Duration,
    pub(crate) builtin_endpoints: bool,
    pub(crate) queue_capacity: usize,
    pub(crate) worker_id: HeaderValue,
    /// The handler's server I/O thread, if it has one (`Handler::server_io`).
    pub(crate) io: Option<ServerIo>,
}

/// One OS thread that runs `Handler::server_io` for each step it is sent, in
/// order, and says when each is done.
#[derive(Debug)]
pub(crate) struct ServerIo {
    steps: std::sync::mpsc::Sender<oneshot::Sender<()>>,
}

impl ServerIo {
    pub(crate) fn start(handler: Arc<dyn Handler>) -> std::io::Result<ServerIo> {
        let (steps, rx) = std::sync::mpsc::channel::<oneshot::Sender<()>>();
        std::thread::Builder::new()
            .name("usher-worker-io".into())
            .spawn(move || {
                // Ends when the front (the only sender) is dropped.
                while let Ok(first) = rx.recv() {
                    let batch: Vec<_> = std::iter::once(first).chain(rx.try_iter()).collect();
                    let n = batch.len();
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        handler.server_io(n);
                    }));
                    if let Err(payload) = run {
                        tracing::error!(
                            panic = crate::pool::panic_message(&*payload),
                            "server I/O step panicked"
                        );
                    }
                    for done in batch {
                        let _ = done.send(());
                    }
                }
            })?;
        Ok(ServerIo { steps })
    }

    /// Runs one step on the I/O thread and waits for it.
    async fn step(&self) {
        let (done, wait) = oneshot::channel();
        if self.steps.send(done).is_ok() {
            let _ = wait.await;
        }
    }
}

impl Front {
    pub(crate) async fn serve<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let version = req.version();
        let resp = match self.route(req).await {
            Ok(resp) => resp,
            Err(rejection) => {
                let mut resp = rejection.response();
                if rejection.closes_connection() && version <= Version::HTTP_11 {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                resp
            }
        };
        self.finish(resp)
    }

    async fn route<B>(&self, req: Request<B>) -> Result<Response<Bytes>, Rejection>
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        if self.builtin_endpoints && req.method() == Method::GET {
            match req.uri().path() {
                "/healthz" => return Ok(self.healthz()),
                "/metrics" => return Ok(self.metrics()),
                _ => {}
            }
        }
        let (parts, body) = req.into_parts();
        let body = read_body(body, self.max_body, self.body_read_timeout).await?;
        if let Some(io) = &self.io {
            io.step().await;
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            req: Request::from_parts(parts, body),
            reply,
        };
        match self.shared.queue.push(job) {
            Ok(()) => {}
            Err(PushError::Full(_)) => {
                self.shared.load.refused();
                return Err(Rejection::QueueFull {
                    threads: self.shared.load.threads(),
                    queue: self.queue_capacity,
                });
            }
            Err(PushError::Closed(_)) => return Err(Rejection::ShuttingDown),
        }
        let resp = answer.await.map_err(|_| Rejection::NoAnswer)?;
        if let Some(io) = &self.io {
            io.step().await;
        }
        Ok(resp)
    }

    fn healthz(&self) -> Response<Bytes> {
        let json = serde_json::to_vec(&self.shared.snapshot()).expect("plain struct");
        let mut resp = Response::new(Bytes::from(json));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }

    fn metrics(&self) -> Response<Bytes> {
        let mut resp = Response::new(Bytes::from(self.metrics.render(&self.shared.snapshot())));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(prometheus::TEXT_FORMAT),
        );
        resp
    }

    fn finish(&self, mut resp: Response<Bytes>) -> Response<Full<Bytes>> {
        let load = self.shared.snapshot().report().to_string();
        let h = resp.headers_mut();
        h.insert(
            X_USHER_LOAD,
            HeaderValue::from_str(&load).expect("digits, letters and punctuation"),
        );
        h.insert(X_USHER_WORKER, self.worker_id.clone());
        self.metrics.count_response(resp.status());
        resp.map(Full::new)
    }
}

/// Reads a whole body: at most `limit` bytes, waiting at most `between_chunks` for
/// each next chunk. Trailers are dropped.
pub(crate) async fn read_body<B>(
    body: B,
    limit: usize,
    between_chunks: Duration,
) -> Result<Bytes, Rejection>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    // With a Content-Length the lower bound is exact: refuse before reading a byte.
    if body.size_hint().lower() > limit as u64 {
        return Err(Rejection::BodyTooLarge { limit });
    }
    let mut body = pin!(body);
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(between_chunks, body.frame()).await {
            Err(_) => {
                return Err(Rejection::BodyTimeout {
                    after: between_chunks,
                })
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(Rejection::BodyRead(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let have = first.as_ref().map_or(0, Bytes::len) + rest.len();
        if have + data.len() > limit {
            return Err(Rejection::BodyTooLarge { limit });
        }
        // The common case is one chunk: keep it without copying.
        match &first {
            None => first = Some(data),
            Some(_) => rest.extend_from_slice(&data),
        }
    }
    Ok(match first {
        None => Bytes::new(),
        Some(first) if rest.is_empty() => first,
        Some(first) => {
            let mut all = BytesMut::with_capacity(first.len() + rest.len());
            all.extend_from_slice(&first);
            all.extend_from_slice(&rest);
            all.freeze()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::Frame;
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::sync::mpsc;

    /// A body without a declared length whose chunks arrive when the test sends them.
    struct ChannelBody(mpsc::Receiver<Bytes>);

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0.poll_recv(cx).map(|c| c.map(|c| Ok(Frame::data(c))))
        }
    }

    fn chunked(capacity: usize) -> (mpsc::Sender<Bytes>, ChannelBody) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, ChannelBody(rx))
    }

    #[tokio::test]
    async fn concatenates_chunks() {
        let (tx, body) = chunked(4);
        for part in ["ab", "cd", "e"] {
            tx.send(Bytes::from(part)).await.unwrap();
        }
        drop(tx);
        let got = read_body(body, 5, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got.as_ref(), b"abcde");
    }

    #[tokio::test]
    async fn over_limit_without_length_is_413() {
        let (tx, body) = chunked(4);
        for part in ["abc", "def"] {
            tx.send(Bytes::from(part)).await.unwrap();
        }
        drop(tx);
        let err = read_body(body, 5, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err, Rejection::BodyTooLarge { limit: 5 });
    }

    #[tokio::test]
    async fn declared_length_over_limit_is_413_at_once() {
        let body = Full::new(Bytes::from_static(b"0123456789"));
        let err = read_body(body, 9, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err, Rejection::BodyTooLarge { limit: 9 });
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_client_is_408() {
        let (tx, body) = chunked(4);
        tx.send(Bytes::from("ab")).await.unwrap();
        let err = read_body(body, 100, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(matches!(err, Rejection::BodyTimeout { .. }), "{err:?}");
        drop(tx);
    }
}
