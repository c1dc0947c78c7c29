//! RabbitMQ restarted under a `Requester` and the endpoint answering it: both reconnect, and
//! requests get their replies again.
//!
//! Stopping the broker stops it for everyone, so this is the only test in its binary (cargo runs
//! test binaries one after another).

use rhinobus::transport::RabbitMq;
use rhinobus::{Context, Endpoint, HandlerError, Requester};
use rhinobus_tests::{Raw, Work, amqp_url, init_tracing, rabbitmqctl};
use std::time::Duration;
use tokio::time::Instant;

/// How long one request waits for its reply.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The reply to `Work { n }` is `Work { n: n + 1 }`.
async fn ask(requester: &Requester, queue: &str, n: u32) -> Result<u32, String> {
    let reply: Work =
        (requester.request(queue, &Work { n }, TIMEOUT).await).map_err(|e| e.to_string())?;
    Ok(reply.n)
}

#[tokio::test]
async fn requests_get_their_replies_again_after_a_broker_restart() {
    init_tracing();
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("restart-answers").await;
    let (replies, reply_errors) = raw.endpoint_queues("restart-asks").await;
    let responder = Endpoint::builder(&queue, RabbitMq::new(amqp_url()))
        .error_queue(&error)
        .handle(|w: Work, ctx: Context| async move {
            ctx.reply(&Work { n: w.n + 1 })?;
            Ok::<_, HandlerError>(())
        })
        .start()
        .await
        .expect("start");
    let requester = Requester::builder(&replies, RabbitMq::new(amqp_url()))
        .error_queue(&reply_errors)
        .start()
        .await
        .expect("start the requester");
    for n in 0..20 {
        assert_eq!(ask(&requester, &queue, n).await, Ok(n + 1));
    }
    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    // Requests made while the two reconnect may fail or time out; the caller asks again.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Err(String::new());
    while Instant::now() < deadline {
        last = ask(&requester, &queue, 100).await;
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last, Ok(101), "no reply within a minute of the restart");
    for n in 200..220 {
        assert_eq!(ask(&requester, &queue, n).await, Ok(n + 1));
    }
    requester.shutdown().await;
    responder.shutdown().await;

    // The raw connection died with the broker: inspect and clean up on a new one.
    let mut after = Raw::connect().await;
    assert_eq!(after.count(&error).await, 0, "no request failed");
    for q in [&queue, &error, &replies, &reply_errors] {
        after.forget_later(q);
    }
    after.cleanup().await;
    drop(raw);
}
