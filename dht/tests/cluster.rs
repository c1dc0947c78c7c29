//! A replicated cluster of real `rhinobus-dht node` processes on real RabbitMQ: failover,
//! catch-up after kill -9, and siblings that converge.

mod common;

use common::{BrokerStopped, NodeProcess, cli};
use rhinobus_dht::cluster::queue_name;
use rhinobus_dht::replication::Replicate;
use rhinobus_dht::{
    AddItemRequest, Change, Client, ClientError, ClientOptions, KeyDump, PutRequest, RangeId,
    RemoveItemRequest, RemoveRequest, Version, WireError,
};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn amqp_url() -> String {
    std::env::var("RHINOBUS_AMQP_URL")
        .unwrap_or_else(|_| rhinobus::transport::DEFAULT_AMQP_URL.into())
}

/// A broker connection for cleaning up; fails the test loudly when RabbitMQ is not there.
async fn broker() -> lapin::Connection {
    let url = amqp_url();
    match tokio::time::timeout(
        Duration::from_secs(10),
        lapin::Connection::connect(&url, lapin::ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "the cluster tests need RabbitMQ at {url} (set RHINOBUS_AMQP_URL; `bash .ci/run` starts one): {e}"
        ),
        Err(_) => panic!("the cluster tests need RabbitMQ at {url}: no answer within 10 s"),
    }
}

/// How long progress may stall before a test gives up: generous, because CI machines are
/// shared and slow; a healthy run needs a small fraction of it.
const LIVENESS: Duration = Duration::from_secs(300);

/// Every test here starts three node processes; on two cores they take turns.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Cluster {
    dir: tempfile::TempDir,
    file: PathBuf,
    names: Vec<String>,
    addrs: Vec<String>,
    nodes: Vec<Option<NodeProcess>>,
    /// More arguments for every node.
    args: Vec<String>,
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").to_string()
}

impl Cluster {
    fn new(n: usize) -> Self {
        Self::with_args(n, &[])
    }

    /// `n` nodes, each started with `args` besides the cluster's own.
    fn with_args(n: usize, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let run = uuid::Uuid::now_v7().simple().to_string();
        let names: Vec<String> = (1..=n).map(|i| format!("test-{run}-n{i}")).collect();
        let addrs: Vec<String> = (0..n).map(|_| free_addr()).collect();
        let nodes: Vec<_> = names
            .iter()
            .zip(&addrs)
            .map(|(name, addr)| serde_json::json!({ "name": name, "addr": addr }))
            .collect();
        let file = dir.path().join("cluster.json");
        std::fs::write(
            &file,
            serde_json::json!({ "version": 1, "nodes": nodes }).to_string(),
        )
        .expect("write cluster file");
        let mut c = Self {
            dir,
            file,
            names,
            addrs,
            nodes: (0..n).map(|_| None).collect(),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        for i in 0..n {
            c.start(i);
        }
        c
    }

    fn start(&mut self, i: usize) {
        let data = self.dir.path().join(&self.names[i]);
        let file = self.file.to_string_lossy().into_owned();
        let url = amqp_url();
        let mut args = vec![
            "--cluster",
            &file,
            "--name",
            &self.names[i],
            "--amqp",
            &url,
            "--listen",
            &self.addrs[i],
        ];
        args.extend(self.args.iter().map(String::as_str));
        self.nodes[i] = Some(NodeProcess::start(&data, &args));
    }

    /// The command that runs node `i` as [`start`](Self::start) does, for a test that wants
    /// its output or exit status.
    fn node_command(&self, i: usize) -> std::process::Command {
        let mut cmd = std::process::Command::new(common::BIN);
        cmd.arg("node")
            .arg("--data")
            .arg(self.dir.path().join(&self.names[i]))
            .arg("--cluster")
            .arg(&self.file)
            .args(["--name", &self.names[i], "--amqp", &amqp_url()])
            .args(["--listen", &self.addrs[i]]);
        cmd
    }

    /// Kills node `i` and deletes its data directory, as a lost disk would.
    fn kill_and_wipe(&mut self, i: usize) {
        self.kill(i);
        let data = self.dir.path().join(&self.names[i]);
        std::fs::remove_dir_all(data).expect("wipe the node's data");
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut node) = self.nodes[i].take() {
            node.signal_and_wait("KILL");
        }
    }

    async fn client(&self) -> Client {
        Client::connect_with(self.addrs.clone(), ClientOptions::default())
            .await
            .expect("connect to the cluster")
    }

    /// Every node's full contents, by node.
    async fn dumps(&self, client: &Client) -> Vec<Vec<KeyDump>> {
        let mut out = Vec::new();
        for addr in &self.addrs {
            let mut keys = Vec::new();
            for r in RangeId::all() {
                keys.extend(client.dump(addr, r).await.expect("dump a node"));
            }
            out.push(keys);
        }
        out
    }

    /// Waits until every node holds the same data and `check` accepts it; panics with what
    /// differs when that does not happen within [`LIVENESS`].
    async fn converge(&self, client: &Client, check: impl Fn(&[KeyDump]) -> Result<(), String>) {
        let deadline = tokio::time::Instant::now() + LIVENESS;
        loop {
            let dumps = self.dumps(client).await;
            let same = dumps.windows(2).all(|w| w[0] == w[1]);
            let checked = dumps.iter().try_for_each(|d| check(d));
            if same && checked.is_ok() {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let sizes: Vec<usize> = dumps.iter().map(Vec::len).collect();
                panic!(
                    "replicas did not converge: identical = {same}, keys per node = {sizes:?}, check: {checked:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn cleanup(mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let conn = broker().await;
        let channel = conn.create_channel().await.expect("channel");
        for name in &self.names {
            let _ = channel
                .queue_delete(
                    rhinobus_dht::cluster::queue_name(name).as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
        let _ = conn.close(200, "done".into()).await;
    }
}

fn versions_of(dump: &[KeyDump]) -> BTreeMap<&[u8], BTreeSet<Version>> {
    dump.iter()
        .map(|k| {
            (
                k.key.as_ref(),
                k.siblings.iter().map(|s| s.version).collect(),
            )
        })
        .collect()
}

/// Concurrent writers putting `writes` fresh keys, each retrying its write until it is
/// acknowledged.
struct Writers {
    acked: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<(String, Version)>>>,
}

impl Writers {
    /// `writers` tasks putting `<prefix>/0` .. `<prefix>/<writes - 1>` between them.
    fn start(client: &Client, prefix: &'static str, writes: usize, writers: usize) -> Self {
        let acked = Arc::new(AtomicUsize::new(0));
        let next = Arc::new(AtomicUsize::new(0));
        let tasks = (0..writers)
            .map(|_| {
                let client = client.clone();
                let (acked, next) = (acked.clone(), next.clone());
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= writes {
                            return mine;
                        }
                        let key = format!("{prefix}/{n}");
                        // Retry until acknowledged; an unacknowledged attempt may still land,
                        // as an extra sibling, which the set check allows.
                        let give_up = tokio::time::Instant::now() + LIVENESS;
                        loop {
                            match client.put(PutRequest::new(key.clone(), key.clone())).await {
                                Ok(out) => {
                                    mine.push((key.clone(), out.version));
                                    acked.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                                Err(e) => {
                                    assert!(
                                        tokio::time::Instant::now() < give_up,
                                        "write {key} keeps failing: {e}"
                                    );
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Self { acked, tasks }
    }

    /// How many writes were acknowledged so far.
    fn acked(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits until `n` writes were acknowledged. A writer that gives up panics and stops
    /// counting: fail then, rather than hang; the deadline is only a backstop, far above what
    /// a loaded machine needs.
    async fn wait_for(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + LIVENESS;
        while self.acked() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {n} writes acknowledged after {LIVENESS:?}",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Every acknowledged write (key and version), once all are.
    async fn finish(self) -> Vec<(String, Version)> {
        let mut all = Vec::new();
        for task in self.tasks {
            all.extend(task.await.expect("writer"));
        }
        all
    }
}

/// A [`Cluster::converge`] check: every write of `all` is on the node.
fn holds_every(all: &[(String, Version)]) -> impl Fn(&[KeyDump]) -> Result<(), String> + '_ {
    |dump| {
        let present = versions_of(dump);
        let missing: Vec<&str> = all
            .iter()
            .filter(|(k, v)| !present.get(k.as_bytes()).is_some_and(|s| s.contains(v)))
            .map(|(k, _)| k.as_str())
            .take(5)
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("acknowledged writes missing, e.g. {missing:?}"))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acknowledged_write_is_lost_when_a_primary_is_killed_and_restarted() {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    drop(broker().await);
    let mut cluster = Cluster::new(3);
    let client = cluster.client().await;
    const WRITES: usize = 10_000;
    let writers = Writers::start(&client, "jepsen", WRITES, 20);
    // Node 1 is the primary of the first third of the ranges.
    writers.wait_for(WRITES * 3 / 10).await;
    cluster.kill(0);
    let killed_at = writers.acked();
    writers.wait_for(WRITES * 6 / 10).await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.start(0);
        cluster
    })
    .await
    .expect("restart node 1");
    let restarted_at = writers.acked();
    let all = writers.finish().await;
    assert_eq!(all.len(), WRITES);
    assert!(
        restarted_at > killed_at,
        "writes must go on while node 1 is down ({killed_at} before, {restarted_at} after)"
    );
    cluster.converge(&client, holds_every(&all)).await;
    // The CLI sees the same: every node's dump is identical.
    let outs: Vec<String> = cluster
        .addrs
        .iter()
        .map(|a| {
            let (code, out, err) = cli(a, &["dump", "--json"], None);
            assert_eq!(code, 0, "dump failed: {err}");
            let v: serde_json::Value = serde_json::from_str(&out).expect("dump prints JSON");
            v["keys"].to_string()
        })
        .collect();
    assert!(outs.windows(2).all(|w| w[0] == w[1]), "CLI dumps differ");
    assert!(outs[0].contains("jepsen/9999"));
    cluster.cleanup().await;
}

/// RabbitMQ stopped and started again while writes go on: the nodes keep taking writes
/// without it, their senders retry until it is back, and every replica ends with every
/// acknowledged write. (The broker stops for everyone, but cargo runs test binaries one at a
/// time and the tests of this one take turns.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replication_survives_a_broker_restart() {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    drop(broker().await);
    let cluster = Cluster::new(3);
    let client = cluster.client().await;
    const WRITES: usize = 3_000;
    // The broker stops in the middle of these (or after them on a fast machine: stopping it
    // takes seconds) ...
    let across = Writers::start(&client, "across", WRITES, 20);
    across.wait_for(WRITES / 3).await;
    let stopped = BrokerStopped::now();
    // ... and these all start and end while it is down.
    const WHILE_DOWN: usize = 300;
    let while_down = Writers::start(&client, "down", WHILE_DOWN, 20)
        .finish()
        .await;
    assert_eq!(while_down.len(), WHILE_DOWN);
    // Those wait in the outboxes, owed to both other replicas, and the nodes say so.
    let owed = owed_replication(&cluster.addrs);
    assert!(
        owed >= 2 * WHILE_DOWN as u64,
        "the nodes report {owed} writes owed, fewer than the {WHILE_DOWN} taken twice over"
    );
    stopped.start_again();
    let mut all = across.finish().await;
    assert_eq!(all.len(), WRITES);
    all.extend(while_down);
    cluster.converge(&client, holds_every(&all)).await;
    // Once the broker confirmed everything, nothing is owed any more.
    let deadline = tokio::time::Instant::now() + LIVENESS;
    while owed_replication(&cluster.addrs) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replication still owed after the replicas converged"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.cleanup().await;
}

/// The replication the nodes at `addrs` still owe their peers, summed, as
/// `rhinobus-dht status --json` reports it.
fn owed_replication(addrs: &[String]) -> u64 {
    let owed_by = |addr: &String| -> u64 {
        let (code, out, err) = cli(addr, &["status", "--json"], None);
        assert_eq!(code, 0, "status failed: {err}");
        let status: serde_json::Value = serde_json::from_str(&out).expect("status prints JSON");
        let backlog = status["backlog"].as_array().expect("a backlog");
        backlog.iter().filter_map(|b| b["pending"].as_u64()).sum()
    };
    addrs.iter().map(owed_by).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_leave_the_same_siblings_on_every_replica() {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    drop(broker().await);
    let cluster = Cluster::new(3);
    let client = cluster.client().await;
    let (code, out, err) = cli(&cluster.addrs[1], &["topology", "--json"], None);
    assert_eq!(code, 0, "topology failed: {err}");
    let topology: serde_json::Value = serde_json::from_str(&out).expect("topology JSON");
    assert_eq!(topology["version"], 1);
    assert_eq!(topology["names"][0], cluster.names[0]);
    const KEYS: usize = 5;
    const WRITERS: usize = 4;
    const PUTS: usize = 20;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                for i in 0..PUTS {
                    for k in 0..KEYS {
                        // No parents, not optimistic: every put is concurrent with the others.
                        let out = client
                            .put(PutRequest::new(format!("shared/{k}"), format!("w{w}-{i}")))
                            .await
                            .expect("put");
                        mine.push((format!("shared/{k}"), out.version));
                    }
                }
                mine
            })
        })
        .collect();
    let mut expected: BTreeMap<String, BTreeSet<Version>> = BTreeMap::new();
    for w in writers {
        for (k, v) in w.await.expect("writer") {
            expected.entry(k).or_default().insert(v);
        }
    }
    cluster
        .converge(&client, |dump| {
            let present = versions_of(dump);
            for (k, want) in &expected {
                let have = present.get(k.as_bytes()).cloned().unwrap_or_default();
                if &have != want {
                    return Err(format!(
                        "{k}: {} siblings, expected {}",
                        have.len(),
                        want.len()
                    ));
                }
            }
            Ok(())
        })
        .await;
    assert!(expected.values().all(|s| s.len() == WRITERS * PUTS));
    cluster.cleanup().await;
}

/// Nodes told that the broker takes messages of at most 1 MiB refuse a write whose value would
/// not fit in one, saying how long a value may be, rather than take it and leave its
/// replication stuck; a value that fits reaches every replica. A limit too small for every
/// change is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_value_too_long_for_the_brokers_messages_is_refused_not_stuck() {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    drop(broker().await);
    const MIB: usize = 1024 * 1024;
    let cluster = Cluster::with_args(3, &["--broker-max-message-bytes", &MIB.to_string()]);
    let client = cluster.client().await;
    let refused = client.put(PutRequest::new("k", vec![0u8; MIB])).await;
    let Err(ClientError::Rejected(WireError::ValueTooLarge { len, max })) = refused else {
        panic!("a value as long as a whole message: {refused:?}");
    };
    assert_eq!(len, MIB as u64);
    assert!(max < len, "{max}");
    let max = usize::try_from(max).expect("a length");
    // The limit is the value's, with this key: the same key takes a value that long.
    let fits = (client.put(PutRequest::new("k", vec![1u8; max])).await)
        .expect("the longest value allowed");
    cluster
        .converge(&client, |dump| {
            // The refused write left nothing: one version, the one that fitted.
            let versions = versions_of(dump);
            match versions.get(&b"k"[..]) {
                Some(v) if v == &BTreeSet::from([fits.version]) => Ok(()),
                other => Err(format!("versions of k: {other:?}")),
            }
        })
        .await;
    let too_small = (cluster.node_command(0))
        .args(["--broker-max-message-bytes", "1000"])
        .output()
        .expect("run a node");
    let stderr = String::from_utf8_lossy(&too_small.stderr);
    assert!(!too_small.status.success(), "{stderr}");
    assert!(stderr.contains("broker-max-message-bytes"), "{stderr}");
    cluster.cleanup().await;
}

/// A node purges its tombstones once they are older than its grace, at start-up and once a
/// minute: a replication message that comes later than that brings back the version it
/// carries, where a node that keeps its tombstones turns it away. `verify` sees the
/// difference, and `verify --repair` mends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tombstones_older_than_the_grace_are_purged() {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    drop(broker().await);
    const GRACE: Duration = Duration::from_secs(2);
    let mut cluster = Cluster::with_args(3, &["--tombstone-grace", "2s"]);
    let client = cluster.client().await;
    let first = client
        .put(PutRequest::new("purged", "v1"))
        .await
        .expect("put v1");
    let put = PutRequest::new("purged", "v2").parents([first.version]);
    let second = client.put(put).await.expect("put v2");
    let only_v2 = |d: &[KeyDump]| match versions_of(d).get(&b"purged"[..]) {
        Some(v) if *v == BTreeSet::from([second.version]) => Ok(()),
        other => Err(format!("purged holds {other:?}")),
    };
    cluster.converge(&client, only_v2).await;
    // Older than the grace now. Node 2 purges at its restart; node 3 comes back keeping its
    // tombstones for ever.
    tokio::time::sleep(GRACE + Duration::from_millis(500)).await;
    cluster.kill(1);
    cluster.start(1);
    cluster.kill(2);
    cluster.args = vec!["--tombstone-grace".into(), "forever".into()];
    cluster.start(2);
    let bus = rhinobus::Bus::new(rhinobus::transport::RabbitMq::new(amqp_url()), "late-test");
    let late = |marker: &str| Replicate {
        from: "late-test".into(),
        changes: vec![
            Change::Put {
                key: "purged".into(),
                version: first.version,
                parents: vec![],
                value: "v1".into(),
                expires_at: None,
            },
            Change::Put {
                key: marker.to_owned().into(),
                version: Version::new(),
                parents: vec![],
                value: "applied".into(),
                expires_at: None,
            },
        ],
        packed: Default::default(),
    };
    // Until its first purge ran (right after it started), node 2 drops v1 too: ask again.
    let deadline = tokio::time::Instant::now() + LIVENESS;
    let mut attempt = 0;
    let back = loop {
        attempt += 1;
        let marker = format!("marker-2-{attempt}");
        let queue = queue_name(&cluster.names[1]);
        bus.send(&queue, &late(&marker))
            .await
            .expect("send to node 2");
        let siblings = applied(&client, &cluster.addrs[1], &marker).await;
        if siblings.len() == 2 {
            break siblings;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "v1 never came back on node 2"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let versions: BTreeSet<_> = back.iter().map(|s| s.version).collect();
    assert_eq!(versions, BTreeSet::from([first.version, second.version]));
    // Node 3 still holds v1's tombstone and turns the late v1 away.
    let queue = queue_name(&cluster.names[2]);
    bus.send(&queue, &late("marker-3"))
        .await
        .expect("send to node 3");
    let siblings = applied(&client, &cluster.addrs[2], "marker-3").await;
    let versions: Vec<_> = siblings.iter().map(|s| s.version).collect();
    assert_eq!(versions, [second.version], "node 3 resurrected v1");
    // `verify` sees the replicas of "purged" differ, and fails.
    let (code, out, err) = cli(&cluster.addrs[0], &["verify", "--json"], None);
    assert_ne!(code, 0, "verify passed: {out}");
    assert!(
        err.contains("ranges differ between their replicas"),
        "{err}"
    );
    let report: serde_json::Value = serde_json::from_str(&out).expect("verify prints JSON");
    let purged = RangeId::of(b"purged").get();
    let differing = report["differing"].as_array().expect("differing ranges");
    let range = (differing.iter())
        .find(|r| r["range"] == purged)
        .unwrap_or_else(|| panic!("range {purged} not reported: {out}"));
    let digests: Vec<_> = (range["replicas"].as_array().expect("replicas").iter())
        .map(|r| r["md5"].as_str().expect("a digest").to_owned())
        .collect();
    assert_eq!(digests.len(), 3, "{range}");
    assert!(
        digests[0] != digests[1] || digests[1] != digests[2],
        "{range}"
    );
    // `verify --repair` copies the differing ranges between the replicas: node 3's tombstone
    // takes v1 away again on node 2 (and does not bring it to node 1), and all agree.
    let (code, out, err) = cli(&cluster.addrs[0], &["verify", "--repair"], None);
    assert_eq!(code, 0, "verify --repair failed: {out}{err}");
    assert!(err.contains("repaired "), "{err}");
    for addr in &cluster.addrs {
        let siblings = client.get_from(addr, "purged").await.expect("get purged");
        let versions: Vec<_> = siblings.iter().map(|s| s.version).collect();
        assert_eq!(versions, [second.version], "on {addr} after the repair");
    }
    let (code, out, err) = cli(&cluster.addrs[1], &["verify"], None);
    assert_eq!(
        code, 0,
        "replicas still differ after the repair: {out}{err}"
    );
    cluster.cleanup().await;
}

/// Waits until node `addr` holds `marker` (so the message that carried it was applied) and
/// returns what it holds of key "purged".
async fn applied(client: &Client, addr: &str, marker: &str) -> Vec<rhinobus_dht::Sibling> {
    let deadline = tokio::time::Instant::now() + LIVENESS;
    while client
        .get_from(addr, marker.to_owned())
        .await
        .expect("get")
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{marker} never applied on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.get_from(addr, "purged").await.expect("get purged")
}

/// A node whose data is gone (a new disk) comes back with `--rebuild`: before it serves, it
/// copies its ranges from the other two, then drains what they accepted while it was down and
/// while it copied.
/// Catch-up alone would bring back only the latter. It ends holding exactly what they hold:
/// superseded versions and removals stay gone, siblings and list items come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_lost_its_data_is_rebuilt_from_the_other_replicas() {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    drop(broker().await);
    let mut cluster = Cluster::new(3);
    let client = cluster.client().await;
    let mut all = Writers::start(&client, "before", 2_000, 10).finish().await;
    // A history beyond fresh keys, on every node's ranges.
    for n in 0..60 {
        let key = format!("history/{n}");
        let first = client
            .put(PutRequest::new(key.clone(), "a"))
            .await
            .expect("put");
        match n % 3 {
            0 => {
                let put = PutRequest::new(key.clone(), "b").parents([first.version]);
                all.push((key, client.put(put).await.expect("put b").version));
            }
            1 => {
                let remove = RemoveRequest::new(key, [first.version]);
                client.remove(remove).await.expect("remove");
            }
            _ => {
                let sibling = client.put(PutRequest::new(key.clone(), "c")).await;
                all.push((key.clone(), first.version));
                all.push((key, sibling.expect("put c").version));
            }
        }
        let list = format!("list/{n}");
        client
            .add_item(AddItemRequest::new(list.clone(), "kept"))
            .await
            .expect("add item");
        let id = (client
            .add_item(AddItemRequest::new(list.clone(), "removed"))
            .await)
            .expect("add item");
        let remove = RemoveItemRequest {
            key: list.into(),
            id,
        };
        client.remove_item(remove).await.expect("remove item");
    }
    cluster.converge(&client, holds_every(&all)).await;

    cluster.kill_and_wipe(2);
    // Taken while it is down and while it rebuilds: these wait in its queue.
    let during = Writers::start(&client, "during", 2_000, 10);
    during.wait_for(500).await;
    cluster.args = vec!["--rebuild".into()];
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.start(2);
        cluster
    })
    .await
    .expect("restart node 3");
    all.extend(during.finish().await);

    let history = |dump: &[KeyDump]| {
        let items = |n: usize| {
            let list = format!("list/{n}");
            let k = dump.iter().find(|k| k.key == list.as_bytes());
            k.map(|k| k.items.iter().map(|i| i.value.clone()).collect::<Vec<_>>())
        };
        let present = versions_of(dump);
        for n in 0..60 {
            let key = format!("history/{n}");
            let want = [1, 0, 2][n % 3];
            let have = present.get(key.as_bytes()).map_or(0, BTreeSet::len);
            if have != want {
                return Err(format!("{key}: {have} siblings instead of {want}"));
            }
            if items(n) != Some(vec!["kept".into()]) {
                return Err(format!("list/{n} holds {:?}", items(n)));
            }
        }
        holds_every(&all)(dump)
    };
    cluster.converge(&client, history).await;
    let (code, out, err) = cli(&cluster.addrs[2], &["verify"], None);
    assert_eq!(code, 0, "verify failed: {out}{err}");
    assert!(out.contains("all 1024 ranges identical"), "{out}");
    cluster.cleanup().await;
}

/// `--rebuild` with no other replica to copy from refuses to start, saying why, rather than
/// serve an empty node as if it held its ranges.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_without_any_other_replica_refuses_to_start() {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    drop(broker().await);
    let mut cluster = Cluster::new(3);
    cluster.kill(0);
    cluster.kill(1);
    cluster.kill_and_wipe(2);
    let out = (cluster.node_command(2).arg("--rebuild").output()).expect("run the node");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the node started: {stderr}");
    assert!(
        stderr.contains("1024 ranges") && stderr.contains("could not be copied"),
        "unclear error: {stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).is_empty(),
        "it must not have listened"
    );
    cluster.cleanup().await;
}

/// A node started on an empty directory in a cluster says that a replacement needs
/// `--rebuild`; one that kept its data does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_on_an_empty_directory_says_a_replacement_needs_a_rebuild() {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    drop(broker().await);
    let mut cluster = Cluster::new(3);
    // Starts node `i` until it listens, stops it, and returns what it logged.
    let run_once = |cluster: &Cluster, i: usize| {
        use std::io::{BufRead, BufReader, Read};
        let mut child = (cluster.node_command(i))
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the node");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        BufReader::new(stdout).read_line(&mut line).expect("read");
        assert!(line.starts_with("listening on"), "did not start: {line:?}");
        child.kill().expect("stop the node");
        child.wait().expect("wait for the node");
        let mut logged = String::new();
        let mut stderr = child.stderr.take().expect("stderr");
        stderr.read_to_string(&mut logged).expect("read stderr");
        logged
    };
    cluster.kill_and_wipe(2);
    let logged = run_once(&cluster, 2);
    assert!(
        logged.contains("held nothing") && logged.contains("--rebuild"),
        "no hint to rebuild: {logged}"
    );
    cluster.kill(0);
    let logged = run_once(&cluster, 0);
    assert!(!logged.contains("held nothing"), "{logged}");
    cluster.cleanup().await;
}

/// Anti-entropy (`--anti-entropy-pass`) brings back what replication lost: the writes a node
/// missed while down, its queue purged meanwhile (as an operator might, by mistake), reach it
/// in the background, with no `verify --repair`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anti_entropy_repairs_a_replica_whose_replication_was_lost() {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let broker = broker().await;
    let mut cluster = Cluster::with_args(3, &["--anti-entropy-pass", "2s"]);
    let client = cluster.client().await;
    cluster.kill(2);
    let all = Writers::start(&client, "missed", 300, 5).finish().await;
    let live = cluster.addrs[..2].to_vec();
    let deadline = tokio::time::Instant::now() + LIVENESS;
    while owed_replication(&live) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replication never sent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let channel = broker.create_channel().await.expect("channel");
    let purged = channel
        .queue_purge(
            queue_name(&cluster.names[2]).as_str().into(),
            lapin::options::QueuePurgeOptions::default(),
        )
        .await
        .expect("purge the node queue");
    assert!(purged > 0, "the stopped node's queue held its replication");
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.start(2);
        cluster
    })
    .await
    .expect("restart node 3");
    // Its catch-up found nothing: it lacks those writes until anti-entropy repairs them. Its
    // own ranges only it looks after, a pass and the settle (several seconds) from now.
    let topology = client.topology();
    let own: BTreeSet<RangeId> = RangeId::all()
        .filter(|r| topology.primary(*r) == Some(cluster.addrs[2].as_str()))
        .collect();
    let missed = all
        .iter()
        .filter(|(k, _)| own.contains(&RangeId::of(k.as_bytes())));
    assert!(
        missed.count() > 0,
        "some writes fall in node 3's own ranges"
    );
    for &r in &own {
        let held = client.dump(&cluster.addrs[2], r).await.expect("dump");
        // (The topology, stored in the table itself, is there from the start.)
        let missed = held
            .iter()
            .filter(|k| k.key.starts_with(b"missed/"))
            .count();
        assert_eq!(
            missed, 0,
            "node 3 holds {missed} missed writes in range {r:?}"
        );
    }
    cluster.converge(&client, holds_every(&all)).await;
    let (code, out, err) = cli(&cluster.addrs[0], &["verify"], None);
    assert_eq!(code, 0, "verify failed: {out}{err}");
    assert!(out.contains("all 1024 ranges identical"), "{out}");
    drop(broker);
    cluster.cleanup().await;
}
