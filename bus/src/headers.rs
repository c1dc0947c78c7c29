//! Envelope headers: the names rhinobus writes, and the map that carries them.

use std::collections::BTreeMap;
use std::time::SystemTime;

/// Envelope headers. Values are text so that they read the same in the RabbitMQ management
/// UI, in `rhinobus errors show` and in code.
pub type Headers = BTreeMap<String, String>;

/// Header names. Every header rhinobus writes starts with `rhinobus-`, except the W3C trace
/// context headers, which keep their standard names so that other tools understand them.
pub mod names {
    /// Unique id of this message (UUID v7).
    pub const MESSAGE_ID: &str = "rhinobus-message-id";
    /// Wire name of the message type ([`crate::Message::NAME`]).
    pub const MESSAGE_TYPE: &str = "rhinobus-message-type";
    /// Content type of the body.
    pub const CONTENT_TYPE: &str = "rhinobus-content-type";
    /// Id of the message this one answers or was caused by.
    pub const CORRELATION_ID: &str = "rhinobus-correlation-id";
    /// Id shared by every message of one conversation (the first message's id).
    pub const CONVERSATION_ID: &str = "rhinobus-conversation-id";
    /// Queue that replies go to.
    pub const REPLY_TO: &str = "rhinobus-reply-to";
    /// When the message was sent (RFC 3339, UTC).
    pub const SENT_AT: &str = "rhinobus-sent-at";
    /// Endpoint that sent the message.
    pub const SOURCE_ENDPOINT: &str = "rhinobus-source-endpoint";
    /// How many delayed retries this message has been through.
    pub const DELAYED_RETRIES: &str = "rhinobus-delayed-retries";
    /// When a delayed send is to be delivered, no sooner (RFC 3339, UTC); see
    /// [`crate::SendOptions::delay`].
    pub const DELIVER_AT: &str = "rhinobus-deliver-at";
    /// When the message stops being worth handling (RFC 3339, UTC): an endpoint that receives
    /// it later acknowledges it without handling it. Set from
    /// [`crate::Message::TIME_TO_BE_RECEIVED`] or [`crate::SendOptions::time_to_be_received`];
    /// a replay from an error queue removes it.
    pub const DISCARD_AFTER: &str = "rhinobus-discard-after";
    /// The queue a delayed send goes to once its time comes: on RabbitMQ it waits in the delay
    /// queues meanwhile, and this header is how it finds its queue.
    pub const DELIVER_TO: &str = "rhinobus-deliver-to";
    /// Id of the saga instance that sent the message or that a reply goes back to.
    pub const SAGA_ID: &str = "rhinobus-saga-id";
    /// Type of that saga.
    pub const SAGA_TYPE: &str = "rhinobus-saga-type";
    /// On a saga's timeout, the type of the saga that asked for it: a timeout that finds its
    /// instance completed or gone is dropped, not failed.
    pub const SAGA_TIMEOUT: &str = "rhinobus-saga-timeout";

    /// Prefix of the headers an audit copy carries about its handling. A replay to the queue a
    /// message came from drops them (it is to be handled afresh); one `--to` another queue
    /// keeps them.
    pub const PROCESSING_PREFIX: &str = "rhinobus-processing-";
    /// On an audit copy ([`crate::EndpointBuilder::audit_queue`]): the endpoint that handled
    /// the message.
    pub const PROCESSING_ENDPOINT: &str = "rhinobus-processing-endpoint";
    /// On an audit copy: the machine and process that handled the message, as
    /// `<host name> (pid <pid>)`, to tell the instances of a scaled-out endpoint apart.
    pub const PROCESSING_HOST: &str = "rhinobus-processing-host";
    /// On an audit copy: the queue the message was handled from.
    pub const PROCESSING_QUEUE: &str = "rhinobus-processing-queue";
    /// On an audit copy: when the endpoint took the message (RFC 3339, UTC).
    pub const PROCESSING_STARTED: &str = "rhinobus-processing-started";
    /// On an audit copy: when its handlers had all succeeded and everything they sent was
    /// confirmed (RFC 3339, UTC).
    pub const PROCESSING_ENDED: &str = "rhinobus-processing-ended";
    /// On an audit copy: how many times the handlers ran in the delivery that succeeded (its
    /// failed attempts and conflict re-runs included; earlier delayed-retry rounds are counted
    /// in [`DELAYED_RETRIES`], earlier deliveries not at all).
    pub const PROCESSING_ATTEMPTS: &str = "rhinobus-processing-attempts";

    /// On a message an endpoint moved (to its error queue, a delay queue, its audit queue): the
    /// per-message TTL (AMQP `expiration`) it came with, in milliseconds. The copy has none:
    /// RabbitMQ would count it again in the new queue and discard the message there.
    pub const ORIGINAL_EXPIRATION: &str = "rhinobus-original-expiration";
    /// On a message an endpoint moved: the AMQP `user_id` it came with. The copy has none:
    /// RabbitMQ refuses a publish whose `user_id` is not the publishing connection's user.
    pub const ORIGINAL_USER_ID: &str = "rhinobus-original-user-id";

    /// Prefix of the headers a failure adds; a replay moves them aside.
    pub const FAILURE_PREFIX: &str = "rhinobus-failure-";
    /// Queue the message failed in.
    pub const FAILURE_SOURCE_QUEUE: &str = "rhinobus-failure-source-queue";
    /// Endpoint the message failed in.
    pub const FAILURE_ENDPOINT: &str = "rhinobus-failure-endpoint";
    /// When it failed (RFC 3339, UTC).
    pub const FAILURE_TIME: &str = "rhinobus-failure-time";
    /// How many times the handlers ran before it was given up, in its last round of
    /// immediate retries (the delayed rounds before it are counted in [`DELAYED_RETRIES`]).
    pub const FAILURE_ATTEMPTS: &str = "rhinobus-failure-attempts";
    /// Why it failed, in one word: `handler`, `unrecoverable` (a handler error no retry can
    /// mend: not retried), `decode`, `missing-type`, `no-handler`, `audit` (handled, but its
    /// audit copy was refused), or `no-request` (a reply that came after its
    /// [`Requester`](crate::Requester) request gave up).
    pub const FAILURE_REASON: &str = "rhinobus-failure-reason";
    /// Rust type of the error.
    pub const FAILURE_ERROR_TYPE: &str = "rhinobus-failure-error-type";
    /// The error's message.
    pub const FAILURE_ERROR_MESSAGE: &str = "rhinobus-failure-error-message";
    /// The error's chain of causes, one per line.
    pub const FAILURE_ERROR_CHAIN: &str = "rhinobus-failure-error-chain";
    /// Prefix that a replay gives to the failure headers it moves aside.
    pub const PREVIOUS_FAILURE_PREFIX: &str = "rhinobus-previous-failure-";
    /// How many times this message has landed in an error queue.
    pub const FAILED_TIMES: &str = "rhinobus-failed-times";
    /// When the message was last replayed from an error queue.
    pub const REPLAYED_AT: &str = "rhinobus-replayed-at";
    /// How many times it was replayed.
    pub const REPLAY_COUNT: &str = "rhinobus-replay-count";

    /// W3C trace context: `00-<trace id>-<parent span id>-<flags>`.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace context: vendor-specific state, carried unchanged.
    pub const TRACESTATE: &str = "tracestate";
}

/// Formats a time as RFC 3339 in UTC with milliseconds, the format of every time header.
pub fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parses a time header written by [`format_time`] (any RFC 3339 UTC time).
pub fn parse_time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn time_headers_round_trip_to_the_millisecond() {
        let t = UNIX_EPOCH + Duration::from_millis(1_763_000_000_123);
        let s = format_time(t);
        assert_eq!(s, "2025-11-13T02:13:20.123Z");
        assert_eq!(parse_time(&s), Some(t));
    }
}
