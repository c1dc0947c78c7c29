//! Anti-entropy: a node compares, in the background, each range it is the primary of with the
//! range's other replicas, by digest ([`compare_range`]), and repairs a range whose replicas
//! still differ a moment later ([`repair`]), as Dynamo's replicas reconcile what replication
//! missed: a replication message parked in the `rhinobus-dht.error` queue and never replayed, a
//! node queue purged by hand, a rebuild that ran while a peer lagged.
//!
//! One pass compares every such range once, spread evenly over the pass (a pass takes
//! longer when the comparisons take longer than their share of it). A difference can be
//! replication in flight, so the ranges that differed are compared again [`SETTLE`] after the
//! pass and repaired only if two replicas that answered still differ and no replica's digest
//! changed in between: a range still taking writes is left to a later pass (under a steady
//! stream of writes to every range, repairing each at every pass cost the bench a third of its
//! throughput). A replica that does not answer is asked nothing more in that pass, and left out
//! of repairs until a later one.
//!
//! Only the primary looks after a range: ranges whose primary is down, or runs without
//! anti-entropy, are not compared. Repairs copy versions without their purged tombstones, so a
//! divergence must be repaired within the tombstone grace, or a version removed since comes
//! back: [`max_pass`] is the longest pass a grace allows.

use crate::client::{Client, ClientOptions};
use crate::routing::{RangeId, Topology};
use crate::verify::{RangeReport, Unreachable, compare_range, repair};
use std::time::Duration;
use tokio::time::Instant;

/// How long the ranges that differed in a pass are given to agree before they are repaired:
/// far longer than replication takes under load (tens of milliseconds).
pub const SETTLE: Duration = Duration::from_secs(5);

/// The shortest pause between two ranges, however short the pass.
const MIN_PAUSE: Duration = Duration::from_millis(10);

/// The longest pass that repairs a divergence within `grace` of its start: it can arise just
/// after its range was compared, be seen a pass later and repaired [`SETTLE`] after that, so
/// two passes and the settle must fit, with room to spare for passes that overrun (a quarter
/// of the grace). `None` when the grace is too short for any pass.
pub fn max_pass(grace: Duration) -> Option<Duration> {
    let budget = grace.checked_sub(grace / 4)?.checked_sub(SETTLE)?;
    Some(budget / 2).filter(|p| !p.is_zero())
}

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
    let step = pass / ranges.len() as u32;
    tracing::info!(ranges = ranges.len(), ?pass, "anti-entropy started");
    // Connected when some node first answers: the whole cluster may be starting.
    let mut client = None;
    loop {
        let start = Instant::now();
        let mut unreachable = Unreachable::new();
        let mut differing = Vec::new();
        for (i, &range) in ranges.iter().enumerate() {
            let due = start + step * i as u32;
            tokio::time::sleep_until(due.max(Instant::now() + MIN_PAUSE)).await;
            if client.is_none() {
                match Client::connect_with(topology.nodes.clone(), options.clone()).await {
                    Ok(c) => client = Some(c),
                    Err(e) => {
                        tracing::debug!(error = %e, "anti-entropy cannot reach the cluster yet");
                        continue;
                    }
                }
            }
            if let Some(client) = &client {
                let report = compare_range(client, &topology, range, &mut unreachable).await;
                if report.needs_repair() {
                    differing.push(report);
                }
            }
        }
        if !differing.is_empty()
            && let Some(client) = &client
        {
            tracing::debug!(
                ranges = differing.len(),
                "ranges differ; looking again shortly"
            );
            tokio::time::sleep(SETTLE).await;
            let mut unreachable = Unreachable::new();
            for first in &differing {
                repair_if_settled(client, &topology, first, &mut unreachable).await;
            }
        }
        tokio::time::sleep_until(start + pass).await;
    }
}

/// Compares the range of `first` (its first look) again, and repairs it if two of its replicas
/// that answered still differ while none changed since: a range whose replicas are still
/// taking writes differs because of the replication in flight, and waits for a quieter pass.
async fn repair_if_settled(
    client: &Client,
    topology: &Topology,
    first: &RangeReport,
    unreachable: &mut Unreachable,
) {
    let range = first.range;
    let report = compare_range(client, topology, range, unreachable).await;
    if !report.needs_repair() {
        return;
    }
    if changed(first, &report) {
        tracing::debug!(
            range = range.get(),
            "range still taking writes; left to a later pass"
        );
        return;
    }
    match repair(client, std::slice::from_ref(&report)).await {
        Ok(repaired) => tracing::info!(
            range = range.get(),
            pages = repaired.pages,
            changes = repaired.merged.changes,
            "anti-entropy repaired a range whose replicas differed"
        ),
        Err(e) => tracing::warn!(range = range.get(), error = %e, "anti-entropy repair failed"),
    }
}

/// Whether a replica that answered both looks at a range gave different digests.
fn changed(before: &RangeReport, now: &RangeReport) -> bool {
    (before.replicas.iter().zip(&now.replicas))
        .any(|((_, b), (_, n))| matches!((b, n), (Ok(b), Ok(n)) if b != n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::RangeDigest;

    fn look(digests: &[Option<&str>]) -> RangeReport {
        let digest = |d: &Option<&str>| match d {
            Some(md5) => Ok(RangeDigest {
                keys: 1,
                md5: (*md5).into(),
            }),
            None => Err("down".into()),
        };
        RangeReport {
            range: RangeId::of(b"k"),
            replicas: (digests.iter().enumerate())
                .map(|(i, d)| (format!("n{i}"), digest(d)))
                .collect(),
        }
    }

    #[test]
    fn a_range_changed_when_a_replica_answered_twice_differently() {
        let before = look(&[Some("a"), Some("b"), None]);
        assert!(!changed(&before, &look(&[Some("a"), Some("b"), Some("c")])));
        assert!(!changed(&before, &look(&[None, Some("b"), None])));
        assert!(changed(&before, &look(&[Some("a"), Some("c"), None])));
    }

    #[test]
    fn a_pass_fits_twice_in_three_quarters_of_the_grace_after_the_settle() {
        let day = Duration::from_secs(86_400);
        assert_eq!(max_pass(day * 10), Some((day * 10 * 3 / 4 - SETTLE) / 2));
        assert!(max_pass(Duration::from_secs(60)).is_some_and(|p| p < Duration::from_secs(21)));
        assert_eq!(max_pass(SETTLE), None);
        assert_eq!(max_pass(Duration::ZERO), None);
    }
}
