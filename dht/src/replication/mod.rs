//! Replication over the bus: every write a node accepts reaches the range's other replicas as
//! rhinobus messages on their durable queues.
//!
//! - [`message`]: what travels — [`Replicate`] (a batch of changes) and [`CatchUpMarker`].
//! - [`outbox`]: [`ReplicationOutbox`] — outbox records committed with the writes, and one
//!   sender per destination that ships them in batches and deletes them once confirmed.
//! - [`apply`](mod@apply): applying received changes; idempotent and independent of order.
//! - [`runtime`]: [`Replication`] — catch-up at start-up, the receiving endpoint, the senders.

pub mod apply;
pub mod message;
pub mod outbox;
pub mod runtime;

pub use apply::{apply, apply_message};
pub use message::{CatchUpMarker, Replicate};
pub use outbox::{ReplicationOutbox, Staged};
pub use runtime::{Replication, ReplicationError, ReplicationOptions, TransportFactory};
