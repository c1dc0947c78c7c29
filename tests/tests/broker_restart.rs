//! RabbitMQ restarted (`rabbitmqctl stop_app`, then `start_app`) in the middle of a stream: the
//! endpoint reconnects, restores its topology and consumer, and handles every message; none is
//! lost.
//!
//! Stopping the broker stops it for everyone, so this is the only test in its binary (cargo runs
//! test binaries one after another).

use rhinobus::transport::RabbitMq;
use rhinobus::{Bus, Endpoint};
use rhinobus_tests::{Raw, ReportWork, Work, amqp_url, init_tracing, rabbitmqctl, unique};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Longest wait for the next handled message: the broker's restart and the endpoint's
/// reconnect back-off (at most 5 s) included.
const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_broker_restart_mid_stream_loses_nothing() {
    init_tracing();
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("restart").await;
    let (tx, mut handled) = mpsc::unbounded_channel();
    let endpoint = Endpoint::builder(&queue, RabbitMq::new(amqp_url()))
        .error_queue(&error)
        .concurrency(8)
        .handle(ReportWork(tx))
        .start()
        .await
        .expect("start");
    let sender_name = unique("sender");
    let sender = Bus::new(RabbitMq::new(amqp_url()), &sender_name);
    // The sender goes on until told to stop, so the broker restarts mid-stream however fast
    // the machine is; it returns how many it sent.
    let stop_sending = Arc::new(AtomicBool::new(false));
    let sending = tokio::spawn({
        let (queue, stop) = (queue.clone(), stop_sending.clone());
        async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                // While the broker is down a send fails once it has waited for a connection;
                // the application tries again (a duplicate is possible, a gap is not).
                let deadline = tokio::time::Instant::now() + WAIT;
                while let Err(e) = sender.send(&queue, &Work { n }).await {
                    assert!(tokio::time::Instant::now() < deadline, "send {n}: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                n += 1;
            }
            n
        }
    });
    let mut seen = HashSet::new();
    let mut next = async || {
        tokio::time::timeout(WAIT, handled.recv())
            .await
            .expect("no message handled within a minute")
            .expect("handler alive")
    };
    while seen.len() < 300 {
        seen.insert(next().await);
    }
    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    let restarted_at = seen.len();
    while seen.len() < restarted_at + 300 {
        seen.insert(next().await);
    }
    stop_sending.store(true, Ordering::Relaxed);
    let sent = sending.await.expect("every message sent");
    while seen.len() < sent as usize {
        seen.insert(next().await);
    }
    assert_eq!(
        seen,
        (0..sent).collect(),
        "exactly the messages sent were handled"
    );
    endpoint.shutdown().await;

    // The raw connection died with the broker: inspect and clean up on a new one.
    let mut after = Raw::connect().await;
    assert_eq!(after.count(&error).await, 0, "nothing failed");
    assert_eq!(after.count(&queue).await, 0, "nothing left behind");
    after.forget_later(&queue);
    after.forget_later(&error);
    after.cleanup().await;
    drop(raw);
}
