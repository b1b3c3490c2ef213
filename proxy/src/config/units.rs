//! Durations and sizes in the config: `Dur` (`250ms`, `5s`) and `Size`
//! (`64KiB`, `10MiB`). Their text is read by `usher_worker::units`, so the
//! config and the worker's command line take the same spellings; the config
//! adds only a range (a duration of at most a year).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

pub use usher_worker::units::parse_size;

/// A duration written with a unit: `250ms`, `5s`, `2m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
}

/// The longest duration a config may give: a year. Longer is a typo, not a
/// timeout anyone means.
const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// Parses a duration as the worker's command line does (`250ms`, `1.5s`,
/// `2m`; see [`usher_worker::units`]), up to a year. A bare number is
/// refused: the unit is what makes a config readable.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = usher_worker::units::parse_duration(s)?;
    if d > MAX_DURATION {
        return Err(format!("duration `{}` is out of range", s.trim()));
    }
    Ok(d)
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration with a unit, like 250ms, 5s or 2m")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "duration `{v}` needs a unit (ms, s, m or h), e.g. `{v}s`"
                )))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                Err(E::custom(format!("duration `{v}` needs a unit, e.g. `5s`")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Dur, E> {
                Err(E::custom(format!("duration `{v}` needs a unit, e.g. `5s`")))
            }
        }
        d.deserialize_any(V)
    }
}

/// A size in bytes, written `10MiB`, `64KiB` or as a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size like 64KiB or 10MiB")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
        }
        d.deserialize_any(V)
    }
}
