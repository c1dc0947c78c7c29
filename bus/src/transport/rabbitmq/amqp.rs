//! Small conversions between rhinobus envelopes and AMQP properties.

use crate::error::BusError;
use crate::headers::{Headers, names};
use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ErrorKind};

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// An AMQP short string (at most 255 bytes), or a clear error naming what was too long.
pub(crate) fn short(what: &str, s: &str) -> Result<ShortString, BusError> {
    ShortString::try_new(s).map_err(|_| {
        BusError::Invalid(format!(
            "{what} {:?}... is {} bytes; AMQP allows at most 255",
            s.chars().take(40).collect::<String>(),
            s.len()
        ))
    })
}

/// The first of `queues` that does not exist on the broker, if any, asked with passive
/// declares on a channel of their own (the broker closes the channel that asked about a
/// missing queue).
pub(crate) async fn first_missing(
    connection: &Connection,
    queues: &[String],
) -> Result<Option<String>, BusError> {
    let channel = connection.create_channel().await?;
    for queue in queues {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let answer = channel
            .queue_declare(short("queue name", queue)?, passive, FieldTable::default())
            .await;
        match answer {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => return Ok(Some(queue.clone())),
            Err(e) => return Err(e.into()),
        }
    }
    let _ = channel.close(200, "checked".into()).await;
    Ok(None)
}

/// Whether the broker said that what was named does not exist.
pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ProtocolError(p) if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    )
}

/// The AMQP properties of a message rhinobus sends: persistent, with the envelope headers
/// that AMQP has a property for (id, type, content type, correlation id, reply-to, source
/// endpoint as app id) in those properties and the rest in the headers table. The broker
/// parses the headers table of every message it routes, so keeping it short is measurably
/// faster, and tools that read the standard properties understand rhinobus messages.
pub(crate) fn properties_for(headers: &Headers) -> Result<BasicProperties, BusError> {
    type Setter = fn(BasicProperties, ShortString) -> BasicProperties;
    let mut props = BasicProperties::default().with_delivery_mode(PERSISTENT);
    let mut table = FieldTable::default();
    for (k, v) in headers {
        let as_property: Option<Setter> = match k.as_str() {
            names::MESSAGE_ID => Some(BasicProperties::with_message_id),
            names::MESSAGE_TYPE => Some(BasicProperties::with_type),
            names::CONTENT_TYPE => Some(BasicProperties::with_content_type),
            names::CORRELATION_ID => Some(BasicProperties::with_correlation_id),
            names::REPLY_TO => Some(BasicProperties::with_reply_to),
            names::SOURCE_ENDPOINT => Some(BasicProperties::with_app_id),
            _ => None,
        };
        match (as_property, ShortString::try_new(v.as_str())) {
            (Some(set), Ok(value)) => props = set(props, value),
            _ => {
                table.insert(
                    short("header name", k)?,
                    AMQPValue::LongString(v.as_str().into()),
                );
            }
        }
    }
    Ok(props.with_headers(table))
}

/// The envelope headers of a received message: the headers table, plus the envelope headers
/// that travel as AMQP properties (see [`properties_for`]).
pub(crate) fn envelope_headers(props: &BasicProperties) -> Headers {
    let mut headers = table_to_headers(props.headers().as_ref());
    let mapped = [
        (names::MESSAGE_ID, props.message_id()),
        (names::MESSAGE_TYPE, props.kind()),
        (names::CONTENT_TYPE, props.content_type()),
        (names::CORRELATION_ID, props.correlation_id()),
        (names::REPLY_TO, props.reply_to()),
        (names::SOURCE_ENDPOINT, props.app_id()),
    ];
    for (name, value) in mapped {
        if let Some(v) = value {
            headers
                .entry(name.to_owned())
                .or_insert_with(|| v.as_str().to_owned());
        }
    }
    headers
}

/// Reads an AMQP headers table as text headers. Text values are taken as they are; values of
/// other AMQP types (written by other clients) are shown in their debug form so that they are
/// visible, but the original table is what gets forwarded.
pub(crate) fn table_to_headers(table: Option<&FieldTable>) -> Headers {
    let mut headers = Headers::new();
    for (k, v) in table.into_iter().flat_map(|t| t.inner()) {
        let text = match v {
            AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            AMQPValue::ShortString(s) => s.as_str().to_owned(),
            other => format!("{other:?}"),
        };
        headers.insert(k.as_str().to_owned(), text);
    }
    headers
}

/// The properties of a copy an endpoint moves to another queue: the original's, with `extra`
/// headers added, without the two properties a copy cannot keep, each recorded in a header
/// instead: `expiration` (the broker would count the message's TTL again in the new queue
/// and discard it there: a failed message would vanish from its error queue) and `user_id`
/// (the broker refuses a publish whose user id is not the connection's user: a foreign
/// message could never reach the error queue). The copy is persistent whatever the original
/// was: a transient message parked in an error queue would not survive a broker restart.
pub(crate) fn moved_copy(
    props: &BasicProperties,
    extra: &Headers,
) -> Result<BasicProperties, BusError> {
    let mut extra = extra.clone();
    if let Some(ttl) = props.expiration() {
        extra.insert(names::ORIGINAL_EXPIRATION.into(), ttl.to_string());
    }
    if let Some(user) = props.user_id() {
        extra.insert(names::ORIGINAL_USER_ID.into(), user.to_string());
    }
    let mut copy = BasicProperties::default();
    macro_rules! keep {
        ($($get:ident => $set:ident),* $(,)?) => {
            $(if let Some(v) = props.$get() {
                copy = copy.$set(v.clone());
            })*
        };
    }
    keep!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        headers => with_headers,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    with_headers_changed(&copy.with_delivery_mode(PERSISTENT), &extra, |_| false)
}

/// The original properties with `extra` headers added and every header for which `remove`
/// returns true taken out first.
pub(crate) fn with_headers_changed(
    props: &BasicProperties,
    extra: &Headers,
    remove: impl Fn(&str) -> bool,
) -> Result<BasicProperties, BusError> {
    let mut table = props.headers().clone().unwrap_or_default();
    let kept: std::collections::BTreeMap<ShortString, AMQPValue> = table
        .inner()
        .iter()
        .filter(|(k, _)| !remove(k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    table = FieldTable::from(kept);
    for (k, v) in extra {
        table.insert(
            short("header name", k)?,
            AMQPValue::LongString(v.as_str().into()),
        );
    }
    Ok(props.clone().with_headers(table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_headers_survive_properties_and_table() {
        let mut h = Headers::new();
        h.insert(
            names::MESSAGE_ID.into(),
            "0198a0b2-1c3d-7e4f-8a9b-0c1d2e3f4a5b".into(),
        );
        h.insert(names::MESSAGE_TYPE.into(), "billing.call-made".into());
        h.insert(names::REPLY_TO.into(), "x".repeat(300));
        h.insert("custom".into(), "ünïcode".into());
        let props = properties_for(&h).unwrap();
        assert_eq!(props.kind().as_ref().unwrap().as_str(), "billing.call-made");
        let table = props.headers().as_ref().unwrap().inner();
        assert!(
            !table.contains_key(names::MESSAGE_TYPE),
            "in the properties instead"
        );
        assert!(
            table.contains_key(names::REPLY_TO),
            "too long for a property: kept in the table"
        );
        assert_eq!(envelope_headers(&props), h);
    }

    #[test]
    fn overlong_names_are_errors_not_panics() {
        let mut h = Headers::new();
        h.insert("n".repeat(256), "v".into());
        let err = properties_for(&h).unwrap_err();
        assert!(err.to_string().contains("at most 255"), "{err}");
    }

    #[test]
    fn a_moved_copy_keeps_everything_but_its_ttl_and_user_id_which_it_records() {
        let mut table = FieldTable::default();
        table.insert("x-count".into(), AMQPValue::LongLongInt(42));
        let props = BasicProperties::default()
            .with_headers(table)
            .with_expiration("60000".into())
            .with_user_id("alice".into())
            .with_message_id("m1".into())
            .with_type("t".into())
            .with_delivery_mode(2)
            .with_priority(3)
            .with_timestamp(1_700_000_000)
            .with_app_id("app".into());
        let mut extra = Headers::new();
        extra.insert(names::FAILURE_REASON.into(), "decode".into());
        let copy = moved_copy(&props, &extra).unwrap();
        assert_eq!((copy.expiration(), copy.user_id()), (&None, &None));
        let transient = moved_copy(&props.clone().with_delivery_mode(1), &extra).unwrap();
        assert_eq!(
            *transient.delivery_mode(),
            Some(2),
            "persistent whatever it was"
        );
        let original = |p: &BasicProperties| {
            (
                p.message_id().clone(),
                p.kind().clone(),
                *p.delivery_mode(),
                *p.priority(),
            )
        };
        assert_eq!(original(&copy), original(&props));
        assert_eq!(
            (copy.timestamp(), copy.app_id()),
            (props.timestamp(), props.app_id())
        );
        let table = copy.headers().as_ref().unwrap().inner();
        assert_eq!(table.get("x-count"), Some(&AMQPValue::LongLongInt(42)));
        let text = |k: &str| match table.get(k) {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(text(names::ORIGINAL_EXPIRATION), "60000");
        assert_eq!(text(names::ORIGINAL_USER_ID), "alice");
        assert_eq!(text(names::FAILURE_REASON), "decode");
        // Nothing to record when there was nothing to drop.
        let plain = moved_copy(&BasicProperties::default(), &Headers::new()).unwrap();
        assert!(
            !plain
                .headers()
                .as_ref()
                .is_some_and(|t| t.contains_key(names::ORIGINAL_EXPIRATION))
        );
    }

    #[test]
    fn changing_headers_keeps_foreign_values_untouched() {
        let mut table = FieldTable::default();
        table.insert("x-count".into(), AMQPValue::LongLongInt(42));
        table.insert(
            "rhinobus-failure-time".into(),
            AMQPValue::LongString("t".into()),
        );
        let props = BasicProperties::default().with_headers(table);
        let mut extra = Headers::new();
        extra.insert("rhinobus-replay-count".into(), "1".into());
        let changed =
            with_headers_changed(&props, &extra, |k| k.starts_with("rhinobus-failure-")).unwrap();
        let inner = changed.headers().as_ref().unwrap().inner();
        assert_eq!(inner.get("x-count"), Some(&AMQPValue::LongLongInt(42)));
        assert!(!inner.contains_key("rhinobus-failure-time"));
        assert!(inner.contains_key("rhinobus-replay-count"));
    }
}
