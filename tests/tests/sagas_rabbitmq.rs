//! Sagas end to end: real RabbitMQ, a real DHT node over TCP (in this process), several
//! workers, and a worker process killed in the middle of a stream.

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rhinobus::transport::RabbitMq;
use rhinobus::{Bus, Endpoint};
use rhinobus_dht::{Client, Durability};
use rhinobus_sagas::{Persister, SagaEndpointExt, saga_states};
use rhinobus_samples::node::InProcessNode;
use rhinobus_samples::tally::{Tally, TallyApplied, TallyMerger, TallySaga, TallyUpdate};
use rhinobus_tests::{Raw, amqp_url, init_tracing, unique};
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn tally_names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Sends `updates` updates numbered 0.., round-robin over `tallies`, many at once.
async fn send_updates(bus: &Bus, queue: &str, tallies: &[String], updates: u64) {
    let mut sends = FuturesUnordered::new();
    for update in 0..updates {
        let message = TallyUpdate {
            tally: tallies[(update % tallies.len() as u64) as usize].clone(),
            update,
            sent_at_micros: 0,
        };
        sends.push(async move { bus.send(queue, &message).await });
        if sends.len() >= 64 {
            sends.next().await.expect("non-empty").expect("send");
        }
    }
    while let Some(s) = sends.next().await {
        s.expect("send");
    }
}

/// Every version of every tally.
async fn tally_versions(client: &Client, tallies: &[String]) -> BTreeMap<String, Vec<Tally>> {
    let mut out = BTreeMap::new();
    for t in tallies {
        let states = saga_states::<TallySaga>(client, t)
            .await
            .expect("read saga state");
        out.insert(t.clone(), states.into_iter().flatten().collect());
    }
    out
}

/// Update numbers applied to each tally, over every version.
fn applied(versions: &BTreeMap<String, Vec<Tally>>) -> usize {
    versions
        .values()
        .map(|vs| {
            vs.iter()
                .flat_map(|v| v.applied.iter())
                .collect::<BTreeSet<_>>()
                .len()
        })
        .sum()
}

async fn wait_for_applied(client: &Client, tallies: &[String], n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let done = applied(&tally_versions(client, tallies).await);
        if done >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {n} updates applied after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What each tally must hold: update numbers `i` with `i % tallies == index`.
fn expected(tallies: &[String], updates: u64) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for u in 0..updates {
        out.entry(tallies[(u % tallies.len() as u64) as usize].clone())
            .or_default()
            .push(u);
    }
    out
}

/// A DHT node in this process, and a client of it.
async fn dht_node() -> (InProcessNode, Client) {
    let node = InProcessNode::start(Durability::Buffered)
        .await
        .expect("start a DHT node");
    let client = Client::connect(node.addr.clone())
        .await
        .expect("connect to the node");
    (node, client)
}

async fn eight_workers(merging: bool) {
    init_tracing();
    let mut raw = Raw::connect().await;
    let url = amqp_url();
    let (node, client) = dht_node().await;
    let queue = unique("saga-workers");
    let errors = format!("{queue}-error");
    raw.forget_later(&queue);
    raw.forget_later(&errors);
    let tallies = tally_names(&queue, 10);
    let mut workers = Vec::new();
    for w in 0..8 {
        let persister = if merging {
            Persister::merging(client.clone(), TallyMerger)
        } else {
            Persister::optimistic(client.clone())
        };
        let transport = RabbitMq::new(&url).connection_name(format!("{queue}-worker-{w}"));
        workers.push(
            Endpoint::builder(queue.clone(), transport)
                .concurrency(4)
                .error_queue(errors.clone())
                .saga(TallySaga::default(), persister)
                .start()
                .await
                .expect("start a worker"),
        );
    }
    let bus = Bus::new(RabbitMq::new(&url), format!("{queue}-client"));
    send_updates(&bus, &queue, &tallies, 1_000).await;
    wait_for_applied(&client, &tallies, 1_000, Duration::from_secs(120)).await;
    for w in workers {
        w.shutdown().await;
    }
    let versions = tally_versions(&client, &tallies).await;
    let expected = expected(&tallies, 1_000);
    for (tally, vs) in &versions {
        if merging {
            let mut all: Vec<u64> = vs.iter().flat_map(|v| v.applied.clone()).collect();
            all.sort_unstable();
            all.dedup();
            assert_eq!(
                &all, &expected[tally],
                "{tally}: merged state misses updates"
            );
        } else {
            assert_eq!(
                vs.len(),
                1,
                "{tally}: the optimistic persister leaves one version"
            );
            let mut applied = vs[0].applied.clone();
            assert_eq!(
                applied.len(),
                100,
                "{tally}: an update was applied twice or never"
            );
            applied.sort_unstable();
            assert_eq!(&applied, &expected[tally], "{tally}");
        }
    }
    assert!(raw.drain(&errors).await.is_empty(), "nothing failed");
    raw.cleanup().await;
    node.stop().await.expect("DHT node stopped cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn optimistic_eight_workers_apply_every_update_exactly_once() {
    eight_workers(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merging_eight_workers_keep_every_update_in_the_merged_state() {
    eight_workers(true).await;
}

struct Worker(Child);

impl Worker {
    fn spawn(args: &[&str]) -> Worker {
        let child = Command::new(env!("CARGO_BIN_EXE_sagas_worker"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start sagas_worker");
        Worker(child)
    }

    /// Waits for the process to end by itself (the crash it was told to have).
    fn wait_exit(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                assert!(
                    !status.success(),
                    "the worker was to crash, it exited {status}"
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the worker did not crash in {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM: the endpoint finishes what is in flight and stops.
    fn stop(mut self) {
        let pid = self.0.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        let status = self.0.wait().expect("wait for the worker");
        assert!(status.success(), "the worker stopped with {status}");
    }

    /// kill -9.
    fn kill(mut self) {
        self.0.kill().expect("SIGKILL the worker");
        let _ = self.0.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_stream_loses_no_update_and_applies_none_twice() {
    init_tracing();
    let mut raw = Raw::connect().await;
    let url = amqp_url();
    let (node, client) = dht_node().await;
    let queue = unique("saga-crash");
    let errors = format!("{queue}-error");
    let audit = format!("{queue}-audit");
    raw.queue(&queue).await;
    raw.queue(&audit).await;
    raw.forget_later(&errors);
    let tallies = tally_names(&queue, 5);
    let args = [
        "--amqp",
        url.as_str(),
        "--queue",
        queue.as_str(),
        "--error-queue",
        errors.as_str(),
        "--audit",
        audit.as_str(),
        "--dht",
        node.addr.as_str(),
    ];
    let bus = Bus::new(RabbitMq::new(&url), format!("{queue}-client"));
    send_updates(&bus, &queue, &tallies, 500).await;

    // 1. Crash right after a save, before the sends and the ack.
    let mut crash_args = args.to_vec();
    crash_args.extend(["--crash-after-saves", "120"]);
    Worker::spawn(&crash_args).wait_exit(Duration::from_secs(60));
    let after_crash = applied(&tally_versions(&client, &tallies).await);
    assert!(
        after_crash >= 120,
        "the worker saved {after_crash} updates before crashing"
    );

    // 2. kill -9 at an arbitrary point of the stream.
    let worker = Worker::spawn(&args);
    wait_for_applied(
        &client,
        &tallies,
        after_crash + 100,
        Duration::from_secs(60),
    )
    .await;
    worker.kill();

    // 3. A last worker finishes the stream.
    let worker = Worker::spawn(&args);
    wait_for_applied(&client, &tallies, 500, Duration::from_secs(60)).await;
    // Let it settle what is in flight (the last acks and audit sends) before stopping it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while raw.count(&queue).await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.stop();

    let versions = tally_versions(&client, &tallies).await;
    let expected = expected(&tallies, 500);
    for (tally, vs) in &versions {
        assert_eq!(vs.len(), 1, "{tally}");
        let mut applied = vs[0].applied.clone();
        assert_eq!(
            applied.len(),
            100,
            "{tally}: an update was applied twice or never"
        );
        applied.sort_unstable();
        assert_eq!(&applied, &expected[tally], "{tally}");
    }
    // Every update's audit message went out at least once, the one whose save preceded the
    // crash included.
    let mut audited = BTreeSet::new();
    for (_, body) in raw.drain(&audit).await {
        let a: TallyApplied = rhinobus::message::decode(&body).expect("an audit message");
        audited.insert(a.update);
    }
    let missing: Vec<u64> = (0..500).filter(|u| !audited.contains(u)).collect();
    assert!(
        missing.is_empty(),
        "no audit message for updates {missing:?}"
    );
    assert!(raw.drain(&errors).await.is_empty(), "nothing failed");
    raw.cleanup().await;
    node.stop().await.expect("DHT node stopped cleanly");
}
