//! rhinobus: a service bus for Rust in the spirit of Rhino Service Bus.
//!
//! Endpoints exchange typed messages through RabbitMQ (or an in-memory broker for tests and
//! embedded use). A message is acknowledged only after its handlers succeeded and everything
//! they sent was confirmed by the broker; a message that keeps failing lands in an error
//! queue with the reason, from where the `rhinobus` CLI (or [`ops`]) replays it. An endpoint
//! can also copy every message it handled into an audit queue
//! ([`EndpointBuilder::audit_queue`]).
//!
//! # Layout
//! - [`message`]: the [`Message`] trait (stable wire names) and the MessagePack codec.
//! - [`headers`]: envelope header names and time formatting.
//! - [`bus`]: [`Bus`], sending and publishing, and the envelope every message gets.
//! - [`context`]: [`Context`], a handler's view of the message and its staged sends.
//! - [`handler`]: the [`Handler`] trait and per-type dispatch.
//! - [`behavior`]: [`behavior::Behavior`], code around every attempt at handling a message.
//! - [`endpoint`]: [`Endpoint`] and its builder: topology, receive loop, graceful shutdown.
//! - `pipeline`: one message's way through behaviors, handlers, retries and settlement (and
//!   the audit copy), or straight out when it comes past its time to be received.
//! - [`recoverability`]: immediate and delayed retries, conflicts, the error queue.
//! - [`request`]: [`Requester`], a request sent and its reply awaited.
//! - [`transport`]: the [`transport::Transport`] trait, [`transport::RabbitMq`] and
//!   [`transport::InMemory`].
//! - [`ops`]: error-queue operations (list, group, show, replay, archive, purge) behind the
//!   `rhinobus` CLI.
//! - `trace`: W3C trace context carried in headers.
//!
//! # Example
//!
//! ```
//! use rhinobus::{Context, Endpoint, HandlerError, Message, transport::InMemory};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct OrderPlaced { order: u64 }
//! impl Message for OrderPlaced { const NAME: &'static str = "shop.order-placed"; }
//!
//! #[derive(Serialize, Deserialize)]
//! struct ShipOrder { order: u64 }
//! impl Message for ShipOrder { const NAME: &'static str = "shop.ship-order"; }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), rhinobus::BusError> {
//! let broker = InMemory::new();
//! broker.declare_queue("shipping");
//! let sales = Endpoint::builder("sales", broker.clone())
//!     .subscribe::<OrderPlaced>()
//!     .handle(|placed: OrderPlaced, ctx: Context| async move {
//!         ctx.send("shipping", &ShipOrder { order: placed.order })?;
//!         Ok::<_, HandlerError>(())
//!     })
//!     .start()
//!     .await?;
//! sales.bus().publish(&OrderPlaced { order: 7 }).await?;
//! # while broker.queue_len("shipping") == 0 { tokio::task::yield_now().await; }
//! sales.shutdown().await;
//! assert_eq!(broker.queue_len("shipping"), 1);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod behavior;
pub mod bus;
pub mod context;
pub mod endpoint;
pub mod error;
pub mod handler;
pub mod headers;
pub mod message;
pub mod ops;
mod pipeline;
pub mod recoverability;
pub mod request;
mod trace;
pub mod transport;

pub use bus::{Bus, MAX_DELAY, MAX_TIME_TO_BE_RECEIVED, SendOptions};
pub use context::Context;
pub use endpoint::{Endpoint, EndpointBuilder, ShutdownHandle};
pub use error::{BusError, ErrorKind, HandlerError};
pub use handler::Handler;
pub use headers::Headers;
pub use message::Message;
pub use recoverability::{DelayedRetries, Recoverability};
pub use request::Requester;
