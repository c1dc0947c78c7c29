//! Errors of saga handling.

use rhinobus::{BusError, HandlerError};

/// What can go wrong around a saga's handler: loading, saving, and finding the instance.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    /// The message has no `rhinobus-message-id` header (sent by a client other than
    /// rhinobus): sagas recognise redeliveries by id, so they cannot take it safely.
    #[error(
        "message {message_type} for {saga} saga {key:?} has no message id; sagas need one to recognise redeliveries"
    )]
    MissingMessageId {
        /// Saga type.
        saga: &'static str,
        /// Correlation key.
        key: String,
        /// Wire name of the message.
        message_type: &'static str,
    },
    /// No instance exists for the key, and the message does not initiate the saga.
    #[error(
        "no {saga} saga with key {key:?} for message {message_type} ({message_id}): it was never started (the message is not one that initiates it)"
    )]
    NotFound {
        /// Saga type.
        saga: &'static str,
        /// Correlation key.
        key: String,
        /// Wire name of the message.
        message_type: &'static str,
        /// Id of the message.
        message_id: String,
    },
    /// The instance for the key has completed; messages for it are no longer handled.
    #[error(
        "the {saga} saga with key {key:?} has completed; message {message_type} ({message_id}) came too late"
    )]
    Completed {
        /// Saga type.
        saga: &'static str,
        /// Correlation key.
        key: String,
        /// Wire name of the message.
        message_type: &'static str,
        /// Id of the message.
        message_id: String,
    },
    /// An optimistic save found that another handling saved first.
    #[error("saga state changed while the message was handled: {0}")]
    Conflict(String),
    /// The optimistic persister found several versions of one instance (written by a merging
    /// persister?) and cannot choose between them.
    #[error(
        "saga key {key:?} has {siblings} concurrent versions; the optimistic persister cannot merge them (use the merging persister for this saga)"
    )]
    Siblings {
        /// The DHT key.
        key: String,
        /// How many versions it has.
        siblings: usize,
    },
    /// The stored state could not be decoded.
    #[error("stored saga state is corrupt: {0}")]
    Corrupt(String),
    /// The state could not be encoded.
    #[error("cannot encode saga state: {0}")]
    Encode(String),
    /// The store failed (the DHT could not be reached, ...).
    #[error("saga store: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Staging an outgoing message failed.
    #[error(transparent)]
    Bus(#[from] BusError),
}

impl SagaError {
    /// The handler error the bus acts on:
    /// - a conflict for [`SagaError::Conflict`]: the bus re-runs the handler at once, on
    ///   freshly loaded state;
    /// - [unrecoverable](rhinobus::ErrorKind::Unrecoverable) where running it again cannot end
    ///   otherwise: a message without an id, a saga that has completed, state that does not
    ///   encode. The message goes to the error queue at once. (Replaying a message for a
    ///   completed saga once its completion marker is gone, after `completed_retention`, has
    ///   it handled as if the saga had never been: started again by an initiating message.);
    /// - a failure, retried, otherwise: the store or the broker failing; a saga not found,
    ///   which may just not have been started yet by a message still on its way; state that
    ///   does not decode, which an upgraded instance may read (a rolling deploy); siblings the
    ///   optimistic persister cannot merge, which a merging instance may merge meanwhile.
    pub fn into_handler_error(self) -> HandlerError {
        match self {
            SagaError::Conflict(_) => HandlerError::conflict(self),
            SagaError::MissingMessageId { .. }
            | SagaError::Completed { .. }
            | SagaError::Encode(_) => HandlerError::unrecoverable(self),
            SagaError::NotFound { .. }
            | SagaError::Corrupt(_)
            | SagaError::Siblings { .. }
            | SagaError::Store(_)
            | SagaError::Bus(_) => HandlerError::from(self),
        }
    }
}
