//! Bench scenarios, one module per system under test.

pub mod amqp;
pub mod dht;
pub mod dht_cluster;
pub mod errors;
pub mod redis;
pub mod request;
pub mod sagas;
