//! Anti-entropy: a node compares, in the background, each range it is the primary of with the
//! range's other replicas, by digest ([`compare_range`]), and repairs a range that still
//! differs a moment later ([`repair`]), as Dynamo's replicas reconcile what replication
//! missed: a replication message parked in the `rhinobus-dht.error` queue and never replayed, a
//! node queue purged by hand, a rebuild that ran while a peer lagged.
//!
//! One pass compares every such range once, spread evenly over the pass. A difference can be
//! replication in flight, so the ranges that differed are compared again [`SETTLE`] after the
//! pass and repaired only if they still differ: under a steady stream of writes to a range
//! that second look can differ too, and the repair then copies what replication would have
//! brought anyway (merging is idempotent). A replica that does not answer is left out of that
//! range's repair until a later pass.

use crate::client::{Client, ClientOptions};
use crate::routing::{RangeId, Topology};
use crate::verify::{compare_range, repair};
use std::time::Duration;

/// How long the ranges that differed in a pass are given to agree before they are repaired:
/// far longer than replication takes under load (tens of milliseconds).
pub const SETTLE: Duration = Duration::from_secs(5);

/// The shortest pause between two ranges, however short the pass.
const MIN_PAUSE: Duration = Duration::from_millis(10);

/// Compares and repairs, forever, the ranges node `node` of `topology` is the primary of, one
/// pass every `pass`, reaching the other replicas as `options` says (their secret, timeouts).
/// Failures are logged and the range is tried again in the next pass; while no node answers
/// at all (the cluster is starting), ranges are skipped. Returns at once when `node` is not in
/// `topology` or is the primary of no range shared with another replica.
///
/// ```no_run
/// # async fn run(topology: rhinobus_dht::Topology) {
/// use rhinobus_dht::ClientOptions;
/// use std::time::Duration;
///
/// // Every range this node is the primary of, compared once every ten minutes.
/// let task = tokio::spawn(rhinobus_dht::anti_entropy::run(
///     topology,
///     "n1".into(),
///     ClientOptions::default(),
///     Duration::from_secs(600),
/// ));
/// # task.abort();
/// # }
/// ```
pub async fn run(topology: Topology, node: String, options: ClientOptions, pass: Duration) {
    let Some(me) = topology.index_of(&node) else {
        tracing::warn!(node, "anti-entropy: this node is not in the topology");
        return;
    };
    let ranges: Vec<RangeId> = RangeId::all()
        .filter(|r| {
            let mut replicas = topology.replica_indexes(*r);
            replicas.next() == Some(me) && replicas.next().is_some()
        })
        .collect();
    if ranges.is_empty() {
        return;
    }
    let pause = (pass / ranges.len() as u32).max(MIN_PAUSE);
    tracing::info!(ranges = ranges.len(), ?pass, "anti-entropy started");
    // Connected when some node first answers: the whole cluster may be starting.
    let mut client = None;
    loop {
        let mut differing = Vec::new();
        for &range in &ranges {
            tokio::time::sleep(pause).await;
            if client.is_none() {
                match Client::connect_with(topology.nodes.clone(), options.clone()).await {
                    Ok(c) => client = Some(c),
                    Err(e) => {
                        tracing::debug!(error = %e, "anti-entropy cannot reach the cluster yet");
                        continue;
                    }
                }
            }
            if let Some(client) = &client
                && !compare_range(client, &topology, range).await.agrees()
            {
                differing.push(range);
            }
        }
        if let (Some(client), false) = (&client, differing.is_empty()) {
            tracing::debug!(
                ranges = differing.len(),
                "ranges differ; looking again shortly"
            );
            tokio::time::sleep(SETTLE).await;
            for &range in &differing {
                repair_if_still_differs(client, &topology, range).await;
            }
        }
    }
}

/// Compares `range` again, and repairs it if its replicas still differ.
async fn repair_if_still_differs(client: &Client, topology: &Topology, range: RangeId) {
    let report = compare_range(client, topology, range).await;
    if report.agrees() {
        return;
    }
    match repair(client, std::slice::from_ref(&report)).await {
        Ok(repaired) if repaired.ranges > 0 => tracing::info!(
            range = range.get(),
            pages = repaired.pages,
            changes = repaired.merged.changes,
            "anti-entropy repaired a range whose replicas differed"
        ),
        Ok(_) => tracing::debug!(
            range = range.get(),
            "replicas differ but fewer than two answered; not repaired"
        ),
        Err(e) => tracing::warn!(range = range.get(), error = %e, "anti-entropy repair failed"),
    }
}
