//! `errors-list` and `errors-replay`: how long `rhinobus errors list` and `replay --all` take
//! on a large error queue (100,000 messages by default).

use crate::report::{Latencies, Report};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rhinobus::headers::names;
use rhinobus::ops::{Action, ErrorQueue, Selection};
use std::time::Instant;

type BenchError = Box<dyn std::error::Error>;

/// Fills an error queue with `messages` failures, then lists it and replays all of it.
pub async fn error_queue(amqp_url: &str, messages: u64) -> Result<(Report, Report), BenchError> {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let (error, source) = (format!("bench-error-{id}"), format!("bench-source-{id}"));
    let conn = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for q in [&error, &source] {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(q.as_str().into(), durable, FieldTable::default())
            .await?;
    }
    let mut confirms = FuturesUnordered::new();
    for n in 0..messages {
        if confirms.len() >= 1024 {
            confirms.next().await.expect("non-empty")?;
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("{id}-{n}").into())
            .with_type("bench.message".into())
            .with_headers(failure_headers(&source, n));
        let confirm = channel
            .basic_publish(
                "".into(),
                error.as_str().into(),
                BasicPublishOptions::default(),
                &[0x80],
                props,
            )
            .await?;
        confirms.push(confirm);
    }
    while let Some(c) = confirms.next().await {
        c?;
    }
    let queue = ErrorQueue::connect(amqp_url, &error).await?;
    let started = Instant::now();
    let listed = queue.browse().await?;
    let list = Report::new(
        "errors-list",
        listed.len() as u64,
        started.elapsed(),
        Latencies::default(),
    );
    let started = Instant::now();
    let outcome = queue
        .apply(&Selection::all(), &Action::Replay { to: None }, false)
        .await?;
    let replay = Report::new(
        "errors-replay",
        outcome.moved as u64,
        started.elapsed(),
        Latencies::default(),
    );
    for q in [&error, &source] {
        channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    let _ = conn.close(200, "bench done".into()).await;
    if outcome.moved as u64 != messages || listed.len() as u64 != messages {
        return Err(format!(
            "listed {} and replayed {} of {messages}",
            listed.len(),
            outcome.moved
        )
        .into());
    }
    Ok((list, replay))
}

fn failure_headers(source: &str, n: u64) -> FieldTable {
    let mut t = FieldTable::default();
    let mut put = |k: &str, v: String| {
        t.insert(k.into(), AMQPValue::LongString(v.into()));
    };
    put(names::FAILURE_SOURCE_QUEUE, source.into());
    put(names::FAILURE_ENDPOINT, source.into());
    put(names::FAILURE_TIME, "2026-11-01T10:00:00.000Z".into());
    put(names::FAILURE_ATTEMPTS, "6".into());
    put(names::FAILURE_REASON, "handler".into());
    put(names::FAILURE_ERROR_TYPE, format!("app::Error{}", n % 7));
    put(names::FAILURE_ERROR_MESSAGE, "it broke".into());
    t
}
