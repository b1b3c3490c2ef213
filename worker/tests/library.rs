//! The library API, served in-process: `Server::builder()` with custom handlers.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use usher_e2e::{blocking, url, wait_until_async, Client};
use usher_worker::{Builder, Error, Handler, Server, Stats};

struct Running {
    addr: SocketAddr,
    stats: Stats,
    stop: oneshot::Sender<()>,
    done: JoinHandle<Result<(), Error>>,
}

impl Running {
    async fn shutdown(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.done)
            .await
            .expect("server drained within 30 s")
            .expect("server task did not panic")
            .expect("server returned Ok");
    }
}

async fn start(builder: Builder, handler: impl Handler) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = builder.build();
    let stats = server.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(server.serve_with_shutdown(listener, handler, async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        stats,
        stop,
        done,
    }
}

fn thread_name(_req: Request<Bytes>) -> Response<Bytes> {
    Response::new(Bytes::from(
        std::thread::current().name().unwrap().to_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn handler_panic_is_500_and_the_thread_lives_on() {
    let handler = |req: Request<Bytes>| {
        if req.uri().path() == "/panic" {
            panic!("handler bug");
        }
        thread_name(req)
    };
    let srv = start(Server::builder().threads(2), handler).await;
    let client = Client::new();

    let resp = client.get(&url(srv.addr, "/panic")).await.unwrap();
    assert_eq!(resp.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(resp.text().contains("panicked"), "{}", resp.text());
    assert!(resp.header("x-usher-load").is_some());

    // More requests than threads: the thread that panicked must serve again.
    let mut names = HashSet::new();
    for _ in 0..6 {
        let resp = client.get(&url(srv.addr, "/ok")).await.unwrap();
        assert_eq!(resp.status, StatusCode::OK);
        names.insert(resp.text());
    }
    let allowed: HashSet<_> = ["usher-worker-0", "usher-worker-1"]
        .map(String::from)
        .into();
    assert!(names.is_subset(&allowed), "{names:?}");
    assert_eq!(srv.stats.snapshot().served, 7);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_body_gets_408_and_oversized_body_413() {
    let builder = Server::builder()
        .max_body(1024)
        .body_read_timeout(Duration::from_millis(300));
    let srv = start(builder, |req: Request<Bytes>| {
        Response::new(req.into_body())
    })
    .await;

    // Announce 10 bytes, send 2, then stall.
    let addr = srv.addr;
    let raw = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nab")
            .unwrap();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw); // the server closes after the 408
        raw
    })
    .await
    .unwrap();
    let resp = blocking::parse_response(&raw).unwrap();
    assert_eq!(resp.status, StatusCode::REQUEST_TIMEOUT);
    assert!(resp.text().contains("timeout"), "{}", resp.text());

    let client = Client::new();
    let big = client
        .request(Method::POST, &url(srv.addr, "/x"), vec![b'x'; 1025])
        .await
        .unwrap();
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(big.header("x-usher-load").is_some());
    let fits = client
        .request(Method::POST, &url(srv.addr, "/x"), vec![b'y'; 1024])
        .await
        .unwrap();
    assert_eq!((fits.status, fits.body.len()), (StatusCode::OK, 1024));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn speaks_h2c_and_reports_load_and_worker() {
    let srv = start(Server::builder().threads(3), thread_name).await;
    let resp = Client::http2().get(&url(srv.addr, "/")).await.unwrap();
    assert_eq!(resp.version, http::Version::HTTP_2);
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(
        resp.header("x-usher-load"),
        Some("threads=3, busy=0, queued=0")
    );
    assert_eq!(
        resp.header("x-usher-worker"),
        Some(srv.addr.to_string().as_str())
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_finishes_in_flight_and_queued_requests() {
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    // Blocks until the test releases it, so the test controls when work finishes.
    let handler = move |_req: Request<Bytes>| {
        release_rx.lock().unwrap().recv().unwrap();
        Response::new(Bytes::from_static(b"done"))
    };
    let srv = start(Server::builder().threads(1).queue(4), handler).await;
    let client = Client::new();
    let inflight: Vec<_> = (0..3)
        .map(|_| {
            let (client, u) = (client.clone(), url(srv.addr, "/work"));
            tokio::spawn(async move { client.get(&u).await })
        })
        .collect();
    let stats = srv.stats.clone();
    let all_in = wait_until_async(Duration::from_secs(10), || {
        let s = stats.snapshot();
        async move { s.busy == 1 && s.queued == 2 }
    })
    .await;
    assert!(all_in, "{:?}", stats.snapshot());

    let addr = srv.addr;
    let _ = srv.stop.send(());
    // The listener closes: new connections are refused while work drains.
    let closed = wait_until_async(Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(
        closed,
        "listener still accepting after shutdown was signalled"
    );
    assert!(!srv.done.is_finished(), "returned before the work was done");

    for _ in 0..3 {
        release_tx.send(()).unwrap();
    }
    for req in inflight {
        let resp = req.await.unwrap().unwrap();
        assert_eq!(
            (resp.status, resp.text().as_str()),
            (StatusCode::OK, "done")
        );
    }
    tokio::time::timeout(Duration::from_secs(10), srv.done)
        .await
        .expect("drained after the work finished")
        .unwrap()
        .unwrap();
    assert_eq!(stats.snapshot().served, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn grace_bounds_the_drain() {
    let handler = |_req: Request<Bytes>| {
        std::thread::sleep(Duration::from_secs(5));
        Response::new(Bytes::new())
    };
    let builder = Server::builder()
        .threads(1)
        .grace(Duration::from_millis(200));
    let srv = start(builder, handler).await;
    let u = url(srv.addr, "/slow");
    let _slow = tokio::spawn(async move { usher_e2e::get(&u).await });
    let stats = srv.stats.clone();
    assert!(
        wait_until_async(Duration::from_secs(10), || {
            let busy = stats.snapshot().busy;
            async move { busy == 1 }
        })
        .await
    );
    let started = std::time::Instant::now();
    srv.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "drain took {:?} despite a 200 ms grace",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_closes_idle_keep_alive_connections() {
    let srv = start(Server::builder(), thread_name).await;
    let mut conn = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let (mut rd, mut wr) = conn.split();
    wr.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0; 4096];
    let n = rd.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );

    // The connection is now idle in keep-alive; the drain must not wait for the
    // 30 s header timeout to close it.
    let started = std::time::Instant::now();
    srv.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let eof = tokio::time::timeout(Duration::from_secs(5), rd.read(&mut buf))
        .await
        .expect("connection closed by the server");
    assert_eq!(eof.unwrap(), 0);
}
