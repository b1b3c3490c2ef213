//! Steady, bounded background load for tests that change something while
//! traffic flows (reloads, rollouts, discovery) and then assert that no
//! request failed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::{wait_until, Client};

/// One async task per URL, each sending GETs back to back (with `pause`
/// between them) until [`SteadyLoad::finish`] or `limit` has passed.
pub struct SteadyLoad {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SteadyLoad {
    /// Starts the load; call from inside a tokio runtime.
    pub fn start(urls: &[String], pause: Duration, limit: Duration) -> SteadyLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let client = Client::new();
        let tasks = urls
            .iter()
            .map(|url| {
                let (stop, ok, failures, c, url) = (
                    stop.clone(),
                    ok.clone(),
                    failures.clone(),
                    client.clone(),
                    url.clone(),
                );
                tokio::spawn(async move {
                    let deadline = Instant::now() + limit;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match c.get(&url).await {
                            Ok(r) if r.status == StatusCode::OK => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => failures.lock().unwrap().push(format!(
                                "{url}: {} {}",
                                r.status,
                                r.text().trim()
                            )),
                            Err(e) => failures.lock().unwrap().push(format!("{url}: {e:#}")),
                        }
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        SteadyLoad {
            stop,
            ok,
            failures,
            tasks,
        }
    }

    /// Successful requests so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests than now have succeeded.
    pub fn wait_for_more(&self, n: u64, timeout: Duration) -> bool {
        let target = self.ok() + n;
        wait_until(timeout, || self.ok() >= target)
    }

    /// Stops the load and returns the successes and the failures.
    pub async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}
