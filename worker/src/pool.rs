//! The fixed pool of named OS threads that run the blocking [`Handler`].
//!
//! Each thread takes one job from the shared [`BoundedQueue`], runs the handler
//! under `catch_unwind`, and sends the response back to the waiting connection task
//! over a oneshot channel. A panic costs one `500`, not the thread.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Rejection};
use crate::load::{Load, LoadSnapshot};
use crate::queue::BoundedQueue;
use crate::Handler;

/// One request on its way to a pool thread.
pub(crate) struct Job {
    pub(crate) req: Request<Bytes>,
    pub(crate) reply: oneshot::Sender<Response<Bytes>>,
}

/// State shared by the front and the pool.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) load: Load,
    pub(crate) queue: BoundedQueue<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("uri", self.req.uri()).finish()
    }
}

impl Shared {
    pub(crate) fn new(threads: usize, queue: usize) -> Self {
        Self {
            load: Load::new(threads),
            queue: BoundedQueue::new(queue),
        }
    }

    pub(crate) fn snapshot(&self) -> LoadSnapshot {
        self.load.snapshot(self.queue.depth())
    }
}

/// The running threads. Dropping it does not stop them; call [`Pool::shutdown`].
pub(crate) struct Pool {
    shared: Arc<Shared>,
    // Every thread holds a sender; `recv()` yields `None` once all have exited.
    exited: mpsc::Receiver<()>,
}

impl Pool {
    pub(crate) fn start(
        shared: Arc<Shared>,
        handler: Arc<dyn Handler>,
        threads: usize,
    ) -> Result<Self, Error> {
        let (alive, exited) = mpsc::channel(1);
        for i in 0..threads {
            let name = format!("usher-worker-{i}");
            let (shared2, handler, alive) = (shared.clone(), handler.clone(), alive.clone());
            let spawned = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || run(&shared2, &*handler, alive));
            if let Err(source) = spawned {
                shared.queue.close();
                return Err(Error::SpawnThread { name, source });
            }
        }
        Ok(Self { shared, exited })
    }

    /// Stops taking new jobs, lets the threads finish what is queued, and waits for
    /// them until `deadline`. Returns whether every thread exited in time.
    pub(crate) async fn shutdown(mut self, deadline: tokio::time::Instant) -> bool {
        self.shared.queue.close();
        tokio::time::timeout_at(deadline, self.exited.recv())
            .await
            .is_ok()
    }
}

fn run(shared: &Shared, handler: &dyn Handler, _alive: mpsc::Sender<()>) {
    let mut returning = false;
    while let Some(Job { req, reply }) = shared.queue.pop(returning) {
        returning = false;
        if reply.is_closed() {
            // The client went away while the request waited; nobody would read it.
            continue;
        }
        let busy = shared.load.start_busy();
        let resp = match catch_unwind(AssertUnwindSafe(|| handler.handle(req))) {
            Ok(resp) => resp,
            Err(payload) => {
                tracing::error!(panic = panic_message(&*payload), "handler panicked");
                Rejection::HandlerPanicked.response()
            }
        };
        busy.served();
        // Release the thread before answering, so the load the front reports along
        // with this response already counts this thread as free.
        drop(busy);
        // Likewise count as free for admission before the answer goes out: the
        // proxy may send the next request the moment it has this answer.
        shared.queue.finishing();
        returning = true;
        let _ = reply.send(resp);
    }
}

pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("<non-string panic payload>")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn submit(shared: &Shared, path: &str) -> oneshot::Receiver<Response<Bytes>> {
        let (reply, rx) = oneshot::channel();
        let req = Request::get(path).body(Bytes::new()).unwrap();
        shared.queue.push(Job { req, reply }).unwrap();
        rx
    }

    #[tokio::test]
    async fn panic_becomes_500_and_thread_survives() {
        let shared = Arc::new(Shared::new(1, 8));
        let handler = |req: Request<Bytes>| {
            if req.uri().path() == "/boom" {
                panic!("boom");
            }
            Response::new(Bytes::from(
                std::thread::current().name().unwrap().to_owned(),
            ))
        };
        let pool = Pool::start(shared.clone(), Arc::new(handler), 1).unwrap();
        let boom = submit(&shared, "/boom");
        let ok = submit(&shared, "/ok");
        assert_eq!(
            boom.await.unwrap().status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(ok.await.unwrap().body().as_ref(), b"usher-worker-0");
        assert_eq!(shared.snapshot().served, 2);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        assert!(pool.shutdown(deadline).await);
    }
}
