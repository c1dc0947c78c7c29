//! Runnable rhinobus samples and the `bench` load generator.
//!
//! # Layout
//! - [`report`]: the JSON line every bench scenario prints.
//! - [`scenarios`]: one module per group of bench scenarios.

pub mod report;
pub mod scenarios;
