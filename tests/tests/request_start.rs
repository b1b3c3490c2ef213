//! `X-Request-Start` and `X-Usher-Queue-Ms`, as a real recording backend
//! receives them: what an APM agent or an autoscaler in the app reads to see
//! the time a request spent queued in Usher.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use usher_e2e::raw::{RawClient, RecordingBackend};
use usher_e2e::usher::{Config, Usher};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn get(usher: &Usher, extra: &str) -> u16 {
    let mut c = RawClient::connect(usher.addr);
    c.send(
        format!("GET /x HTTP/1.1\r\nHost: app.test\r\n{extra}Connection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    c.expect_response("GET /x").status
}

#[test]
fn every_forwarded_request_carries_when_usher_read_it_in_ms() {
    let backend = RecordingBackend::echo("app");
    let usher = Usher::start_ready(&Config::app(&[backend.addr], ", max_in_flight: 1", "").yaml());
    let before = now_ms();
    // A client's own value is replaced, never passed on.
    assert_eq!(
        get(
            &usher,
            "X-Request-Start: t=1\r\nX-Usher-Queue-Ms: 99999\r\n"
        ),
        200
    );
    let after = now_ms();
    let seen = backend.requests();
    let r = seen.last().expect("the backend saw the request");
    assert_eq!(r.header_count("x-request-start"), 1, "{:?}", r.headers);
    let v = r.header("x-request-start").unwrap();
    assert_eq!(
        v.len(),
        13,
        "integer milliseconds since the epoch (Heroku's form): {v}"
    );
    let ms: u64 = v.parse().expect("digits only");
    assert!(before <= ms && ms <= after, "{before} <= {ms} <= {after}");
    let queued: u64 = r.header("x-usher-queue-ms").unwrap().parse().unwrap();
    assert!(queued < 1000, "an idle Usher queues nothing: {queued}");
}

#[test]
fn queue_ms_is_the_wait_in_usher_and_the_header_can_be_turned_off() {
    // One slot and a slow first answer: the second request waits in Usher's
    // queue, and says how long.
    let backend = RecordingBackend::start("app", |r| {
        if r.target == "/slow" {
            std::thread::sleep(Duration::from_millis(400));
        }
        usher_e2e::raw::Reply::ok("ok")
    });
    let usher = Usher::start_ready(&Config::app(&[backend.addr], ", max_in_flight: 1", "").yaml());
    let addr = usher.addr;
    let slow = std::thread::spawn(move || {
        let mut c = RawClient::connect(addr);
        c.send(b"GET /slow HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
            .unwrap();
        c.expect_response("GET /slow").status
    });
    assert!(usher_e2e::wait_until(Duration::from_secs(5), || backend
        .requests()
        .iter()
        .any(|r| r.target == "/slow")));
    assert_eq!(get(&usher, ""), 200);
    assert_eq!(slow.join().unwrap(), 200);
    let seen = backend.requests();
    let queued = seen.iter().find(|r| r.target == "/x").unwrap();
    let ms: u64 = queued.header("x-usher-queue-ms").unwrap().parse().unwrap();
    assert!(ms >= 200, "it waited behind /slow: {ms} ms");

    let plain = RecordingBackend::echo("plain");
    let off = Usher::start_ready(
        &Config::app(&[plain.addr], "", "    request_start_header: false\n").yaml(),
    );
    assert_eq!(get(&off, "X-Request-Start: t=1\r\n"), 200);
    let r = plain.requests();
    let r = r.last().unwrap();
    assert_eq!(r.header("x-usher-queue-ms"), None);
    assert_eq!(
        r.header("x-request-start"),
        Some("t=1"),
        "left as the client sent it"
    );
}
