//! An endpoint process stops gracefully on SIGTERM: what it started finishes and is acked,
//! the rest stays queued.

use rhinobus::Bus;
use rhinobus::transport::RabbitMq;
use rhinobus_tests::{Raw, Work, amqp_url};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[tokio::test]
async fn sigterm_finishes_in_flight_messages_and_loses_none() {
    const N: u32 = 20;
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("sigterm").await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_slow-endpoint"))
        .args([&queue, &error, "400"])
        .env("RHINOBUS_AMQP_URL", amqp_url())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start slow-endpoint");
    let (tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let next = || {
        lines
            .recv_timeout(Duration::from_secs(20))
            .expect("slow-endpoint went quiet")
    };
    assert_eq!(next(), "ready");
    let bus = Bus::new(RabbitMq::new(amqp_url()), "signal-test");
    for n in 0..N {
        bus.send(&queue, &Work { n }).await.expect("send");
    }
    let first = next();
    assert!(first.starts_with("started"), "{first}");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "graceful exit: {exit:?}");
    // Every line up to the end of its output (the reader stops at end of file), not just
    // those forwarded by now.
    let output: Vec<String> = std::iter::once(first).chain(lines.iter()).collect();
    let count = |prefix: &str| output.iter().filter(|l| l.starts_with(prefix)).count() as u32;
    let (started, done) = (count("started "), count("done "));
    assert_eq!(started, done, "every started message finished: {output:?}");
    assert_eq!(output.last().map(String::as_str), Some("stopped"));
    // Finished messages were acked; all others are back in the queue.
    raw.wait_for_count(&queue, N - done, Duration::from_secs(10))
        .await;
    assert_eq!(raw.count(&queue).await, N - done);
    raw.cleanup().await;
}
