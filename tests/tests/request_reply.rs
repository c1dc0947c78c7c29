//! Requests and replies against a real RabbitMQ: concurrent requests each get their own
//! reply, and a reply that comes after its request gave up waits in the requester's error
//! queue.

use rhinobus::headers::names;
use rhinobus::request::{RequestError, Requester};
use rhinobus::transport::RabbitMq;
use rhinobus::{Context, Endpoint, HandlerError, Message};
use rhinobus_tests::{Raw, amqp_url, init_tracing};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

#[derive(Debug, Serialize, Deserialize)]
struct Square {
    n: u64,
    /// Whether the responder waits for the test to let it answer.
    held: bool,
}
impl Message for Square {
    const NAME: &'static str = "tests.square";
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Squared {
    n: u64,
    square: u64,
}
impl Message for Squared {
    const NAME: &'static str = "tests.squared";
}

fn rabbit() -> RabbitMq {
    RabbitMq::new(amqp_url())
}

#[tokio::test]
async fn concurrent_requests_each_get_their_own_reply_and_a_late_one_is_kept() {
    init_tracing();
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("squares").await;
    let (replies, reply_errors) = raw.endpoint_queues("squares-client").await;
    let gate = Arc::new(Notify::new());
    let held = gate.clone();
    let responder = Endpoint::builder(&queue, rabbit())
        .error_queue(&error)
        .concurrency(16)
        .handle(move |s: Square, ctx: Context| {
            let held = held.clone();
            async move {
                if s.held {
                    held.notified().await;
                }
                ctx.reply(&Squared {
                    n: s.n,
                    square: s.n * s.n,
                })?;
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .expect("start");
    let requester = Requester::builder(&replies, rabbit())
        .error_queue(&reply_errors)
        .start()
        .await
        .expect("start the requester");
    let asks = (1..=40).map(|n| {
        let (requester, queue) = (&requester, &queue);
        async move {
            let ask = Square { n, held: false };
            let reply: Squared = requester
                .request(queue, &ask, Duration::from_secs(20))
                .await
                .expect("a reply");
            reply
        }
    });
    let replies = futures_util::future::join_all(asks).await;
    for (n, reply) in (1..=40).zip(replies) {
        assert_eq!(reply, Squared { n, square: n * n });
    }
    let slow = Square { n: 9, held: true };
    let late = requester
        .request::<_, Squared>(&queue, &slow, Duration::from_secs(2))
        .await;
    assert!(matches!(late, Err(RequestError::Timeout(_))), "{late:?}");
    gate.notify_one();
    raw.wait_for_count(&reply_errors, 1, Duration::from_secs(20))
        .await;
    let kept = raw.drain(&reply_errors).await;
    let (headers, body) = &kept[0];
    assert_eq!(headers[names::FAILURE_REASON], "no-request");
    let reply: Squared = rhinobus::message::decode(body).unwrap();
    assert_eq!(reply, Squared { n: 9, square: 81 });
    requester.shutdown().await;
    responder.shutdown().await;
    raw.cleanup().await;
}

/// Whether queue `name` exists, asked on a channel of its own (a failed passive declare
/// closes its channel).
async fn exists(name: &str) -> bool {
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let found = (channel
        .queue_declare(name.into(), passive, Default::default())
        .await)
        .is_ok();
    let _ = conn.close(200, "done".into()).await;
    found
}

#[tokio::test]
async fn a_reply_queue_set_to_expire_goes_once_idle_and_a_clash_of_settings_is_an_error() {
    init_tracing();
    let mut raw = Raw::connect().await;
    let (replies, reply_errors) = raw.endpoint_queues("expiring-asks").await;
    // `endpoint_queues` declared it without an expiry: a requester wanting one cannot use it.
    let clash = Requester::builder(&replies, rabbit())
        .error_queue(&reply_errors)
        .expires_after_idle(Duration::from_secs(1))
        .start()
        .await;
    let clash = clash.expect_err("declared with other settings");
    assert!(clash.to_string().contains("x-expires"), "says why: {clash}");
    let fresh = format!("{replies}-fresh");
    raw.forget_later(&fresh);
    let requester = Requester::builder(&fresh, rabbit())
        .error_queue(&reply_errors)
        .expires_after_idle(Duration::from_secs(1))
        .start()
        .await
        .expect("start the requester");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(exists(&fresh).await, "in use: kept");
    requester.shutdown().await;
    // Untouched meanwhile: a declare, even a passive one, renews the queue's lease.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !exists(&fresh).await,
        "idle for 4 s with an expiry of 1 s: gone"
    );
    raw.cleanup().await;
}
