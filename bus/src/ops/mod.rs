//! Error-queue operations: list, group, show, replay, archive and purge failed messages.
//! The `rhinobus errors` CLI is a thin shell over this module, so everything it does can be
//! done from code too.
//!
//! ```no_run
//! use rhinobus::ops::{Action, ErrorQueue, Selection};
//!
//! # async fn replay() -> Result<(), rhinobus::BusError> {
//! let errors = ErrorQueue::connect("amqp://guest:guest@127.0.0.1:5672/%2f", "error").await?;
//! for group in rhinobus::ops::group(&errors.browse().await?) {
//!     println!("{} x{} {:?}", group.id, group.count, group.example_error);
//! }
//! let outcome = errors.apply(&Selection::all(), &Action::Replay { to: None }, false).await?;
//! println!("replayed {}", outcome.moved);
//! # Ok(()) }
//! ```

mod error_queue;
mod failed;
mod selection;

pub use error_queue::{Action, ErrorQueue, MoveFailure, Outcome};
pub use failed::{FailedMessage, FailureGroup, group};
pub use selection::Selection;
