//! Bench scenarios, one module per system under test.
