//! [`FailedMessage`]: a message in an error queue, read through its failure headers.

use crate::headers::{Headers, names, parse_time};
use md5::{Digest, Md5};
use serde::Serialize;
use std::time::SystemTime;

/// A message in an error queue.
#[derive(Debug, Clone, Serialize)]
pub struct FailedMessage {
    /// The message id, or a digest of the body for messages that came without one.
    pub id: String,
    /// The message type, if the message had one.
    pub message_type: Option<String>,
    /// The queue it failed in; for a delayed send whose queue was gone when its time came
    /// (in RabbitMQ's `rhinobus.delay.undeliverable`), the queue it was meant for; for a copy
    /// in an audit queue, the queue that handled it.
    pub source_queue: Option<String>,
    /// When it failed; for an audit copy, when its handling ended.
    #[serde(serialize_with = "serialize_time")]
    pub failed_at: Option<SystemTime>,
    /// How many times the handlers ran (in the last round, for an audit copy in its last
    /// delivery).
    pub attempts: Option<u32>,
    /// How many times this message has landed in an error queue (taken as 1 for a message
    /// without the header, 0 for an audit copy without it).
    pub failed_times: u32,
    /// Why, in one word (`handler`, `decode`, `missing-type`, `no-handler`, `audit`).
    pub reason: Option<String>,
    /// The Rust type of the error.
    pub error_type: Option<String>,
    /// The error's message.
    pub error_message: Option<String>,
    /// Every header, byte for byte as they are in the queue (text form).
    pub headers: Headers,
    /// The body, byte for byte.
    #[serde(skip)]
    pub body: Vec<u8>,
}

fn serialize_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&crate::headers::format_time(*t)),
        None => s.serialize_none(),
    }
}

impl FailedMessage {
    /// Reads a message as it sits in an error queue.
    pub fn new(headers: Headers, body: Vec<u8>) -> Self {
        let get = |name: &str| headers.get(name).cloned();
        let id = get(names::MESSAGE_ID).unwrap_or_else(|| short_digest(&[&body]));
        // A copy in an audit queue: the times and attempts of its handling stand in for those
        // of a failure.
        let audit_copy = !headers.contains_key(names::FAILURE_TIME)
            && headers.contains_key(names::PROCESSING_ENDED);
        Self {
            id,
            message_type: get(names::MESSAGE_TYPE),
            source_queue: get(names::FAILURE_SOURCE_QUEUE)
                .or_else(|| get(names::PROCESSING_QUEUE))
                .or_else(|| get(names::DELIVER_TO)),
            failed_at: (headers.get(names::FAILURE_TIME))
                .or_else(|| {
                    audit_copy
                        .then(|| headers.get(names::PROCESSING_ENDED))
                        .flatten()
                })
                .and_then(|t| parse_time(t)),
            attempts: get(names::FAILURE_ATTEMPTS)
                .or_else(|| {
                    audit_copy
                        .then(|| get(names::PROCESSING_ATTEMPTS))
                        .flatten()
                })
                .and_then(|n| n.parse().ok()),
            failed_times: get(names::FAILED_TIMES)
                .and_then(|n| n.parse().ok())
                .unwrap_or(u32::from(!audit_copy)),
            reason: get(names::FAILURE_REASON),
            error_type: get(names::FAILURE_ERROR_TYPE),
            error_message: get(names::FAILURE_ERROR_MESSAGE),
            headers,
            body,
        }
    }

    /// The first line of the error message.
    pub fn error_summary(&self) -> &str {
        self.error_message
            .as_deref()
            .and_then(|m| m.lines().next())
            .unwrap_or("")
    }

    /// The id of this message's failure group: same error type, message type and source
    /// queue. Stable across runs, so it can be named on the command line.
    pub fn group_id(&self) -> String {
        let part = |s: &Option<String>| s.clone().unwrap_or_default();
        short_digest(&[
            part(&self.error_type).as_bytes(),
            part(&self.message_type).as_bytes(),
            part(&self.source_queue).as_bytes(),
        ])
    }

    /// The body decoded from MessagePack as JSON, or `None` when it is not exactly one
    /// MessagePack value (text like `garbage` starts with a valid small integer).
    pub fn body_json(&self) -> Option<serde_json::Value> {
        use serde::Deserialize;
        let mut cursor = std::io::Cursor::new(self.body.as_slice());
        let value =
            serde_json::Value::deserialize(&mut rmp_serde::Deserializer::new(&mut cursor)).ok()?;
        (cursor.position() == self.body.len() as u64).then_some(value)
    }
}

/// 12 hex digits of the MD5 of the parts, each followed by a zero byte.
fn short_digest(parts: &[&[u8]]) -> String {
    let mut md5 = Md5::new();
    for p in parts {
        md5.update(p);
        md5.update([0]);
    }
    md5.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Failures that share an error type, message type and source queue.
#[derive(Debug, Clone, Serialize)]
pub struct FailureGroup {
    /// Stable id ([`FailedMessage::group_id`]).
    pub id: String,
    /// The shared error type.
    pub error_type: Option<String>,
    /// The shared message type.
    pub message_type: Option<String>,
    /// The shared source queue.
    pub source_queue: Option<String>,
    /// How many failures.
    pub count: usize,
    /// The earliest failure.
    #[serde(serialize_with = "serialize_time")]
    pub first: Option<SystemTime>,
    /// The latest failure.
    #[serde(serialize_with = "serialize_time")]
    pub last: Option<SystemTime>,
    /// The first line of the error of the latest failure.
    pub example_error: String,
}

/// Groups failures, largest group first.
pub fn group(messages: &[FailedMessage]) -> Vec<FailureGroup> {
    let mut groups: Vec<FailureGroup> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for m in messages {
        let id = m.group_id();
        let at = *index.entry(id.clone()).or_insert_with(|| {
            groups.push(FailureGroup {
                id,
                error_type: m.error_type.clone(),
                message_type: m.message_type.clone(),
                source_queue: m.source_queue.clone(),
                count: 0,
                first: None,
                last: None,
                example_error: String::new(),
            });
            groups.len() - 1
        });
        let g = &mut groups[at];
        g.count += 1;
        g.first = g.first.into_iter().chain(m.failed_at).min();
        if m.failed_at >= g.last {
            g.last = m.failed_at;
            g.example_error = m.error_summary().to_owned();
        }
    }
    groups.sort_by(|a, b| b.count.cmp(&a.count).then(a.id.cmp(&b.id)));
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(error_type: &str, message_type: &str, time: &str) -> FailedMessage {
        let mut h = Headers::new();
        h.insert(names::FAILURE_ERROR_TYPE.into(), error_type.into());
        h.insert(names::MESSAGE_TYPE.into(), message_type.into());
        h.insert(names::FAILURE_SOURCE_QUEUE.into(), "q".into());
        h.insert(names::FAILURE_TIME.into(), time.into());
        h.insert(
            names::FAILURE_ERROR_MESSAGE.into(),
            format!("{error_type}\nmore"),
        );
        FailedMessage::new(h, vec![0x80])
    }

    #[test]
    fn groups_by_error_message_type_and_source() {
        let ms = [
            failed("E1", "a", "2026-01-01T00:00:02Z"),
            failed("E1", "a", "2026-01-01T00:00:01Z"),
            failed("E2", "a", "2026-01-01T00:00:03Z"),
        ];
        let gs = group(&ms);
        assert_eq!(gs.len(), 2);
        assert_eq!(gs[0].count, 2);
        assert_eq!(gs[0].id, ms[0].group_id());
        assert_eq!(gs[0].first, parse_time("2026-01-01T00:00:01Z"));
        assert_eq!(gs[0].last, parse_time("2026-01-01T00:00:02Z"));
        assert_eq!(gs[0].example_error, "E1");
        assert_ne!(gs[0].id, gs[1].id);
    }

    #[test]
    fn an_audit_copy_reads_its_handling_where_a_failure_would_be() {
        let mut h = Headers::new();
        h.insert(names::PROCESSING_QUEUE.into(), "billing".into());
        h.insert(
            names::PROCESSING_ENDED.into(),
            "2026-01-01T00:00:05Z".into(),
        );
        h.insert(names::PROCESSING_ATTEMPTS.into(), "2".into());
        // A delayed send replayed to another queue once keeps its first destination.
        h.insert(names::DELIVER_TO.into(), "old".into());
        let copy = FailedMessage::new(h.clone(), vec![0x80]);
        assert_eq!(copy.source_queue.as_deref(), Some("billing"));
        assert_eq!(copy.failed_at, parse_time("2026-01-01T00:00:05Z"));
        assert_eq!(copy.attempts, Some(2));
        assert_eq!(copy.failed_times, 0);
        // Failed since (its failure headers are there): read as a failure.
        h.insert(names::FAILURE_SOURCE_QUEUE.into(), "shipping".into());
        h.insert(names::FAILURE_TIME.into(), "2026-01-01T00:00:09Z".into());
        h.insert(names::FAILURE_ATTEMPTS.into(), "6".into());
        h.insert(names::FAILED_TIMES.into(), "1".into());
        let failed = FailedMessage::new(h, vec![0x80]);
        assert_eq!(failed.source_queue.as_deref(), Some("shipping"));
        assert_eq!(failed.failed_at, parse_time("2026-01-01T00:00:09Z"));
        assert_eq!((failed.attempts, failed.failed_times), (Some(6), 1));
    }

    #[test]
    fn messages_without_an_id_get_a_stable_digest() {
        let a = FailedMessage::new(Headers::new(), b"garbage".to_vec());
        let b = FailedMessage::new(Headers::new(), b"garbage".to_vec());
        assert_eq!(a.id, b.id);
        assert_eq!(a.id.len(), 12);
        assert_eq!(a.body_json(), None);
        assert_eq!(
            FailedMessage::new(Headers::new(), vec![0x80]).body_json(),
            Some(serde_json::json!({}))
        );
    }
}
