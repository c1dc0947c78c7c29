//! Small conversions between rhinobus envelopes and AMQP properties, and confirmed publishing.

use crate::error::BusError;
use crate::headers::{Headers, names};
use crate::message::CONTENT_TYPE;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use std::time::Duration;

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// The AMQP properties of a message rhinobus sends: persistent, with every envelope header
/// in the headers table and the id, type and content type mirrored into the standard
/// properties for tools that read those.
pub(crate) fn properties_for(headers: &Headers) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers_to_table(headers));
    let content_type = headers
        .get(names::CONTENT_TYPE)
        .map_or(CONTENT_TYPE, String::as_str);
    props = props.with_content_type(content_type.into());
    if let Some(id) = headers.get(names::MESSAGE_ID) {
        props = props.with_message_id(id.as_str().into());
    }
    if let Some(t) = headers.get(names::MESSAGE_TYPE) {
        props = props.with_type(t.as_str().into());
    }
    props
}

/// Envelope headers as an AMQP table of long strings.
pub(crate) fn headers_to_table(headers: &Headers) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in headers {
        table.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
    }
    table
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

/// The original properties with `extra` headers added (replacing those of the same name).
pub(crate) fn with_extra_headers(props: &BasicProperties, extra: &Headers) -> BasicProperties {
    with_headers_changed(props, extra, |_| false)
}

/// The original properties with `extra` headers added and every header for which `remove`
/// returns true taken out first.
pub(crate) fn with_headers_changed(
    props: &BasicProperties,
    extra: &Headers,
    remove: impl Fn(&str) -> bool,
) -> BasicProperties {
    let mut table = props.headers().clone().unwrap_or_default();
    let kept: std::collections::BTreeMap<ShortString, AMQPValue> = table
        .inner()
        .iter()
        .filter(|(k, _)| !remove(k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    table = FieldTable::from(kept);
    for (k, v) in extra {
        table.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
    }
    props.clone().with_headers(table)
}

/// Publishes with `mandatory` and returns the pending confirm.
pub(crate) async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<PublisherConfirm, lapin::Error> {
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            props,
        )
        .await
}

/// What a publish needs to have come to for the message to count as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Routing {
    /// It must reach a queue (a send): an unroutable message is an error.
    Required,
    /// It may reach no queue (a publish nobody subscribed to).
    Optional,
}

/// Waits for a confirm and turns it into a result.
pub(crate) async fn confirmed(
    confirm: PublisherConfirm,
    routing: Routing,
    destination: &str,
    timeout: Duration,
) -> Result<(), BusError> {
    let confirmation = tokio::time::timeout(timeout, confirm)
        .await
        .map_err(|_| BusError::Timeout(timeout))??;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) if routing == Routing::Optional => Ok(()),
        Confirmation::Ack(Some(_)) => Err(BusError::Unroutable {
            queue: destination.to_owned(),
        }),
        Confirmation::Nack(_) => Err(BusError::Refused {
            destination: destination.to_owned(),
        }),
        Confirmation::NotRequested => Err(BusError::Transport(
            "publisher confirms are not enabled on this channel".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_survive_the_amqp_table() {
        let mut h = Headers::new();
        h.insert(names::MESSAGE_TYPE.into(), "billing.call-made".into());
        h.insert("custom".into(), "ünïcode".into());
        assert_eq!(table_to_headers(Some(&headers_to_table(&h))), h);
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
        let changed = with_headers_changed(&props, &extra, |k| k.starts_with("rhinobus-failure-"));
        let inner = changed.headers().as_ref().unwrap().inner();
        assert_eq!(inner.get("x-count"), Some(&AMQPValue::LongLongInt(42)));
        assert!(!inner.contains_key("rhinobus-failure-time"));
        assert!(inner.contains_key("rhinobus-replay-count"));
    }
}
