//! HTTP/2 abuse against the real `usher` binary, from a raw h2 client (the
//! h2 crate): a rapid-reset loop (CVE-2023-44487) gets GOAWAY
//! `ENHANCE_YOUR_CALM`; an oversized header list is refused on its stream
//! (431 or REFUSED_STREAM) and a far larger one gets GOAWAY. After each,
//! Usher keeps serving other clients, over HTTP/1.1 and h2.

use std::time::Duration;

use http::{Request, StatusCode};
use usher_e2e::edge::{self, spawn_backend, Upgrades};
use usher_e2e::usher::Usher;
use usher_e2e::Client;

const LISTENER: &str = "  - name: public\n    address: \"LISTEN\"\n    http2: { max_header_list_size: 8KiB, max_pending_accept_reset_streams: 20 }\n";

async fn h2_client(
    u: &Usher,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(u.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    (send, tokio::spawn(conn))
}

fn get(path: &str) -> Request<()> {
    Request::get(format!("http://app.test{path}"))
        .body(())
        .unwrap()
}

/// Usher still answers a new HTTP/1.1 client and a new h2 client.
async fn others_are_served(u: &Usher) {
    let r = Client::new().get(&u.url("/other")).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let (send, _conn) = h2_client(u).await;
    let mut send = send.ready().await.unwrap();
    let (resp, _) = send.send_request(get("/other-h2"), true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

// A current-thread runtime: the h2 connection task only runs when the test
// yields, so the streams opened and reset in the loop leave in one burst,
// as an attacker would send them.
#[tokio::test]
async fn rapid_reset_gets_goaway_and_others_are_served() {
    let backend = spawn_backend(Upgrades::Echo);
    let u = Usher::start_ready(&edge::config(LISTENER, backend.addr, ""));
    let (send, mut conn) = h2_client(&u).await;
    let mut send = send.ready().await.unwrap();
    // One ordinary exchange first, so that SETTINGS (and their ACKs) are
    // done: nothing but the burst is then in flight from the client when
    // Usher answers it.
    let (resp, _) = send.send_request(get("/warmup"), true).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::OK);
    let mut send = send.ready().await.unwrap();
    let mut opened = 0;
    let mut ended = None;
    // Bursts of 100 HEADERS + RST_STREAM pairs (a few KB: the whole burst
    // is read before Usher answers, so its GOAWAY is not lost to a reset
    // socket), at most 10 of them.
    'bursts: for _ in 0..10 {
        for _ in 0..100 {
            match send.send_request(get(&format!("/reset/{opened}")), true) {
                // Dropping both halves of the stream sends RST_STREAM(CANCEL).
                Ok((resp, stream)) => {
                    drop((resp, stream));
                    opened += 1;
                }
                Err(_) => break 'bursts,
            }
        }
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(500), &mut conn).await {
            ended = Some(r.unwrap());
            break;
        }
    }
    let ended = match ended {
        Some(r) => r,
        None => tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the connection was not closed")
            .unwrap(),
    };
    let err = ended.expect_err("the connection must end in an error");
    assert!(err.is_go_away(), "expected GOAWAY, got {err:?}");
    assert!(err.is_remote(), "the GOAWAY must come from Usher: {err:?}");
    assert_eq!(err.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{err:?}");
    assert!(opened > 20, "opened {opened}");
    // Far fewer requests than streams reached the backend.
    let forwarded = backend
        .paths()
        .iter()
        .filter(|p| p.starts_with("/reset/"))
        .count();
    assert!(
        forwarded < opened,
        "{forwarded} of {opened} reset streams were forwarded"
    );
    others_are_served(&u).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_lists_are_refused_and_others_are_served() {
    let backend = spawn_backend(Upgrades::Echo);
    // A 4KiB limit keeps every abusive header list inside one HEADERS frame,
    // so Usher reads all of it before it answers and nothing is lost to a
    // reset socket.
    let listener = LISTENER.replace("8KiB", "4KiB");
    let u = Usher::start_ready(&edge::config(&listener, backend.addr, ""));

    // Over the limit: this stream is refused, the connection lives on.
    let (send, conn) = h2_client(&u).await;
    let mut send = send.ready().await.unwrap();
    let big: String = (0..6_000).map(|_| fastrand::alphanumeric()).collect();
    let mut req = get("/big");
    req.headers_mut().insert("x-big", big.parse().unwrap());
    let (resp, _) = send.send_request(req, true).unwrap();
    // h2 answers 431 when it can, else resets the stream with REFUSED_STREAM.
    match tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .unwrap()
    {
        Ok(r) => assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(e) => assert_eq!(e.reason(), Some(h2::Reason::REFUSED_STREAM), "{e:?}"),
    }
    assert!(!backend.paths().iter().any(|p| p == "/big"));
    let mut send = send.ready().await.unwrap();
    let (resp, _) = send.send_request(get("/after-big"), true).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::OK);
    drop(send);
    let _ = conn.await;

    // Far over the limit: the connection goes.
    let (send, conn) = h2_client(&u).await;
    let mut send = send.ready().await.unwrap();
    // SETTINGS done first (see the rapid-reset test).
    let (resp, _) = send.send_request(get("/warmup"), true).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::OK);
    let mut send = send.ready().await.unwrap();
    // Over 4× the limit (h2's abuse threshold), ~15KB encoded.
    let huge: String = (0..18_000).map(|_| fastrand::alphanumeric()).collect();
    let mut req = get("/huge");
    req.headers_mut().insert("x-huge", huge.parse().unwrap());
    let (resp, _) = send.send_request(req, true).unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .unwrap()
        .expect_err("a huge header list must not be answered");
    assert!(e.is_go_away() && e.is_remote(), "{e:?}");
    assert!(
        matches!(
            e.reason(),
            Some(h2::Reason::ENHANCE_YOUR_CALM | h2::Reason::COMPRESSION_ERROR)
        ),
        "{e:?}"
    );
    // Usher closed the connection after its GOAWAY; the client, still
    // writing CONTINUATION frames, may see that as a broken pipe.
    let conn_end = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .unwrap()
        .unwrap();
    assert!(conn_end.is_err(), "the connection must end in an error");
    assert!(!backend.paths().iter().any(|p| p == "/huge"));
    others_are_served(&u).await;
}
