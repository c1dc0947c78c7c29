//! The bus against a real RabbitMQ: delivery, retries, the error queue, reconnects, shutdown.

use lapin::types::{AMQPValue, FieldTable};
use rhinobus::headers::names;
use rhinobus::transport::RabbitMq;
use rhinobus::{Context, DelayedRetries, Endpoint, HandlerError, Message};
use rhinobus_tests::{
    RabbitmqctlOnDrop, Raw, ReportWork, Work, amqp_url, connections_named, init_tracing,
    rabbitmqctl, recv, rhinobus_cli, unacknowledged, unique,
};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Done {
    n: u32,
}
impl Message for Done {
    const NAME: &'static str = "tests.done";
}

/// A publication type unique to one test, so parallel tests do not see each other's events.
macro_rules! event_type {
    ($ty:ident, $name:expr) => {
        #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
        struct $ty {
            n: u32,
        }
        impl Message for $ty {
            const NAME: &'static str = $name;
        }
    };
}

fn rabbit() -> RabbitMq {
    RabbitMq::new(amqp_url())
}

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn send_reaches_the_handler_and_reply_comes_back() {
    init_tracing();
    let mut raw = Raw::connect().await;
    let (server, client, error) = (unique("server"), unique("client"), unique("error"));
    for q in [&server, &client, &error] {
        raw.forget_later(q);
    }
    let (trace_tx, mut request_trace) = mpsc::unbounded_channel();
    let server_ep = Endpoint::builder(&server, rabbit())
        .error_queue(&error)
        .handle(move |w: Work, ctx: Context| {
            let trace_tx = trace_tx.clone();
            async move {
                trace_tx.send(ctx.header(names::TRACEPARENT).map(str::to_owned))?;
                ctx.reply(&Done { n: w.n * 2 })?;
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .expect("start server");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let client_ep = Endpoint::builder(&client, rabbit())
        .error_queue(&error)
        .handle(move |d: Done, ctx: Context| {
            let tx = tx.clone();
            async move {
                tx.send((d, ctx.headers().clone()))?;
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .expect("start client");
    let sent = client_ep
        .bus()
        .send(&server, &Work { n: 21 })
        .await
        .expect("send");
    let (done, headers) = recv(&mut rx).await;
    assert_eq!(done, Done { n: 42 });
    assert_eq!(headers[names::CORRELATION_ID], sent.to_string());
    assert_eq!(headers[names::CONVERSATION_ID], sent.to_string());
    assert_eq!(headers[names::SOURCE_ENDPOINT], server);
    assert_eq!(headers[names::MESSAGE_TYPE], Done::NAME);
    let trace_of = |traceparent: &str| traceparent.split('-').nth(1).map(str::to_owned);
    let request = recv(&mut request_trace)
        .await
        .expect("the request carries a traceparent");
    assert_eq!(
        trace_of(&headers[names::TRACEPARENT]),
        trace_of(&request),
        "the reply continues the request's trace"
    );
    assert_ne!(headers[names::TRACEPARENT], request, "in a span of its own");
    server_ep.shutdown().await;
    client_ep.shutdown().await;
    raw.cleanup().await;
}

#[tokio::test]
async fn publish_reaches_every_subscriber_and_every_handler() {
    event_type!(Published, "tests.publish-reaches-every-subscriber");
    let mut raw = Raw::connect().await;
    let error = unique("error");
    raw.forget_later(&error);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut endpoints = Vec::new();
    for i in 0..2 {
        let name = unique(&format!("sub{i}"));
        raw.forget_later(&name);
        let (tx1, tx2) = (tx.clone(), tx.clone());
        let ep = Endpoint::builder(&name, rabbit())
            .error_queue(&error)
            .subscribe::<Published>()
            .handle(move |p: Published, _: Context| {
                let tx = tx1.clone();
                async move {
                    tx.send((i, "first", p.n))?;
                    Ok::<_, HandlerError>(())
                }
            })
            .handle(move |p: Published, _: Context| {
                let tx = tx2.clone();
                async move {
                    tx.send((i, "second", p.n))?;
                    Ok::<_, HandlerError>(())
                }
            })
            .start()
            .await
            .expect("start");
        endpoints.push(ep);
    }
    endpoints[0]
        .bus()
        .publish(&Published { n: 5 })
        .await
        .expect("publish");
    let mut got = HashSet::new();
    for _ in 0..4 {
        got.insert(recv(&mut rx).await);
    }
    let expected: HashSet<_> = [
        (0, "first", 5),
        (0, "second", 5),
        (1, "first", 5),
        (1, "second", 5),
    ]
    .into();
    assert_eq!(got, expected);
    for ep in endpoints {
        ep.shutdown().await;
    }
    assert_eq!(raw.count(&error).await, 0);
    raw.cleanup().await;
}

/// Publications nobody subscribes to come back from the broker as returns. lapin hands a
/// return to whichever confirm of its channel completes next, so sends sharing a channel with
/// such publications were reported unroutable now and then (55 of 1,200 here before the
/// publications got a channel of their own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_beside_publications_nobody_receives_never_fail() {
    event_type!(Unheard, "tests.unheard");
    let mut raw = Raw::connect().await;
    let queue = unique("beside-unheard");
    raw.queue(&queue).await;
    let bus = rhinobus::Bus::new(rabbit(), unique("sender"));
    let tasks: Vec<_> = (0..8u32)
        .map(|t| {
            let (bus, queue) = (bus.clone(), queue.clone());
            tokio::spawn(async move {
                let mut failed = Vec::new();
                for n in 0..300 {
                    if t % 2 == 0 {
                        if let Err(e) = bus.send(&queue, &Work { n }).await {
                            failed.push(e.to_string());
                        }
                    } else {
                        bus.publish(&Unheard { n }).await.expect("publish");
                    }
                }
                failed
            })
        })
        .collect();
    let mut failed = Vec::new();
    for t in tasks {
        failed.extend(t.await.expect("task"));
    }
    assert!(
        failed.is_empty(),
        "{} sends to an existing queue failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    raw.wait_for_count(&queue, 1200, WAIT).await;
    raw.cleanup().await;
}

/// Sends to a queue that does not exist, beside sends to one that does, from one bus: each of
/// the first must fail as unroutable (one reported sent would be a message lost) and each of
/// the second must succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_beside_sends_to_a_missing_queue_are_told_apart() {
    let mut raw = Raw::connect().await;
    let queue = unique("beside-missing");
    raw.queue(&queue).await;
    let missing = unique("missing");
    let bus = rhinobus::Bus::new(rabbit(), unique("sender"));
    let tasks: Vec<_> = (0..8u32)
        .map(|t| {
            let (bus, queue, missing) = (bus.clone(), queue.clone(), missing.clone());
            tokio::spawn(async move {
                let (mut lost, mut failed) = (0, Vec::new());
                for n in 0..150 {
                    if t % 2 == 0 {
                        if let Err(e) = bus.send(&queue, &Work { n }).await {
                            failed.push(e.to_string());
                        }
                    } else {
                        match bus.send(&missing, &Work { n }).await {
                            Err(rhinobus::BusError::Unroutable { queue }) => {
                                assert_eq!(queue, missing, "the missing queue is named");
                            }
                            Err(e) => panic!("a send to a missing queue failed otherwise: {e}"),
                            Ok(_) => lost += 1,
                        }
                    }
                }
                (lost, failed)
            })
        })
        .collect();
    let (mut lost, mut failed) = (0, Vec::new());
    for t in tasks {
        let (l, f) = t.await.expect("task");
        lost += l;
        failed.extend(f);
    }
    assert_eq!(lost, 0, "sends to a missing queue reported sent (lost)");
    assert!(
        failed.is_empty(),
        "{} sends to an existing queue failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    raw.wait_for_count(&queue, 600, WAIT).await;
    raw.cleanup().await;
}

/// The messages of one send (a handler's, say) reach a queue in the order they were staged,
/// also when other sends of the connection share their batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_messages_of_one_send_arrive_in_order() {
    use rhinobus::transport::{Destination, OutgoingMessage, Transport};
    let mut raw = Raw::connect().await;
    let (ordered, other) = (unique("ordered"), unique("other"));
    raw.queue(&ordered).await;
    raw.queue(&other).await;
    let transport = rabbit();
    let message = |queue: &str, n: u32| {
        let mut headers = rhinobus::Headers::new();
        headers.insert(names::MESSAGE_ID.into(), format!("{n:04}"));
        OutgoingMessage {
            destination: Destination::Queue(queue.to_owned()),
            headers,
            body: rhinobus::message::encode(&Work { n }).expect("encodes"),
        }
    };
    let singles: Vec<_> = (0..4u32)
        .map(|t| {
            let (transport, other) = (transport.clone(), other.clone());
            tokio::spawn(async move {
                for n in 0..100 {
                    transport
                        .send(vec![message(&other, t * 100 + n)])
                        .await
                        .expect("send");
                }
            })
        })
        .collect();
    for round in 0..5u32 {
        let batch = (0..200)
            .map(|n| message(&ordered, round * 200 + n))
            .collect();
        transport.send(batch).await.expect("send");
    }
    for s in singles {
        s.await.expect("task");
    }
    raw.wait_for_count(&ordered, 1000, WAIT).await;
    let ids: Vec<String> = raw
        .drain(&ordered)
        .await
        .into_iter()
        .map(|(h, _)| h[names::MESSAGE_ID].clone())
        .collect();
    let expected: Vec<String> = (0..1000).map(|n| format!("{n:04}")).collect();
    assert!(
        ids == expected,
        "out of order: {:?}",
        &ids[..20.min(ids.len())]
    );
    raw.cleanup().await;
}

/// A message larger than the broker takes fails at once, clearly, and alone: the broker would
/// close the channel over it, failing the messages published with it.
#[tokio::test]
async fn a_message_too_large_for_the_broker_fails_alone_and_clearly() {
    #[derive(Debug, Serialize, Deserialize)]
    struct Bulky {
        payload: String,
    }
    impl Message for Bulky {
        const NAME: &'static str = "tests.bulky";
    }
    let mut raw = Raw::connect().await;
    let queue = unique("bulky");
    raw.queue(&queue).await;
    let bus = rhinobus::Bus::new(rabbit().max_message_bytes(1024), unique("sender"));
    let small = Bulky {
        payload: "x".repeat(500),
    };
    let large = Bulky {
        payload: "x".repeat(2000),
    };
    let (sent, refused) = tokio::join!(bus.send(&queue, &small), bus.send(&queue, &large));
    sent.expect("the small one is sent");
    let err = refused.unwrap_err();
    assert!(matches!(err, rhinobus::BusError::Invalid(_)), "{err}");
    assert!(
        err.to_string().contains("larger than the 1024 bytes"),
        "{err}"
    );
    raw.wait_for_count(&queue, 1, WAIT).await;
    assert_eq!(
        raw.drain(&queue).await.len(),
        1,
        "only the small one arrived"
    );
    raw.cleanup().await;
}

#[tokio::test]
async fn sending_to_a_missing_queue_is_an_error() {
    let bus = rhinobus::Bus::new(rabbit(), unique("sender"));
    let err = bus
        .send(&unique("nowhere"), &Work { n: 1 })
        .await
        .unwrap_err();
    assert!(
        matches!(err, rhinobus::BusError::Unroutable { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn names_amqp_cannot_carry_are_errors_not_panics() {
    let long = "n".repeat(300);
    let err = Endpoint::builder(&long, rabbit())
        .handle(|_: Work, _: Context| async { Ok::<_, HandlerError>(()) })
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("at most 255"), "{err}");
    let bus = rhinobus::Bus::new(rabbit(), unique("sender"));
    let err = bus.send(&long, &Work { n: 1 }).await.unwrap_err();
    assert!(err.to_string().contains("at most 255"), "{err}");
}

#[tokio::test]
async fn an_unreachable_broker_is_a_clear_error() {
    let ep = Endpoint::builder(
        unique("lonely"),
        RabbitMq::new("amqp://guest:guest@127.0.0.1:1/%2f"),
    )
    .handle(|_: Work, _: Context| async { Ok::<_, HandlerError>(()) })
    .start()
    .await;
    let err = ep.unwrap_err().to_string();
    assert!(err.contains("cannot reach RabbitMQ"), "{err}");
    assert!(
        !err.contains("guest:guest"),
        "the password must not leak: {err}"
    );
}

#[tokio::test]
async fn failing_messages_are_retried_then_kept_in_the_error_queue_byte_for_byte() {
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("failing").await;
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let ep = Endpoint::builder(&queue, rabbit())
        .error_queue(&error)
        .immediate_retries(3)
        .handle(move |_: Work, _: Context| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let io = std::io::Error::other("disk full");
                Err::<(), _>(HandlerError::from(WrappedError(io)))
            }
        })
        .start()
        .await
        .expect("start");
    // Sent raw, with a foreign header of a non-text type, to check both survive untouched.
    let body = rmp_body(&Work { n: 9 });
    let mut headers = FieldTable::default();
    headers.insert(
        names::MESSAGE_TYPE.into(),
        AMQPValue::LongString(Work::NAME.into()),
    );
    headers.insert("x-foreign".into(), AMQPValue::LongLongInt(77));
    raw.publish(&queue, &body, headers).await;
    raw.wait_for_count(&error, 1, WAIT).await;
    ep.shutdown().await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "1 attempt + 3 immediate retries"
    );
    let failed = raw.drain(&error).await;
    assert_eq!(failed.len(), 1);
    let (h, b) = &failed[0];
    assert_eq!(b, &body, "body byte for byte");
    assert_eq!(
        h["x-foreign"], "LongLongInt(77)",
        "foreign header kept with its type"
    );
    assert_eq!(h[names::MESSAGE_TYPE], Work::NAME);
    assert_eq!(h[names::FAILURE_SOURCE_QUEUE], queue);
    assert_eq!(h[names::FAILURE_ENDPOINT], queue);
    assert_eq!(h[names::FAILURE_ATTEMPTS], "4");
    assert_eq!(h[names::FAILURE_REASON], "handler");
    assert_eq!(h[names::FAILURE_ERROR_MESSAGE], "wrapped failure");
    assert_eq!(h[names::FAILURE_ERROR_CHAIN], "disk full");
    assert!(h[names::FAILURE_ERROR_TYPE].ends_with("WrappedError"));
    assert!(rhinobus::headers::parse_time(&h[names::FAILURE_TIME]).is_some());
    assert_eq!(h[names::FAILED_TIMES], "1");
    raw.cleanup().await;
}

#[derive(Debug)]
struct WrappedError(std::io::Error);

impl std::fmt::Display for WrappedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("wrapped failure")
    }
}
impl std::error::Error for WrappedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

#[tokio::test]
async fn an_error_no_retry_can_mend_goes_to_the_error_queue_after_one_attempt() {
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("unrecoverable").await;
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let ep = Endpoint::builder(&queue, rabbit())
        .error_queue(&error)
        .immediate_retries(3)
        .delayed_retries(DelayedRetries {
            max: 2,
            delay: Duration::from_secs(30),
            multiplier: 1,
        })
        .unrecoverable::<WrappedError>()
        .handle(move |_: Work, _: Context| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Err(WrappedError(std::io::Error::other("no such product")))? }
        })
        .start()
        .await
        .expect("start");
    ep.bus().send(&queue, &Work { n: 4 }).await.unwrap();
    // Retried, it would wait 30 s in a delay queue first.
    raw.wait_for_count(&error, 1, Duration::from_secs(10)).await;
    ep.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "not retried");
    let failed = raw.drain(&error).await;
    let (h, b) = &failed[0];
    assert_eq!(rhinobus::message::decode::<Work>(b).unwrap().n, 4);
    assert_eq!(h[names::FAILURE_REASON], "unrecoverable");
    assert_eq!(h[names::FAILURE_ATTEMPTS], "1");
    assert_eq!(h[names::FAILURE_ERROR_CHAIN], "no such product");
    assert!(h[names::FAILURE_ERROR_TYPE].ends_with("WrappedError"));
    raw.cleanup().await;
}

fn rmp_body<M: Message>(m: &M) -> Vec<u8> {
    rhinobus::message::encode(m).expect("encode")
}

#[tokio::test]
async fn garbage_unknown_types_and_unhandled_types_go_straight_to_the_error_queue() {
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("garbage").await;
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let ep = Endpoint::builder(&queue, rabbit())
        .error_queue(&error)
        .handle(move |_: Work, _: Context| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .expect("start");
    let typed = |t: &str| {
        let mut h = FieldTable::default();
        h.insert(names::MESSAGE_TYPE.into(), AMQPValue::LongString(t.into()));
        h
    };
    raw.publish(&queue, b"\xc1\xff not msgpack", typed(Work::NAME))
        .await;
    raw.publish(&queue, b"no headers at all", FieldTable::default())
        .await;
    raw.publish(&queue, &rmp_body(&Done { n: 1 }), typed(Done::NAME))
        .await;
    raw.wait_for_count(&error, 3, WAIT).await;
    ep.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let failed = raw.drain(&error).await;
    let reasons: Vec<_> = failed
        .iter()
        .map(|(h, _)| h[names::FAILURE_REASON].as_str())
        .collect();
    assert_eq!(reasons, ["decode", "missing-type", "no-handler"]);
    assert_eq!(failed[0].1, b"\xc1\xff not msgpack");
    assert!(failed[2].0[names::FAILURE_ERROR_MESSAGE].contains(Done::NAME));
    raw.cleanup().await;
}

/// An endpoint on `queue` whose handler sends a [`Done`] to each of `targets`, then fails
/// until its attempt number reaches `succeed_at`.
async fn sending_endpoint(
    queue: &str,
    error: &str,
    targets: Vec<String>,
    succeed_at: u32,
) -> Endpoint {
    Endpoint::builder(queue, rabbit())
        .error_queue(error)
        .handle(move |w: Work, ctx: Context| {
            let targets = targets.clone();
            async move {
                for target in &targets {
                    ctx.send(target, &Done { n: w.n })?;
                }
                if ctx.attempt() < succeed_at {
                    return Err(HandlerError::msg("not yet"));
                }
                Ok(())
            }
        })
        .start()
        .await
        .expect("start")
}

#[tokio::test]
async fn a_failed_handlers_sends_are_discarded() {
    let mut raw = Raw::connect().await;
    let (queue, out, error) = (unique("discard"), unique("out"), unique("error"));
    raw.queue(&queue).await;
    raw.queue(&out).await;
    raw.forget_later(&error);
    let ep = sending_endpoint(&queue, &error, vec![out.clone()], 3).await;
    ep.bus().send(&queue, &Work { n: 3 }).await.expect("send");
    raw.wait_for_count(&out, 1, WAIT).await;
    ep.shutdown().await;
    let sent = raw.drain(&out).await;
    assert_eq!(sent.len(), 1, "only the successful attempt's send went out");
    assert_eq!(raw.count(&error).await, 0);
    raw.cleanup().await;
}

/// A handler sending to a queue that exists and to one that does not sends neither: the batch
/// is all or nothing, on every attempt, and the message ends in the error queue.
#[tokio::test]
async fn a_handler_sending_to_a_missing_queue_sends_nothing_at_all() {
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("half").await;
    let (out, missing) = (unique("out"), unique("missing"));
    raw.queue(&out).await;
    let ep = sending_endpoint(&queue, &error, vec![out.clone(), missing.clone()], 1).await;
    ep.bus().send(&queue, &Work { n: 1 }).await.expect("send");
    raw.wait_for_count(&error, 1, WAIT).await;
    ep.shutdown().await;
    assert_eq!(
        raw.count(&out).await,
        0,
        "nothing of the failed batch went out"
    );
    let failed = raw.drain(&error).await;
    let message = failed[0]
        .0
        .get(names::FAILURE_ERROR_MESSAGE)
        .expect("error message");
    assert!(message.contains(&missing), "{message}");
    raw.cleanup().await;
}

/// The error queue deleted by hand: a failed message cannot be moved there, so it goes back
/// to its queue, but only after a pause, not straight into another round of handler runs.
#[tokio::test]
async fn a_message_that_cannot_reach_the_error_queue_comes_back_after_a_pause() {
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("unsettled").await;
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let ep = Endpoint::builder(&queue, rabbit())
        .error_queue(&error)
        .immediate_retries(0)
        .concurrency(4)
        .handle(move |_: Work, _: Context| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(HandlerError::msg("always fails")) }
        })
        .start()
        .await
        .expect("start");
    raw.channel
        .queue_delete(error.as_str().into(), Default::default())
        .await
        .expect("delete the error queue");
    // Sent on a connection of its own. On the endpoint's, this send and the endpoint's attempt
    // to move the message to the missing error queue share a channel, and lapin can pin the
    // broker's return of the second on the confirm of the first (a known bug, README).
    let sender = rhinobus::Bus::new(rabbit(), unique("sender"));
    sender.send(&queue, &Work { n: 1 }).await.expect("send");
    // One attempt, a pause of a second while the delivery is held, then the next: never more
    // than two attempts in 1.5 s, however loaded the machine (without the pause, each of the
    // four slots ran it again at once).
    let start = tokio::time::Instant::now();
    while calls.load(Ordering::SeqCst) == 0 {
        assert!(start.elapsed() < WAIT, "never handled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let attempts = calls.load(Ordering::SeqCst);
    assert!(attempts <= 2, "{attempts} attempts in 1.5 s");
    ep.shutdown().await;
    raw.cleanup().await;
}

#[tokio::test]
async fn conflicts_are_retried_on_their_own_budget() {
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("conflict").await;
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let ep = Endpoint::builder(&queue, rabbit())
        .error_queue(&error)
        .immediate_retries(0)
        .handle(move |_: Work, _: Context| {
            let (counter, tx) = (counter.clone(), tx.clone());
            async move {
                if counter.fetch_add(1, Ordering::SeqCst) < 10 {
                    return Err(HandlerError::conflict("stale version"));
                }
                tx.send(())?;
                Ok(())
            }
        })
        .start()
        .await
        .expect("start");
    ep.bus().send(&queue, &Work { n: 1 }).await.expect("send");
    recv(&mut rx).await;
    ep.shutdown().await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        11,
        "10 conflicts, then success, no failure retry used"
    );
    assert_eq!(raw.count(&error).await, 0);
    raw.cleanup().await;
}

#[tokio::test]
async fn delayed_retries_wait_and_come_back_before_the_error_queue() {
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("delayed").await;
    for ms in [300, 600] {
        raw.forget_later(&format!("{queue}.delay.{ms}ms"));
    }
    let times = Arc::new(Mutex::new(Vec::new()));
    let seen = times.clone();
    let ep = Endpoint::builder(&queue, rabbit())
        .error_queue(&error)
        .immediate_retries(1)
        .delayed_retries(DelayedRetries {
            max: 2,
            delay: Duration::from_millis(300),
            multiplier: 2,
        })
        .handle(move |_: Work, _: Context| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(tokio::time::Instant::now());
                Err::<(), _>(HandlerError::msg("still broken"))
            }
        })
        .start()
        .await
        .expect("start");
    ep.bus().send(&queue, &Work { n: 1 }).await.expect("send");
    raw.wait_for_count(&error, 1, WAIT).await;
    ep.shutdown().await;
    let times = times.lock().unwrap().clone();
    assert_eq!(times.len(), 6, "3 rounds (first + 2 delayed) of 2 attempts");
    // Each delayed round starts no earlier than its delay after the round before.
    assert!(times[2] - times[1] >= Duration::from_millis(300));
    assert!(times[4] - times[3] >= Duration::from_millis(600));
    let failed = raw.drain(&error).await;
    assert_eq!(failed[0].0[names::DELAYED_RETRIES], "2");
    raw.cleanup().await;
}

#[tokio::test]
async fn closing_the_connection_mid_stream_loses_nothing() {
    init_tracing();
    const N: u32 = 3000;
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("reconnect").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let ep = Endpoint::builder(&queue, rabbit())
        .error_queue(&error)
        .concurrency(16)
        .handle(move |w: Work, _: Context| {
            let tx = tx.clone();
            async move {
                tokio::time::sleep(Duration::from_micros(200)).await;
                tx.send(w.n)?;
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .expect("start");
    // A separate sender on its own connection, which must not be disturbed.
    let sender_name = unique("sender");
    let sender = rhinobus::Bus::new(rabbit().connection_name(&sender_name), &sender_name);
    let sending = tokio::spawn({
        let (sender, queue) = (sender.clone(), queue.clone());
        async move {
            for n in 0..N {
                sender.send(&queue, &Work { n }).await.expect("send");
            }
        }
    });
    let mut seen = HashSet::new();
    while seen.len() < 500 {
        seen.insert(recv(&mut rx).await);
    }
    let victims = connections_named(&queue);
    assert_eq!(
        victims.len(),
        1,
        "exactly the endpoint's connection: {victims:?}"
    );
    rabbitmqctl(&[
        "close_connection",
        &victims[0],
        "test: simulated connection loss",
    ]);
    while seen.len() < N as usize {
        seen.insert(recv(&mut rx).await);
    }
    sending
        .await
        .expect("sender kept its connection and sent everything");
    assert_eq!(
        connections_named(&sender_name).len(),
        1,
        "the sender's connection was left alone"
    );
    ep.shutdown().await;
    assert_eq!(raw.count(&error).await, 0);
    raw.cleanup().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_messages_and_leaves_the_rest_queued() {
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("shutdown").await;
    let finished = Arc::new(AtomicU32::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let done = finished.clone();
    let ep = Endpoint::builder(&queue, rabbit())
        .error_queue(&error)
        .concurrency(4)
        .handle(move |_: Work, _: Context| {
            let (done, started_tx) = (done.clone(), started_tx.clone());
            async move {
                started_tx.send(())?;
                tokio::time::sleep(Duration::from_millis(500)).await;
                done.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .expect("start");
    for n in 0..20 {
        ep.bus().send(&queue, &Work { n }).await.expect("send");
    }
    for _ in 0..4 {
        recv(&mut started).await;
    }
    ep.shutdown().await;
    let finished = finished.load(Ordering::SeqCst);
    assert!(finished >= 4, "in-flight handlers finished: {finished}");
    // Whatever was not finished is back in the queue: nothing is lost.
    raw.wait_for_count(&queue, 20 - finished, WAIT).await;
    assert_eq!(raw.count(&queue).await, 20 - finished);
    raw.cleanup().await;
}

/// Acks are coalesced into one `multiple` ack per run of handled deliveries, which can never
/// pass a delivery still being handled: the acks behind a stuck handler must still go out.
#[tokio::test]
async fn a_stuck_handler_does_not_hold_back_the_acks_of_the_others() {
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("stuck").await;
    let unstick = Arc::new(tokio::sync::Notify::new());
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let wait = unstick.clone();
    let ep = Endpoint::builder(&queue, rabbit())
        .error_queue(&error)
        .concurrency(8)
        .handle(move |w: Work, _: Context| {
            let (wait, done_tx) = (wait.clone(), done_tx.clone());
            async move {
                if w.n == 0 {
                    wait.notified().await;
                }
                done_tx.send(w.n)?;
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .expect("start");
    // Not a multiple of 3, so that the last acks are held: with concurrency 8, more than 2
    // acks above the stuck delivery go out at once.
    const OTHERS: u32 = 32;
    for n in 0..=OTHERS {
        ep.bus().send(&queue, &Work { n }).await.expect("send");
    }
    for _ in 1..=OTHERS {
        assert_ne!(recv(&mut done).await, 0, "0 is stuck");
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while unacknowledged(&queue) != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "acks of handled messages held back: {} unacknowledged, 1 stuck",
            unacknowledged(&queue)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unstick.notify_one();
    assert_eq!(recv(&mut done).await, 0);
    ep.shutdown().await;
    assert_eq!((raw.count(&queue).await, unacknowledged(&queue)), (0, 0));
    raw.cleanup().await;
}

/// Two endpoints on one transport stop together: the one with nothing in flight must not
/// close the connection under the other, whose handler is still finishing and sending.
#[tokio::test]
async fn endpoints_stopping_together_let_each_other_finish() {
    let mut raw = Raw::connect().await;
    let (idle, error) = raw.endpoint_queues("together-idle").await;
    let (busy, _) = raw.endpoint_queues("together-busy").await;
    let out = unique("together-out");
    raw.queue(&out).await;
    let transport = rabbit();
    let (tx, _) = mpsc::unbounded_channel();
    let a = Endpoint::builder(&idle, transport.clone())
        .error_queue(&error)
        .handle(ReportWork(tx))
        .start()
        .await
        .expect("start the idle endpoint");
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let to = out.clone();
    let b = Endpoint::builder(&busy, transport.clone())
        .error_queue(&error)
        .handle(move |w: Work, ctx: Context| {
            let (started_tx, to) = (started_tx.clone(), to.clone());
            async move {
                started_tx.send(())?;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                ctx.send(&to, &w)?;
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .expect("start the busy endpoint");
    b.bus().send(&busy, &Work { n: 1 }).await.expect("send");
    recv(&mut started).await;
    let (stop_a, stop_b) = (a.shutdown_handle(), b.shutdown_handle());
    stop_a.shutdown();
    stop_b.shutdown();
    a.stopped().await;
    b.stopped().await;
    raw.wait_for_count(&out, 1, WAIT).await;
    assert_eq!(
        raw.count(&busy).await,
        0,
        "the busy endpoint's message was acked"
    );
    assert_eq!(raw.count(&error).await, 0);
    raw.cleanup().await;
}

#[tokio::test]
async fn endpoints_sharing_a_transport_keep_it_open_for_each_other() {
    let mut raw = Raw::connect().await;
    let (first, error) = raw.endpoint_queues("shared-a").await;
    let (second, _) = raw.endpoint_queues("shared-b").await;
    let transport = rabbit();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let start = |name: &str| {
        Endpoint::builder(name, transport.clone())
            .error_queue(&error)
            .handle(ReportWork(tx.clone()))
            .start()
    };
    let a = start(&first).await.expect("start a");
    let b = start(&second).await.expect("start b");
    a.shutdown().await;
    b.bus()
        .send(&second, &Work { n: 2 })
        .await
        .expect("b still sends");
    assert_eq!(recv(&mut rx).await, 2, "b still receives");
    b.shutdown().await;
    raw.cleanup().await;
}

#[tokio::test]
async fn a_foreign_message_s_ttl_user_id_and_transience_do_not_lose_it_in_the_error_queue() {
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("foreign").await;
    let ep = Endpoint::builder(&queue, rabbit())
        .error_queue(&error)
        .handle(|_: Work, _: Context| async { Ok::<_, HandlerError>(()) })
        .start()
        .await
        .expect("start");
    // Published by another broker user, with its own user id and a 1 s TTL, and not
    // decodable: it goes to the error queue, and must stay there.
    let user = unique("user");
    rabbitmqctl(&["add_user", &user, "secret"]);
    let _delete = RabbitmqctlOnDrop::new(&["delete_user", &user]);
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let url = amqp_url().replacen("guest:guest@", &format!("{user}:secret@"), 1);
    assert_ne!(url, amqp_url(), "the test URL names the guest user");
    let foreign = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("connect as the other user");
    let channel = foreign.create_channel().await.expect("channel");
    let mut headers = FieldTable::default();
    headers.insert(
        names::MESSAGE_TYPE.into(),
        AMQPValue::LongString(Work::NAME.into()),
    );
    // Transient too: a copy parked in the error queue must survive a broker restart.
    let props = lapin::BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(1)
        .with_user_id(user.as_str().into());
    let publish = |queue: &str, ttl: &str| {
        let props = props.clone().with_expiration(ttl.into());
        let (channel, queue) = (channel.clone(), queue.to_owned());
        async move {
            let opts = lapin::options::BasicPublishOptions::default();
            (channel.basic_publish("".into(), queue.as_str().into(), opts, b"\xc1 x", props))
                .await
                .expect("publish")
                .await
                .expect("confirm");
        }
    };
    publish(&queue, "1000").await;
    raw.wait_for_count(&error, 1, WAIT).await;
    // Longer than its TTL: with the TTL kept, the broker would have discarded it.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    ep.shutdown().await;
    assert_eq!(
        raw.count(&error).await,
        1,
        "still in the error queue after its TTL"
    );
    // One put straight into the error queue by that user: the CLI moves it too.
    publish(&error, "60000").await;
    let target = unique("target");
    raw.queue(&target).await;
    let (ok, _, err) = rhinobus_cli(&[
        "errors", "--queue", &error, "replay", "--all", "--to", &target,
    ]);
    assert!(ok, "replay: {err}");
    let mut moved = Vec::new();
    while let Some(m) = (raw.channel)
        .basic_get(
            target.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
    {
        let props = &m.delivery.properties;
        assert_eq!(*props.delivery_mode(), Some(2), "persistent");
        assert_eq!(m.delivery.data, b"\xc1 x");
        moved.push(RabbitMq::headers_of(props));
    }
    assert_eq!(moved.len(), 2, "both replayed");
    for h in &moved {
        assert_eq!(h[names::ORIGINAL_USER_ID], user);
    }
    let (first, second) = (&moved[0], &moved[1]);
    assert_eq!(
        first[&format!("{}reason", names::PREVIOUS_FAILURE_PREFIX)],
        "decode"
    );
    assert_eq!(first[names::ORIGINAL_EXPIRATION], "1000");
    assert_eq!(second[names::ORIGINAL_EXPIRATION], "60000");
    let _ = foreign.close(200, "done".into()).await;
    raw.cleanup().await;
}
