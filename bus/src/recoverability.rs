//! What happens when handling fails: immediate retries, delayed retries, the error queue,
//! failures no retry can mend, and the separate budget for conflicts.

use crate::error::{ErrorKind, HandlerError};
use crate::headers::{Headers, format_time, names};
use crate::transport::DelayQueue;
use std::any::TypeId;
use std::time::{Duration, SystemTime};

/// Delayed retries: after the immediate retries are spent, the message waits and comes back
/// for another round of immediate retries, up to `max` times, each wait `multiplier` times
/// longer than the one before.
#[derive(Debug, Clone, PartialEq)]
pub struct DelayedRetries {
    /// How many delayed rounds before the error queue.
    pub max: u32,
    /// The first wait.
    pub delay: Duration,
    /// Factor applied to the wait of each next round.
    pub multiplier: u32,
}

impl Default for DelayedRetries {
    fn default() -> Self {
        Self {
            max: 3,
            delay: Duration::from_secs(10),
            multiplier: 2,
        }
    }
}

/// The recoverability policy of an endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Recoverability {
    /// Immediate retries after the first attempt (default 5; 0 disables them).
    pub immediate_retries: u32,
    /// Delayed retries (off by default).
    pub delayed_retries: Option<DelayedRetries>,
    /// How many times a conflict re-runs the handlers at once before it counts as a failure.
    pub conflict_retries: u32,
    /// The most jitter between conflict re-runs.
    pub conflict_jitter: Duration,
    /// Where messages go when every retry failed (default `error`).
    pub error_queue: String,
    /// Rust types of errors that no retry can mend, as
    /// [`EndpointBuilder::unrecoverable`](crate::EndpointBuilder::unrecoverable) adds them: a
    /// handler error of one of them sends the message to the error queue at once, as
    /// [`ErrorKind::Unrecoverable`] does.
    pub unrecoverable: Vec<TypeId>,
}

impl Default for Recoverability {
    fn default() -> Self {
        Self {
            immediate_retries: 5,
            delayed_retries: None,
            conflict_retries: 100,
            conflict_jitter: Duration::from_millis(20),
            error_queue: "error".into(),
            unrecoverable: Vec::new(),
        }
    }
}

impl Recoverability {
    /// Whether `error` goes to the error queue without retries.
    pub(crate) fn is_unrecoverable(&self, error: &HandlerError) -> bool {
        error.kind() == ErrorKind::Unrecoverable
            || (error.type_id()).is_some_and(|t| self.unrecoverable.contains(&t))
    }

    /// The delay queues the delayed retries need for an endpoint queue, shortest first.
    ///
    /// A queue is named after its delay, not its round: a broker fixes a queue's message TTL
    /// when it is declared, so a changed policy gets new queues, and the old ones still drain
    /// what they hold into the endpoint queue.
    pub(crate) fn delay_queues(&self, queue: &str) -> Vec<DelayQueue> {
        let Some(d) = &self.delayed_retries else {
            return Vec::new();
        };
        let mut delay = d.delay;
        (1..=d.max)
            .map(|_| {
                let q = DelayQueue {
                    name: format!("{queue}.delay.{}ms", delay.as_millis()),
                    delay,
                };
                delay = delay.saturating_mul(d.multiplier.max(1));
                q
            })
            .collect()
    }
}

/// Why a message went to the error queue.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    /// One word: `handler`, `unrecoverable`, `decode`, `no-handler`, `missing-type`, `audit`,
    /// `no-request`.
    pub reason: &'static str,
    pub error_type: String,
    pub message: String,
    pub causes: Vec<String>,
    pub attempts: u32,
}

impl Failure {
    /// The failure of a handler that failed with `error` on attempt `attempts`.
    pub(crate) fn of_handler(reason: &'static str, error: &HandlerError, attempts: u32) -> Self {
        Self {
            reason,
            error_type: error.error_type().into(),
            message: error.to_string(),
            causes: error.causes(),
            attempts,
        }
    }

    /// The headers the failed message gains in the error queue.
    pub(crate) fn headers(&self, original: &Headers, endpoint: &str, queue: &str) -> Headers {
        let failed_before = original
            .get(names::FAILED_TIMES)
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0);
        let mut h = Headers::new();
        h.insert(names::FAILURE_SOURCE_QUEUE.into(), queue.into());
        h.insert(names::FAILURE_ENDPOINT.into(), endpoint.into());
        h.insert(names::FAILURE_TIME.into(), format_time(SystemTime::now()));
        h.insert(names::FAILURE_ATTEMPTS.into(), self.attempts.to_string());
        h.insert(names::FAILURE_REASON.into(), self.reason.into());
        h.insert(names::FAILURE_ERROR_TYPE.into(), self.error_type.clone());
        h.insert(names::FAILURE_ERROR_MESSAGE.into(), self.message.clone());
        h.insert(names::FAILURE_ERROR_CHAIN.into(), self.causes.join("\n"));
        h.insert(
            names::FAILED_TIMES.into(),
            failed_before.saturating_add(1).to_string(),
        );
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_queues_grow_by_the_multiplier() {
        let r = Recoverability {
            delayed_retries: Some(DelayedRetries {
                max: 3,
                delay: Duration::from_secs(1),
                multiplier: 3,
            }),
            ..Recoverability::default()
        };
        let qs = r.delay_queues("billing");
        let got: Vec<_> = qs
            .iter()
            .map(|q| (q.name.as_str(), q.delay.as_secs()))
            .collect();
        assert_eq!(
            got,
            [
                ("billing.delay.1000ms", 1),
                ("billing.delay.3000ms", 3),
                ("billing.delay.9000ms", 9)
            ]
        );
        assert!(Recoverability::default().delay_queues("x").is_empty());
    }

    #[test]
    fn failure_headers_count_repeated_failures() {
        let f = Failure {
            reason: "handler",
            error_type: "E".into(),
            message: "boom".into(),
            causes: vec!["a".into(), "b".into()],
            attempts: 6,
        };
        let mut original = Headers::new();
        original.insert(names::FAILED_TIMES.into(), "2".into());
        let h = f.headers(&original, "billing", "billing");
        assert_eq!(h[names::FAILED_TIMES], "3");
        assert_eq!(h[names::FAILURE_ERROR_CHAIN], "a\nb");
        assert_eq!(h[names::FAILURE_ATTEMPTS], "6");
    }
}
