//! Time to be received against a real RabbitMQ: the broker drops a message left in a queue
//! past its time, a delayed message's time counts from when it is due, and a failed message
//! stays in the error queue past its time until a replay handles it.

use rhinobus::transport::RabbitMq;
use rhinobus::{Bus, Context, Endpoint, HandlerError, SendOptions};
use rhinobus_tests::{Raw, Work, amqp_url, init_tracing, recv, reporting, rhinobus_cli, unique};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Longest wait for the broker or a handler.
const WAIT: Duration = Duration::from_secs(20);

fn rabbit() -> RabbitMq {
    RabbitMq::new(amqp_url())
}

fn within(time: Duration) -> SendOptions {
    SendOptions::default().time_to_be_received(time)
}

#[tokio::test]
async fn the_broker_drops_a_message_left_in_its_queue_past_its_time() {
    init_tracing();
    let mut raw = Raw::connect().await;
    let queue = unique("ttbr-unread");
    raw.queue(&queue).await;
    let bus = Bus::new(rabbit(), "ttbr-sender");
    let brief = within(Duration::from_millis(300));
    bus.send_with(&queue, &Work { n: 1 }, brief).await.unwrap();
    bus.send(&queue, &Work { n: 2 }).await.unwrap();
    let longest = within(rhinobus::MAX_TIME_TO_BE_RECEIVED);
    bus.send_with(&queue, &Work { n: 3 }, longest)
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while raw.count(&queue).await > 2 {
        assert!(
            Instant::now() < deadline,
            "the broker kept a message past its time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = raw.drain(&queue).await;
    let left: Vec<u32> = (left.iter())
        .map(|(_, body)| rhinobus::message::decode::<Work>(body).unwrap().n)
        .collect();
    assert_eq!(
        left,
        [2, 3],
        "those without a time, or with the longest, stay"
    );
    raw.cleanup().await;
}

#[tokio::test]
async fn a_delayed_send_is_handled_within_its_time_counted_from_when_it_is_due() {
    init_tracing();
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("ttbr-delayed").await;
    let (ep, mut handled) = reporting(&queue, &error).await;
    let sent = Instant::now();
    // Counted from the send, its time would be over before it is due. The delay queues are to
    // the second, rounded up: a delayed message can come a second after it is due, and more on
    // a busy host.
    let options =
        SendOptions::delayed_by(Duration::from_secs(4)).time_to_be_received(Duration::from_secs(3));
    ep.bus()
        .send_with(&queue, &Work { n: 7 }, options)
        .await
        .unwrap();
    assert_eq!(recv(&mut handled).await, 7, "handled, not dropped");
    assert!(
        sent.elapsed() >= Duration::from_secs(4),
        "out of the delay queues after {:?}, before its time",
        sent.elapsed()
    );
    ep.shutdown().await;
    raw.cleanup().await;
}

#[tokio::test]
async fn a_failed_message_outlives_its_time_in_the_error_queue_and_a_replay_handles_it() {
    init_tracing();
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("ttbr-failed").await;
    let failing = Arc::new(AtomicBool::new(true));
    let (tx, mut handled) = tokio::sync::mpsc::unbounded_channel();
    let fails = failing.clone();
    let ep = Endpoint::builder(&queue, rabbit())
        .error_queue(&error)
        .immediate_retries(0)
        .handle(move |w: Work, _: Context| {
            let (fails, tx) = (fails.clone(), tx.clone());
            async move {
                if fails.load(Ordering::SeqCst) {
                    return Err(HandlerError::msg("not yet"));
                }
                tx.send(w.n)?;
                Ok(())
            }
        })
        .start()
        .await
        .expect("start");
    let brief = within(Duration::from_secs(2));
    ep.bus()
        .send_with(&queue, &Work { n: 5 }, brief)
        .await
        .unwrap();
    raw.wait_for_count(&error, 1, WAIT).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        raw.count(&error).await,
        1,
        "kept in the error queue past its time"
    );
    failing.store(false, Ordering::SeqCst);
    let (ok, out, err) = rhinobus_cli(&["errors", "--queue", &error, "replay", "--all"]);
    assert!(ok, "{out}{err}");
    assert_eq!(
        recv(&mut handled).await,
        5,
        "the replay is handled, however late"
    );
    ep.shutdown().await;
    raw.cleanup().await;
}
