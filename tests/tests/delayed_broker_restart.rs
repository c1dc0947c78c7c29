//! Delayed messages survive a RabbitMQ restart (`rabbitmqctl stop_app`, then `start_app`) while
//! they wait in the delay queues: each arrives once its time has come, none is lost.
//!
//! Stopping the broker stops it for everyone, so this is the only test in its binary (cargo runs
//! test binaries one after another).

use rhinobus::transport::RabbitMq;
use rhinobus::{Bus, Endpoint, SendOptions};
use rhinobus_tests::{Raw, ReportWork, Work, amqp_url, init_tracing, rabbitmqctl, unique};
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Longest wait for the next delayed message: the broker's restart, the endpoint's reconnect
/// back-off (at most 5 s) and the delay included.
const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn delayed_messages_outlive_a_broker_restart() {
    init_tracing();
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("delayed-restart").await;
    let (tx, mut handled) = mpsc::unbounded_channel();
    let endpoint = Endpoint::builder(&queue, RabbitMq::new(amqp_url()))
        .error_queue(&error)
        .handle(ReportWork(tx))
        .start()
        .await
        .expect("start");
    let sender = Bus::new(RabbitMq::new(amqp_url()), unique("sender"));
    let sent = Instant::now();
    let delay = Duration::from_secs(6); // 110 in binary: two levels wait
    const COUNT: u32 = 50;
    for n in 0..COUNT {
        sender
            .send_with(&queue, &Work { n }, SendOptions::delayed_by(delay))
            .await
            .expect("delayed send");
    }
    // Down from 3.5 s to after 4.5 s: the messages leave the 4 s level while it is down or as
    // it comes back, so the hand-off between levels is what the restart tests.
    tokio::time::sleep_until(sent + Duration::from_millis(3_500)).await;
    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    let mut seen = HashSet::new();
    while seen.len() < COUNT as usize {
        let n = tokio::time::timeout(WAIT, handled.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {COUNT} delayed messages came", seen.len()))
            .expect("handler alive");
        assert!(sent.elapsed() >= delay, "{n} came before its time");
        seen.insert(n);
    }
    assert_eq!(seen, (0..COUNT).collect());
    endpoint.shutdown().await;

    // The raw connection died with the broker: inspect and clean up on a new one.
    let mut after = Raw::connect().await;
    assert_eq!(after.count(&error).await, 0, "nothing failed");
    after.forget_later(&queue);
    after.forget_later(&error);
    after.cleanup().await;
    drop(raw);
}
