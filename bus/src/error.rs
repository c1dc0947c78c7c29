//! Errors: what a handler returns, and what sending and running an endpoint can fail with.

use std::any::TypeId;
use std::error::Error as StdError;
use std::fmt;

/// A boxed error as handlers produce it.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// How the bus treats a handler error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A real failure: counts toward the immediate and delayed retries, then the error queue.
    Failure,
    /// A conflict (for example an optimistic concurrency conflict on saga state): the handler
    /// runs again at once on fresh state, with jitter, on a budget of its own that does not
    /// count toward the failure retries.
    Conflict,
    /// A failure no retry can mend (a message that fails validation, an order for a product
    /// that does not exist): straight to the error queue, no retries. An endpoint can also
    /// take every error of a given Rust type as one
    /// ([`EndpointBuilder::unrecoverable`](crate::EndpointBuilder::unrecoverable)).
    Unrecoverable,
}

/// The error a handler returns.
///
/// Any `std::error::Error` converts into it with `?`, as a [`ErrorKind::Failure`]; the Rust
/// type of the original error is kept for the failure headers. Mark an error as a conflict
/// with [`HandlerError::conflict`], as one that retries cannot mend with
/// [`HandlerError::unrecoverable`].
///
/// ```
/// use rhinobus::HandlerError;
///
/// fn parse(s: &str) -> Result<u32, HandlerError> {
///     Ok(s.parse::<u32>()?)
/// }
/// let err = parse("x").unwrap_err();
/// assert_eq!(err.error_type(), "core::num::error::ParseIntError");
/// ```
pub struct HandlerError {
    kind: ErrorKind,
    error_type: &'static str,
    /// The original error's type, for [`EndpointBuilder::unrecoverable`](crate::EndpointBuilder::unrecoverable);
    /// none for [`HandlerError::msg`].
    type_id: Option<TypeId>,
    error: BoxError,
}

impl HandlerError {
    /// A failure with a plain message.
    pub fn msg(message: impl fmt::Display) -> Self {
        Self {
            kind: ErrorKind::Failure,
            error_type: "rhinobus::HandlerError",
            type_id: None,
            error: message.to_string().into(),
        }
    }

    /// A conflict: the handler is re-run at once on fresh state (see [`ErrorKind::Conflict`]).
    pub fn conflict<E: Into<BoxError> + 'static>(error: E) -> Self {
        Self {
            kind: ErrorKind::Conflict,
            ..Self::from_error(error)
        }
    }

    /// A failure no retry can mend: the message goes to the error queue at once (see
    /// [`ErrorKind::Unrecoverable`]).
    ///
    /// ```
    /// use rhinobus::{ErrorKind, HandlerError};
    ///
    /// fn check(quantity: u32) -> Result<(), HandlerError> {
    ///     if quantity == 0 {
    ///         return Err(HandlerError::unrecoverable("an order line of 0 items"));
    ///     }
    ///     Ok(())
    /// }
    /// assert_eq!(check(0).unwrap_err().kind(), ErrorKind::Unrecoverable);
    /// ```
    pub fn unrecoverable<E: Into<BoxError> + 'static>(error: E) -> Self {
        Self {
            kind: ErrorKind::Unrecoverable,
            ..Self::from_error(error)
        }
    }

    fn from_error<E: Into<BoxError> + 'static>(error: E) -> Self {
        Self {
            kind: ErrorKind::Failure,
            error_type: std::any::type_name::<E>(),
            type_id: Some(TypeId::of::<E>()),
            error: error.into(),
        }
    }

    /// Whether this is a failure, a conflict, or a failure no retry can mend.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The Rust type of the original error.
    pub fn error_type(&self) -> &'static str {
        self.error_type
    }

    /// The original error's type id, if it had a type.
    pub(crate) fn type_id(&self) -> Option<TypeId> {
        self.type_id
    }

    /// The original error.
    pub fn error(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.error
    }

    /// The messages of the error's causes, outermost first, the error itself excluded.
    pub fn causes(&self) -> Vec<String> {
        let mut causes = Vec::new();
        let mut next = self.error.source();
        while let Some(cause) = next {
            causes.push(cause.to_string());
            next = cause.source();
        }
        causes
    }
}

impl<E: StdError + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self::from_error(error)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("error_type", &self.error_type)
            .field("error", &self.error)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

/// What sending, publishing, or running an endpoint can fail with.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The broker could not be reached or the connection broke.
    #[error("transport: {0}")]
    Transport(String),
    /// The broker refused the message (negative confirm).
    #[error("the broker refused a message for {destination}")]
    Refused {
        /// Queue or routing key the message was for.
        destination: String,
    },
    /// A message sent to a queue could not be routed: the queue does not exist.
    #[error("no queue named {queue:?}: the message could not be routed")]
    Unroutable {
        /// The queue the message was sent to.
        queue: String,
    },
    /// The broker did not confirm in time.
    #[error("timed out after {0:?} waiting for the broker")]
    Timeout(std::time::Duration),
    /// The message could not be encoded.
    #[error(transparent)]
    Codec(#[from] crate::message::CodecError),
    /// `reply` was called for a message that has no reply address.
    #[error(
        "the message being handled has no {} header to reply to",
        crate::headers::names::REPLY_TO
    )]
    NoReplyAddress,
    /// A name or value the transport cannot carry (e.g. longer than AMQP allows).
    #[error("invalid: {0}")]
    Invalid(String),
    /// The endpoint was configured in a way that cannot work.
    #[error("configuration: {0}")]
    Config(String),
    /// The endpoint has been shut down.
    #[error("the endpoint has been shut down")]
    ShutDown,
}

impl From<lapin::Error> for BusError {
    fn from(e: lapin::Error) -> Self {
        BusError::Transport(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn keeps_the_type_and_the_chain_of_causes() {
        let err: HandlerError = Outer(std::io::Error::other("disk on fire")).into();
        assert_eq!(err.kind(), ErrorKind::Failure);
        assert!(err.error_type().ends_with("Outer"), "{}", err.error_type());
        assert_eq!(err.to_string(), "outer");
        assert_eq!(err.causes(), vec!["disk on fire".to_string()]);
    }

    #[test]
    fn conflicts_and_unrecoverable_failures_are_marked() {
        let err = HandlerError::conflict("version moved on");
        assert_eq!(err.kind(), ErrorKind::Conflict);
        let err = HandlerError::unrecoverable(Outer(std::io::Error::other("no such product")));
        assert_eq!(err.kind(), ErrorKind::Unrecoverable);
        assert!(err.error_type().ends_with("Outer"), "{}", err.error_type());
        assert_eq!(err.causes(), vec!["no such product".to_string()]);
    }
}
