//! rhinobus-sagas: long-running processes on rhinobus, with their state in rhinobus-dht.
//!
//! A saga reads as a list of the messages it handles, one `impl` block per message, as in
//! Rhino Service Bus (`InitiatedBy<T>`, `Orchestrates<T>`). Its state is loaded from the DHT
//! before each message and saved after it, by one of two persisters that differ in how they
//! handle concurrent handlings of one instance: the optimistic one re-runs the loser on fresh
//! state, the merging one keeps both writes and merges them on the next load.
//!
//! # Layout
//! - [`saga`]: the traits a saga implements — [`Saga`], [`InitiatedBy`], [`Orchestrates`],
//!   and for merging, [`OrchestratesMerge`] and [`SagaStateMerger`].
//! - [`routes`]: [`Routes`], the declared list of handled message types.
//! - [`context`]: [`SagaContext`], a handler's view: state, send, publish, reply, timeouts,
//!   complete.
//! - [`persister`]: [`Persister`] (optimistic or merging) and [`MissingSaga`].
//! - `runtime`: handling one message — load, merge, skip redeliveries, run, save — and
//!   [`SagaEndpointExt`], which registers a saga on an endpoint.
//! - `document`: what is stored per instance: the state and the recently handled messages,
//!   each with what it sent.
//! - [`store`]: [`SagaStore`] over the DHT [`rhinobus_dht::Client`], embedded
//!   [`rhinobus_dht::Storage`], or [`MemoryStore`].
//! - [`harness`]: [`SagaHarness`], for testing a saga in memory.
//! - [`error`]: [`SagaError`], what handling a saga message can fail with.
//!
//! # Redelivery
//! A message whose handling saved the state but whose delivery was not acknowledged (the
//! process died in between) comes back. Its id is found among the handled ids kept with the
//! state, so it is not applied again, and what its first handling sent is sent again from the
//! copy kept with the state, envelopes included: the crash may have come before those sends
//! left, and the copies keep their message ids, so receivers can tell a duplicate. Sending them
//! again rather than re-running the handler keeps handlers free to be non-deterministic.
//!
//! # Example
//! ```
//! use rhinobus::{Endpoint, HandlerError, Message, transport::InMemory};
//! use rhinobus_sagas::{InitiatedBy, Orchestrates, Persister, Routes, Saga, SagaContext};
//! use rhinobus_sagas::{MemoryStore, SagaEndpointExt};
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize)]
//! struct OrderPlaced { order: u64, total: u64 }
//! impl Message for OrderPlaced { const NAME: &'static str = "shop.order-placed"; }
//!
//! #[derive(Serialize, Deserialize)]
//! struct PaymentReceived { order: u64, amount: u64 }
//! impl Message for PaymentReceived { const NAME: &'static str = "shop.payment-received"; }
//!
//! #[derive(Serialize, Deserialize)]
//! struct PaymentOverdue { order: u64 }
//! impl Message for PaymentOverdue { const NAME: &'static str = "shop.payment-overdue"; }
//!
//! #[derive(Serialize, Deserialize)]
//! struct ShipOrder { order: u64 }
//! impl Message for ShipOrder { const NAME: &'static str = "shop.ship-order"; }
//!
//! #[derive(Clone, Default, Serialize, Deserialize)]
//! struct Order { due: u64 }
//!
//! struct Checkout;
//!
//! impl Saga for Checkout {
//!     const NAME: &'static str = "shop.checkout";
//!     type State = Order;
//!     type Key = u64;
//!     fn routes(r: &mut Routes<Self>) {
//!         r.initiated_by::<OrderPlaced>()
//!             .orchestrates::<PaymentReceived>()
//!             .orchestrates::<PaymentOverdue>();
//!     }
//! }
//!
//! #[async_trait::async_trait]
//! impl InitiatedBy<OrderPlaced> for Checkout {
//!     fn correlate(m: &OrderPlaced) -> u64 { m.order }
//!     async fn handle(&self, m: OrderPlaced, saga: &mut SagaContext<Self>) -> Result<(), HandlerError> {
//!         saga.state.due = m.total;
//!         // A timeout: comes back in a day, dropped if the order was paid by then.
//!         saga.request_timeout(&PaymentOverdue { order: m.order }, Duration::from_secs(86_400))?;
//!         Ok(())
//!     }
//! }
//!
//! #[async_trait::async_trait]
//! impl Orchestrates<PaymentOverdue> for Checkout {
//!     fn correlate(m: &PaymentOverdue) -> u64 { m.order }
//!     async fn handle(&self, _: PaymentOverdue, saga: &mut SagaContext<Self>) -> Result<(), HandlerError> {
//!         saga.complete(); // an unpaid order is given up
//!         Ok(())
//!     }
//! }
//!
//! #[async_trait::async_trait]
//! impl Orchestrates<PaymentReceived> for Checkout {
//!     fn correlate(m: &PaymentReceived) -> u64 { m.order }
//!     async fn handle(&self, m: PaymentReceived, saga: &mut SagaContext<Self>) -> Result<(), HandlerError> {
//!         saga.state.due = saga.state.due.saturating_sub(m.amount);
//!         if saga.state.due == 0 {
//!             saga.send("shipping", &ShipOrder { order: m.order })?;
//!             saga.complete();
//!         }
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), rhinobus::BusError> {
//! let broker = InMemory::new();
//! broker.declare_queue("shipping");
//! let shop = Endpoint::builder("shop", broker.clone())
//!     .saga(Checkout, Persister::optimistic(MemoryStore::new()))
//!     .start()
//!     .await?;
//! shop.bus().send("shop", &OrderPlaced { order: 7, total: 30 }).await?;
//! shop.bus().send("shop", &PaymentReceived { order: 7, amount: 30 }).await?;
//! # while broker.queue_len("shipping") == 0 { tokio::task::yield_now().await; }
//! shop.shutdown().await;
//! assert_eq!(broker.queue_len("shipping"), 1);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod context;
mod document;
pub mod error;
pub mod harness;
pub mod persister;
pub mod routes;
mod runtime;
pub mod saga;
pub mod store;

pub use context::SagaContext;
pub use error::SagaError;
pub use harness::{SagaHarness, Sent};
pub use persister::{DEFAULT_REMEMBER, MissingSaga, Persister};
pub use routes::Routes;
pub use runtime::{SagaEndpointExt, saga_key, saga_states};
pub use saga::{
    InitiatedBy, MergeSagaState, Orchestrates, OrchestratesMerge, Saga, SagaStateMerger,
};
pub use store::{MemoryStore, SagaStore, SaveRequest, StoreError};

#[cfg(test)]
mod tests;
