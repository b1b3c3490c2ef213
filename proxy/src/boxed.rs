//! Boxing a future where it will live.
//!
//! `Box::pin(fut)` builds `fut` on the stack and then copies all of it into
//! the new allocation: the whole size of its largest state, though a future
//! that has not started holds only its arguments. The request path boxes a
//! few futures of 1–3 KiB per request (`edge::h1`, `upstream::detach`), and
//! those copies were about 1.5% of its instructions. [`pin_with`] allocates
//! first and then builds the future, so that the optimiser can build it in
//! the allocation and write only the arguments. That is not a guarantee of
//! the language (a debug build still copies): `bench/instructions.sh` is
//! what shows it holds (−384 instructions per request for the edge's box).

use std::pin::Pin;

/// `Box::pin(make())`, with `make`'s result written straight into the box.
#[inline(always)]
pub(crate) fn pin_with<T>(make: impl FnOnce() -> T) -> Pin<Box<T>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}
