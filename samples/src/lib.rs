//! Runnable rhinobus samples and the `bench` load generator.
//!
//! # Layout
//! - [`billing`]: the phone-billing saga (merging persister) of the `billing` sample.
//! - [`cpu`]: the CPU a bench run used, in this process and in the local broker.
//! - [`node`]: a DHT node served in-process on a temporary directory.
//! - [`race`]: a store wrapper that makes handlings race on one version, for the samples.
//! - [`sample`]: the broker choice and waiting helper the samples share.
//! - [`restaurant`]: the order saga (optimistic persister) of the `restaurant` sample.
//! - [`report`]: the JSON line every bench scenario prints.
//! - [`scenarios`]: one module per group of bench scenarios.
//! - [`tally`]: the tally saga the saga tests, the crash-test worker and the saga bench use.

pub mod billing;
pub mod cpu;
pub mod node;
pub mod race;
pub mod report;
pub mod restaurant;
pub mod sample;
pub mod scenarios;
pub mod tally;
