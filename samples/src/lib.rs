//! Runnable rhinobus samples and the `bench` load generator.
//!
//! # Layout
//! - [`report`]: the JSON line every bench scenario prints.
//! - [`scenarios`]: one module per group of bench scenarios.
//! - [`tally`]: the tally saga the saga tests, the crash-test worker and the saga bench use.

pub mod report;
pub mod scenarios;
pub mod tally;
