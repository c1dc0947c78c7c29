//! Delayed sends against a real RabbitMQ: a delayed message arrives no sooner than its time,
//! a handler's deferred message leaves only if the handler succeeds, and a delayed message
//! whose queue is gone when its time comes waits in the undeliverable queue for a replay.

use lapin::options::QueueDeleteOptions;
use rhinobus::headers::names;
use rhinobus::transport::RabbitMq;
use rhinobus::{Bus, BusError, Context, Endpoint, HandlerError, SendOptions};
use rhinobus_tests::{
    RabbitmqctlOnDrop, Raw, ReportWork, Work, amqp_url, init_tracing, recv, reporting,
    rhinobus_cli, unique,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Longest wait for a delayed message beyond its delay.
const WAIT: Duration = Duration::from_secs(20);

fn rabbit() -> RabbitMq {
    RabbitMq::new(amqp_url())
}

#[tokio::test]
async fn a_delayed_send_arrives_no_sooner_than_its_time_and_plain_sends_pass_it() {
    init_tracing();
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("delayed-send").await;
    let (endpoint, mut handled) = reporting(&queue, &error).await;
    let bus = Bus::new(rabbit(), unique("sender"));
    let sent = Instant::now();
    let delay = Duration::from_secs(3); // 11 in binary: two levels wait
    bus.send_with(&queue, &Work { n: 1 }, SendOptions::delayed_by(delay))
        .await
        .expect("delayed send");
    bus.send(&queue, &Work { n: 2 }).await.expect("plain send");
    assert_eq!(recv(&mut handled).await, 2, "the plain send comes first");
    assert_eq!(recv(&mut handled).await, 1);
    let waited = sent.elapsed();
    assert!(
        waited >= delay,
        "delivered after {waited:?}, before {delay:?}"
    );
    endpoint.shutdown().await;
    raw.cleanup().await;
}

#[tokio::test]
async fn a_deferred_message_leaves_only_with_the_handling_that_succeeded() {
    init_tracing();
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("deferring").await;
    let (tx, mut handled) = mpsc::unbounded_channel();
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let endpoint = Endpoint::builder(&queue, rabbit())
        .error_queue(&error)
        .handle(move |w: Work, ctx: Context| {
            let (tx, runs) = (tx.clone(), counted.clone());
            async move {
                if w.n == 1 {
                    // Every run defers a reminder; the first run then fails, so only the
                    // second run's reminder may leave.
                    ctx.defer(&Work { n: 100 }, Duration::from_secs(1))?;
                    if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err(HandlerError::msg("first run fails"));
                    }
                }
                let deferred = ctx.header(names::DELIVER_AT).is_some();
                tx.send((w.n, deferred)).expect("test listening");
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .expect("start");
    endpoint
        .bus()
        .send(&queue, &Work { n: 1 })
        .await
        .expect("send");
    assert_eq!(recv(&mut handled).await, (1, false));
    assert_eq!(
        recv(&mut handled).await,
        (100, true),
        "the reminder came back"
    );
    // The failed run's reminder would have come back by now, in the same second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(handled.try_recv().is_err(), "one reminder only");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    endpoint.shutdown().await;
    raw.cleanup().await;
}

#[tokio::test]
async fn a_delayed_send_to_a_missing_queue_or_a_delayed_publication_fails_at_once() {
    let bus = Bus::new(rabbit(), unique("sender"));
    let later = SendOptions::delayed_by(Duration::from_secs(60));
    let missing = unique("nowhere");
    match bus.send_with(&missing, &Work { n: 1 }, later.clone()).await {
        Err(BusError::Unroutable { queue }) => assert_eq!(queue, missing),
        other => panic!("expected Unroutable, got {other:?}"),
    }
    let context = Context::detached(bus.clone(), Default::default());
    let published = context.publish_with(&Work { n: 1 }, later);
    assert!(
        matches!(published, Err(BusError::Invalid(ref m)) if m.contains("cannot be delayed")),
        "{published:?}"
    );
}

#[tokio::test]
async fn a_delayed_message_whose_queue_went_away_waits_to_be_replayed() {
    init_tracing();
    let mut raw = Raw::connect().await;
    let queue = unique("vanishing");
    raw.queue(&queue).await;
    // Sent by the CLI, as an operator would schedule a message by hand.
    let (ok, out, err) = rhinobus_cli(&[
        "send",
        &queue,
        "--type",
        "tests.work",
        "--json",
        r#"{"n": 7}"#,
        "--delay",
        "1s",
    ]);
    assert!(ok, "rhinobus send --delay: {err}");
    let id = out.trim().to_owned();
    raw.channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the queue");
    let undeliverable = rabbit().undeliverable_queue();
    let deadline = Instant::now() + WAIT;
    loop {
        let (ok, out, err) = rhinobus_cli(&["errors", "--queue", &undeliverable, "list", "--json"]);
        assert!(ok, "rhinobus errors list: {err}");
        if out.contains(&id) {
            assert!(
                out.contains(&queue),
                "listed with the queue it was meant for: {out}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{id} not undeliverable: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    raw.queue(&queue).await;
    let (ok, _, err) = rhinobus_cli(&["errors", "--queue", &undeliverable, "replay", &id]);
    assert!(ok, "rhinobus errors replay: {err}");
    let replayed = raw.drain(&queue).await;
    assert_eq!(replayed.len(), 1, "the message is back in its queue");
    assert_eq!(replayed[0].0[names::MESSAGE_ID], id);
    assert_eq!(
        rhinobus::message::decode::<Work>(&replayed[0].1).expect("decode"),
        Work { n: 7 }
    );
    raw.cleanup().await;
}

#[tokio::test]
async fn an_endpoint_that_declares_its_queue_again_binds_it_again_for_delayed_sends() {
    init_tracing();
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("redeclared").await;
    let bus = Bus::new(rabbit(), unique("sender"));
    let after = |s| SendOptions::delayed_by(Duration::from_secs(s));
    // The sender binds the queue on its first delayed send to it, and remembers it did.
    bus.send_with(&queue, &Work { n: 1 }, after(3))
        .await
        .expect("first delayed send");
    raw.channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the queue, and its bindings with it");
    // Starting declares the queue again.
    let (endpoint, mut handled) = reporting(&queue, &error).await;
    bus.send_with(&queue, &Work { n: 2 }, after(1))
        .await
        .expect("second delayed send");
    // Both find the queue declared again, the one sent before it was deleted too.
    assert_eq!(recv(&mut handled).await, 2);
    assert_eq!(recv(&mut handled).await, 1);
    endpoint.shutdown().await;
    raw.cleanup().await;
}

#[tokio::test]
async fn a_broker_refusing_the_delay_levels_fails_only_delayed_sends_and_with_a_config_error() {
    // In a virtual host of its own, a level queue declared before with other arguments: the
    // broker refuses to declare it as a delay level.
    let vhost = unique("vhost");
    rhinobus_tests::rabbitmqctl(&["add_vhost", &vhost]);
    let _delete = RabbitmqctlOnDrop::new(&["delete_vhost", &vhost]);
    rhinobus_tests::rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let base = amqp_url();
    let url = format!("{}/{vhost}", base.strip_suffix("/%2f").unwrap_or(&base));
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("these tests need RabbitMQ at {url}: {e}"));
    let channel = conn.create_channel().await.expect("channel");
    let durable = lapin::options::QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let level = "rhinobus.delay.level.03";
    let no_args = lapin::types::FieldTable::default();
    (channel.queue_declare(level.into(), durable, no_args.clone()))
        .await
        .expect("declare a classic queue where a level goes");
    channel
        .queue_declare("worker".into(), durable, no_args)
        .await
        .expect("declare the endpoint queue");
    let (tx, mut handled) = mpsc::unbounded_channel();
    let endpoint = Endpoint::builder("worker", RabbitMq::new(&url))
        .handle(ReportWork(tx))
        .start()
        .await
        .expect("an endpoint starts: it does not declare the levels");
    let bus = endpoint.bus();
    bus.send("worker", &Work { n: 1 })
        .await
        .expect("a plain send");
    assert_eq!(recv(&mut handled).await, 1);
    let later = SendOptions::delayed_by(Duration::from_secs(1));
    match bus.send_with("worker", &Work { n: 2 }, later).await {
        Err(BusError::Config(m)) => assert!(m.contains("delay queues"), "{m}"),
        other => panic!("expected a configuration error, got {other:?}"),
    }
    // The refusal closed a channel of its own, not the connection.
    bus.send("worker", &Work { n: 3 })
        .await
        .expect("a plain send after it");
    assert_eq!(recv(&mut handled).await, 3);
    endpoint.shutdown().await;
    let _ = conn.close(200, "done".into()).await;
}
