//! Siphon benchmarks live in `benches/`; this crate holds what they share.

pub mod control_fixture;
