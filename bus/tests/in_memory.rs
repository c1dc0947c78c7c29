//! The in-memory transport gives endpoints the same semantics as RabbitMQ.

use rhinobus::headers::names;
use rhinobus::transport::{Destination, InMemory, OutgoingMessage, Transport};
use rhinobus::{Context, DelayedRetries, Endpoint, HandlerError, Headers, Message};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

#[derive(Debug, Serialize, Deserialize)]
struct Work {
    n: u32,
}
impl Message for Work {
    const NAME: &'static str = "tests.work";
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn counting_failures(
    calls: &Arc<AtomicU32>,
) -> impl Fn(Work, Context) -> futures_util::future::Ready<Result<(), HandlerError>>
+ Send
+ Sync
+ 'static {
    let calls = calls.clone();
    move |_, _| {
        calls.fetch_add(1, Ordering::SeqCst);
        futures_util::future::ready(Err(HandlerError::msg("always fails")))
    }
}

#[tokio::test]
async fn failures_are_retried_then_moved_to_the_error_queue() {
    let broker = InMemory::new();
    let calls = Arc::new(AtomicU32::new(0));
    let ep = Endpoint::builder("worker", broker.clone())
        .immediate_retries(2)
        .delayed_retries(DelayedRetries {
            max: 1,
            delay: Duration::from_millis(20),
            multiplier: 1,
        })
        .handle(counting_failures(&calls))
        .start()
        .await
        .unwrap();
    ep.bus().send("worker", &Work { n: 1 }).await.unwrap();
    wait_until("the error queue", || broker.queue_len("error") == 1).await;
    ep.shutdown().await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        6,
        "two rounds of 1 + 2 attempts"
    );
    let (headers, body) = broker.take("error").unwrap();
    assert_eq!(rhinobus::message::decode::<Work>(&body).unwrap().n, 1);
    assert_eq!(headers[names::FAILURE_REASON], "handler");
    assert_eq!(headers[names::FAILURE_ATTEMPTS], "3");
    assert_eq!(headers[names::DELAYED_RETRIES], "1");
    assert_eq!(headers[names::FAILURE_ERROR_MESSAGE], "always fails");
}

#[tokio::test]
async fn zero_immediate_retries_means_one_attempt() {
    let broker = InMemory::new();
    let calls = Arc::new(AtomicU32::new(0));
    let ep = Endpoint::builder("once", broker.clone())
        .immediate_retries(0)
        .handle(counting_failures(&calls))
        .start()
        .await
        .unwrap();
    ep.bus().send("once", &Work { n: 1 }).await.unwrap();
    wait_until("the error queue", || broker.queue_len("error") == 1).await;
    ep.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn panics_are_failures_not_crashes() {
    let broker = InMemory::new();
    let ep = Endpoint::builder("panicky", broker.clone())
        .immediate_retries(1)
        .handle(|w: Work, _: Context| async move {
            assert!(w.n > 100, "n too small");
            Ok::<_, HandlerError>(())
        })
        .start()
        .await
        .unwrap();
    ep.bus().send("panicky", &Work { n: 1 }).await.unwrap();
    wait_until("the error queue", || broker.queue_len("error") == 1).await;
    ep.shutdown().await;
    let (headers, _) = broker.take("error").unwrap();
    assert!(headers[names::FAILURE_ERROR_MESSAGE].contains("n too small"));
}

#[tokio::test]
async fn undecodable_and_unknown_messages_go_straight_to_the_error_queue() {
    let broker = InMemory::new();
    let calls = Arc::new(AtomicU32::new(0));
    let ep = Endpoint::builder("strict", broker.clone())
        .handle(counting_failures(&calls))
        .start()
        .await
        .unwrap();
    let raw = |t: Option<&str>, body: &[u8]| {
        let mut headers = Headers::new();
        if let Some(t) = t {
            headers.insert(names::MESSAGE_TYPE.into(), t.into());
        }
        OutgoingMessage {
            destination: Destination::Queue("strict".into()),
            headers,
            body: body.to_vec(),
        }
    };
    broker
        .send(vec![
            raw(Some(Work::NAME), b"\xc1garbage"),
            raw(None, b"{}"),
            raw(Some("tests.unknown"), b"\x80"),
        ])
        .await
        .unwrap();
    wait_until("the error queue", || broker.queue_len("error") == 3).await;
    ep.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let mut reasons = Vec::new();
    while let Some((h, _)) = broker.take("error") {
        reasons.push(h[names::FAILURE_REASON].clone());
    }
    assert_eq!(reasons, ["decode", "missing-type", "no-handler"]);
}

/// A message type whose `Deserialize` panics on every body.
#[derive(Debug, Serialize)]
struct Fragile {
    n: u32,
}
impl<'de> Deserialize<'de> for Fragile {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        panic!("fragile types break")
    }
}
impl Message for Fragile {
    const NAME: &'static str = "tests.fragile";
}

#[tokio::test]
async fn a_panicking_deserialize_sends_the_message_to_the_error_queue_once() {
    let broker = InMemory::new();
    let ep = Endpoint::builder("fragile", broker.clone())
        .handle(|_: Fragile, _: Context| async { Ok::<_, HandlerError>(()) })
        .start()
        .await
        .unwrap();
    ep.bus().send("fragile", &Fragile { n: 1 }).await.unwrap();
    wait_until("the error queue", || broker.queue_len("error") == 1).await;
    ep.shutdown().await;
    let (headers, _) = broker.take("error").unwrap();
    assert_eq!(headers[names::FAILURE_REASON], "decode");
    assert!(
        headers[names::FAILURE_ERROR_MESSAGE].contains("fragile types break"),
        "{headers:?}"
    );
    assert_eq!(broker.queue_len("fragile"), 0, "not redelivered");
}

#[tokio::test]
async fn shutdown_returns_unstarted_messages_to_the_queue() {
    let broker = InMemory::new();
    let started = Arc::new(AtomicU32::new(0));
    let handled = Arc::new(AtomicU32::new(0));
    let (on_start, seen) = (started.clone(), handled.clone());
    let ep = Endpoint::builder("slow", broker.clone())
        .concurrency(2)
        .handle(move |_: Work, _: Context| {
            let (on_start, seen) = (on_start.clone(), seen.clone());
            async move {
                on_start.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                seen.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .unwrap();
    for n in 0..10 {
        ep.bus().send("slow", &Work { n }).await.unwrap();
    }
    // Stop while both handlers are busy.
    while started.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    ep.shutdown().await;
    let handled = handled.load(Ordering::SeqCst);
    assert!(handled >= 2, "the in-flight messages finished: {handled}");
    assert_eq!(handled, started.load(Ordering::SeqCst), "every started one");
    assert_eq!(broker.queue_len("slow") as u32, 10 - handled);
}

#[tokio::test]
async fn a_publish_nobody_subscribes_to_is_not_an_error_but_a_send_to_nowhere_is() {
    let broker = InMemory::new();
    let bus = rhinobus::Bus::new(broker, "client");
    bus.publish(&Work { n: 1 }).await.unwrap();
    let err = bus.send("nowhere", &Work { n: 1 }).await.unwrap_err();
    assert!(err.to_string().contains("nowhere"), "{err}");
}

#[tokio::test]
async fn a_deferred_message_comes_back_after_its_delay_and_a_stored_one_keeps_its_time() {
    let broker = InMemory::new();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let ep = Endpoint::builder("reminders", broker.clone())
        .handle(move |w: Work, ctx: Context| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push((w.n, tokio::time::Instant::now()));
                if w.n == 1 {
                    ctx.defer(&Work { n: 2 }, Duration::from_millis(300))?;
                }
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .unwrap();
    ep.bus().send("reminders", &Work { n: 1 }).await.unwrap();
    wait_until("the reminder", || seen.lock().unwrap().len() == 2).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!((seen[0].0, seen[1].0), (1, 2));
    assert!(seen[1].1 - seen[0].1 >= Duration::from_millis(300));

    // A message built with a delay and sent later keeps the time it was built for.
    let ctx = Context::detached(ep.bus().clone(), Headers::new());
    let built = ctx
        .envelope(
            Destination::Queue("held".into()),
            &Work { n: 3 },
            rhinobus::SendOptions::delayed_by(Duration::from_millis(200)),
        )
        .unwrap();
    assert!(built.remaining_delay().unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(built.remaining_delay().unwrap(), None, "its time has come");
    broker.declare_queue("held");
    broker.send(vec![built]).await.unwrap();
    assert_eq!(broker.queue_len("held"), 1, "sent at once");

    // A time set by hand further off than the longest delay is refused, not cut short.
    let mut far = ctx
        .envelope(
            Destination::Queue("held".into()),
            &Work { n: 4 },
            Default::default(),
        )
        .unwrap();
    let beyond = std::time::SystemTime::now() + rhinobus::MAX_DELAY + Duration::from_secs(60);
    let at = rhinobus::headers::format_time(beyond);
    far.headers.insert(names::DELIVER_AT.into(), at);
    let too_long = far.remaining_delay();
    assert!(
        matches!(too_long, Err(rhinobus::BusError::Invalid(_))),
        "{too_long:?}"
    );
    assert!(broker.send(vec![far]).await.is_err());
    assert_eq!(broker.queue_len("held"), 1);
    ep.shutdown().await;
}

#[tokio::test]
async fn handled_messages_are_copied_to_the_audit_queue_and_failed_ones_are_not() {
    let broker = InMemory::new();
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let ep = Endpoint::builder("audited", broker.clone())
        .immediate_retries(1)
        .audit_queue("audit")
        .handle(move |w: Work, _: Context| {
            // n = 1 fails once then succeeds; n = 2 always fails.
            let call = counted.fetch_add(1, Ordering::SeqCst);
            futures_util::future::ready(if w.n == 2 || call == 0 {
                Err(HandlerError::msg("not now"))
            } else {
                Ok(())
            })
        })
        .start()
        .await
        .unwrap();
    let before = std::time::SystemTime::now();
    ep.bus().send("audited", &Work { n: 1 }).await.unwrap();
    wait_until("the audit copy", || broker.queue_len("audit") == 1).await;
    ep.bus().send("audited", &Work { n: 2 }).await.unwrap();
    wait_until("the failure", || broker.queue_len("error") == 1).await;
    ep.shutdown().await;
    assert_eq!(
        broker.queue_len("audit"),
        1,
        "the failed message is not audited"
    );
    assert_eq!(broker.queue_len("audited"), 0);
    let (headers, body) = broker.take("audit").unwrap();
    assert_eq!(rhinobus::message::decode::<Work>(&body).unwrap().n, 1);
    assert_eq!(headers[names::PROCESSING_ENDPOINT], "audited");
    assert_eq!(headers[names::PROCESSING_QUEUE], "audited");
    let host = &headers[names::PROCESSING_HOST];
    assert!(
        host.ends_with(&format!("(pid {})", std::process::id())),
        "{host}"
    );
    assert_eq!(
        headers[names::PROCESSING_ATTEMPTS],
        "2",
        "one failure, then success"
    );
    assert_eq!(
        headers[names::MESSAGE_TYPE],
        Work::NAME,
        "the envelope is kept"
    );
    let time = |name: &str| rhinobus::headers::parse_time(&headers[name]).unwrap();
    let (started, ended) = (
        time(names::PROCESSING_STARTED),
        time(names::PROCESSING_ENDED),
    );
    let ms = Duration::from_millis(1);
    assert!(
        started + ms >= before && ended >= started,
        "{started:?} {ended:?}"
    );
    let (failed, _) = broker.take("error").unwrap();
    assert!(!failed.contains_key(names::PROCESSING_ENDPOINT));
}

#[tokio::test]
async fn an_audit_queue_without_a_name_or_named_as_another_of_the_endpoint_s_queues_is_refused() {
    for audit in ["", "worker", "error", "worker.delay.1000ms"] {
        let err = Endpoint::builder("worker", InMemory::new())
            .delayed_retries(DelayedRetries {
                max: 1,
                delay: Duration::from_secs(1),
                multiplier: 1,
            })
            .audit_queue(audit)
            .handle(|_: Work, _: Context| async { Ok::<_, HandlerError>(()) })
            .start()
            .await
            .unwrap_err();
        assert!(
            matches!(err, rhinobus::BusError::Config(_)),
            "{audit:?}: {err}"
        );
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Quote {
    n: u32,
}
impl Message for Quote {
    const NAME: &'static str = "tests.quote";
    const TIME_TO_BE_RECEIVED: Option<Duration> = Some(Duration::from_millis(100));
}

/// The `rhinobus-discard-after` header of an envelope built with `options`.
fn discard_after<M: Message>(m: &M, options: rhinobus::SendOptions) -> std::time::SystemTime {
    let ctx = Context::detached(rhinobus::Bus::new(InMemory::new(), "x"), Headers::new());
    let built = ctx
        .envelope(Destination::Queue("q".into()), m, options)
        .unwrap();
    rhinobus::headers::parse_time(&built.headers[names::DISCARD_AFTER]).unwrap()
}

#[tokio::test]
async fn a_message_received_after_its_time_is_dropped_unhandled_and_one_within_it_is_handled() {
    let broker = InMemory::new();
    broker.declare_queue("quotes");
    let bus = rhinobus::Bus::new(broker.clone(), "app");
    let brief = || rhinobus::SendOptions::default().time_to_be_received(Duration::from_millis(100));
    let long = rhinobus::SendOptions::default().time_to_be_received(Duration::from_secs(60));
    bus.send("quotes", &Quote { n: 1 }).await.unwrap();
    bus.send_with("quotes", &Work { n: 2 }, brief())
        .await
        .unwrap();
    bus.send_with("quotes", &Quote { n: 3 }, long)
        .await
        .unwrap();
    bus.send("quotes", &Work { n: 4 }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let handled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (quotes, works) = (handled.clone(), handled.clone());
    let ep = Endpoint::builder("quotes", broker.clone())
        .handle(move |q: Quote, _| {
            quotes.lock().unwrap().push(q.n);
            async { Ok::<_, HandlerError>(()) }
        })
        .handle(move |w: Work, _| {
            works.lock().unwrap().push(w.n);
            async { Ok::<_, HandlerError>(()) }
        })
        .start()
        .await
        .unwrap();
    wait_until("3 and 4", || handled.lock().unwrap().len() == 2).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    ep.shutdown().await;
    let mut handled = handled.lock().unwrap().clone();
    handled.sort();
    assert_eq!(
        handled,
        [3, 4],
        "1 (its type's 100 ms) and 2 (its send's 100 ms) came too late"
    );
    assert_eq!(broker.queue_len("error"), 0, "dropped, not failed");
    assert_eq!(broker.queue_len("quotes"), 0, "dropped, not left unstarted");
}

#[test]
fn the_time_to_be_received_counts_from_the_send_or_when_a_delayed_send_is_due() {
    let now = std::time::SystemTime::now();
    let by_type = discard_after(&Quote { n: 1 }, Default::default());
    let by_type = by_type.duration_since(now).unwrap();
    assert!(
        (Duration::from_millis(99)..Duration::from_millis(2000)).contains(&by_type),
        "{by_type:?}"
    );
    let options = rhinobus::SendOptions::default().time_to_be_received(Duration::from_secs(60));
    let by_send = discard_after(&Quote { n: 1 }, options)
        .duration_since(now)
        .unwrap();
    assert!(
        by_send >= Duration::from_secs(60),
        "the send's wins: {by_send:?}"
    );

    let delayed = rhinobus::SendOptions::delayed_by(Duration::from_secs(3600))
        .time_to_be_received(Duration::from_secs(5));
    let ctx = Context::detached(rhinobus::Bus::new(InMemory::new(), "x"), Headers::new());
    let built = ctx
        .envelope(Destination::Queue("q".into()), &Work { n: 1 }, delayed)
        .unwrap();
    let at = |name: &str| rhinobus::headers::parse_time(&built.headers[name]).unwrap();
    assert_eq!(
        at(names::DISCARD_AFTER)
            .duration_since(at(names::DELIVER_AT))
            .unwrap(),
        Duration::from_secs(5)
    );
    assert!(built.time_left().unwrap().unwrap() > Duration::from_secs(3600));

    for refused in [
        Duration::ZERO,
        rhinobus::MAX_TIME_TO_BE_RECEIVED + Duration::from_millis(1),
    ] {
        let options = rhinobus::SendOptions::default().time_to_be_received(refused);
        let built = ctx.envelope(Destination::Queue("q".into()), &Work { n: 1 }, options);
        assert!(
            matches!(built, Err(rhinobus::BusError::Invalid(_))),
            "{refused:?}: {built:?}"
        );
    }
}

#[tokio::test]
async fn a_message_whose_time_runs_out_between_delayed_retries_is_dropped_not_failed() {
    let broker = InMemory::new();
    let calls = Arc::new(AtomicU32::new(0));
    let ep = Endpoint::builder("fragile", broker.clone())
        .immediate_retries(0)
        .delayed_retries(DelayedRetries {
            max: 3,
            delay: Duration::from_secs(3),
            multiplier: 1,
        })
        .handle(counting_failures(&calls))
        .start()
        .await
        .unwrap();
    let brief = rhinobus::SendOptions::default().time_to_be_received(Duration::from_secs(1));
    ep.bus()
        .send_with("fragile", &Work { n: 1 }, brief)
        .await
        .unwrap();
    wait_until("the first attempt", || calls.load(Ordering::SeqCst) == 1).await;
    // Back from its first delay, 3 s on: past its time.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    wait_until("the queue to empty", || broker.queue_len("fragile") == 0).await;
    ep.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "not tried again");
    assert_eq!(
        broker.queue_len("fragile"),
        0,
        "dropped, not left unstarted"
    );
    assert_eq!(broker.queue_len("error"), 0, "dropped, not failed");
}

#[derive(Debug, thiserror::Error)]
#[error("invalid order {0}")]
struct InvalidOrder(u32);

#[tokio::test]
async fn failures_no_retry_can_mend_go_to_the_error_queue_at_once_and_others_are_retried() {
    let broker = InMemory::new();
    let calls = Arc::new(std::sync::Mutex::new(
        std::collections::BTreeMap::<u32, u32>::new(),
    ));
    let counted = calls.clone();
    let ep = Endpoint::builder("orders", broker.clone())
        .immediate_retries(2)
        .delayed_retries(DelayedRetries {
            max: 1,
            delay: Duration::from_millis(20),
            multiplier: 1,
        })
        .unrecoverable::<InvalidOrder>()
        .handle(move |w: Work, _| {
            *counted.lock().unwrap().entry(w.n).or_default() += 1;
            async move {
                match w.n {
                    1 => Err(HandlerError::unrecoverable("no such product")),
                    2 => Err(InvalidOrder(2))?,
                    _ => Err(HandlerError::msg("the warehouse is down")),
                }
            }
        })
        .start()
        .await
        .unwrap();
    for n in 1..=3 {
        ep.bus().send("orders", &Work { n }).await.unwrap();
    }
    wait_until("the error queue", || broker.queue_len("error") == 3).await;
    ep.shutdown().await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(
        calls.into_iter().collect::<Vec<_>>(),
        [(1, 1), (2, 1), (3, 6)],
        "3 has two rounds of 1 + 2 attempts"
    );
    let mut failed = std::collections::BTreeMap::new();
    while let Some((headers, body)) = broker.take("error") {
        failed.insert(rhinobus::message::decode::<Work>(&body).unwrap().n, headers);
    }
    let header = |n: u32, name: &str| failed[&n][name].clone();
    for n in [1, 2] {
        assert_eq!(header(n, names::FAILURE_REASON), "unrecoverable");
        assert_eq!(header(n, names::FAILURE_ATTEMPTS), "1");
        assert!(
            !failed[&n].contains_key(names::DELAYED_RETRIES),
            "no delayed round"
        );
    }
    assert_eq!(header(1, names::FAILURE_ERROR_MESSAGE), "no such product");
    assert!(header(2, names::FAILURE_ERROR_TYPE).ends_with("InvalidOrder"));
    assert_eq!(header(3, names::FAILURE_REASON), "handler");
}
