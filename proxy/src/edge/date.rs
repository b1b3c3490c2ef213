//! The `Date` header of HTTP/1 responses Usher writes itself, formatted once
//! a second per thread.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

thread_local! {
    static NOW: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Calls `f` with the current time as an IMF-fixdate
/// (`Tue, 01 Dec 2026 17:06:17 GMT`).
pub fn with<R>(f: impl FnOnce(&[u8]) -> R) -> R {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    NOW.with(|cell| {
        let mut c = cell.borrow_mut();
        if c.0 != secs {
            *c = (secs, httpdate::fmt_http_date(now));
        }
        f(c.1.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn is_an_imf_fixdate() {
        let d = super::with(|d| String::from_utf8(d.to_vec()).unwrap());
        assert_eq!(d.len(), 29, "{d}");
        assert!(d.ends_with(" GMT"), "{d}");
        assert!(httpdate::parse_http_date(&d).is_ok(), "{d}");
    }
}
