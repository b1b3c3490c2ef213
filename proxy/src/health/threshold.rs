//! The active check's verdict, as a pure counter (tested without sockets).

/// Consecutive-result thresholds: `rise` successes bring a backend up, `fall`
/// failures take it down. Results that agree with the current state reset the
/// opposite run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Threshold {
    rise: u32,
    fall: u32,
    run: u32,
    up: bool,
}

impl Threshold {
    pub fn new(rise: u32, fall: u32, up: bool) -> Self {
        Threshold {
            rise: rise.max(1),
            fall: fall.max(1),
            run: 0,
            up,
        }
    }

    #[cfg(test)]
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records one result; returns the new state if it changed.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.run = 0;
            return None;
        }
        self.run += 1;
        let needed = if ok { self.rise } else { self.fall };
        if self.run >= needed {
            self.up = ok;
            self.run = 0;
            Some(ok)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall_need_consecutive_results() {
        let mut t = Threshold::new(2, 3, true);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None); // resets the failure run
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false));
        assert!(!t.is_up());
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true));
        assert!(t.is_up());
    }
}
