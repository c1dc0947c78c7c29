//! Comparing replicas: whether the replicas of every range hold the same data, by the digest
//! each node computes of its copy ([`Storage::digest`](crate::Storage::digest)), without
//! sending the data itself.
//!
//! Replication in flight shows up as a difference: compare again once writes have stopped (or
//! a moment later) before concluding that replicas diverged. Then [`repair`] them (`verify
//! --repair`), or `--rebuild` a node that lost its data.

use crate::client::{Client, ClientError};
use crate::routing::{RangeId, Topology};
use crate::storage::{Merged, PageCursor, RangeDigest};
use std::collections::BTreeMap;

/// One range as each of its replicas holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeReport {
    /// The range.
    pub range: RangeId,
    /// Each replica's digest, primary first, or why it has none.
    pub replicas: Vec<(String, Result<RangeDigest, String>)>,
}

impl RangeReport {
    /// Whether every replica answered, with the same digest.
    pub fn agrees(&self) -> bool {
        let mut digests = self.replicas.iter().map(|(_, d)| d.as_ref().ok());
        match digests.next() {
            Some(Some(first)) => digests.all(|d| d == Some(first)),
            _ => false,
        }
    }

    /// Whether a repair would change anything: at least two replicas answered, with
    /// different digests. (Replicas that did not answer cannot take part in a repair.)
    pub fn needs_repair(&self) -> bool {
        let mut answered = self.replicas.iter().filter_map(|(_, d)| d.as_ref().ok());
        match answered.next() {
            Some(first) => answered.any(|d| d != first),
            None => false,
        }
    }
}

/// Replicas that could not be reached, by address, with the error: asked nothing more.
pub type Unreachable = BTreeMap<String, String>;

/// Asks every replica of every range of `topology` for its digest of the range. A node that
/// cannot be reached is asked nothing more (its ranges report the connection error).
///
/// ```no_run
/// # async fn run() -> Result<(), rhinobus_dht::ClientError> {
/// use rhinobus_dht::Client;
/// use rhinobus_dht::verify::compare_replicas;
///
/// let client = Client::connect("127.0.0.1:7481").await?;
/// let reports = compare_replicas(&client, &client.topology()).await;
/// let differing: Vec<_> = reports.iter().filter(|r| !r.agrees()).collect();
/// println!("{} of {} ranges differ", differing.len(), reports.len());
/// # Ok(()) }
/// ```
pub async fn compare_replicas(client: &Client, topology: &Topology) -> Vec<RangeReport> {
    let mut unreachable = Unreachable::new();
    let mut reports = Vec::new();
    for range in RangeId::all() {
        reports.push(compare_range(client, topology, range, &mut unreachable).await);
    }
    reports
}

/// [`compare_replicas`] for one range: asks each replica of `range` for its digest, except
/// those in `unreachable`, to which a replica that cannot be reached is added.
pub async fn compare_range(
    client: &Client,
    topology: &Topology,
    range: RangeId,
    unreachable: &mut Unreachable,
) -> RangeReport {
    let mut replicas = Vec::new();
    for addr in topology.replicas(range) {
        let digest = match unreachable.get(addr) {
            Some(e) => Err(e.clone()),
            None => match client.digest(addr, range).await {
                Ok(d) => Ok(d),
                Err(e) => {
                    if matches!(e, ClientError::Connect { .. } | ClientError::Timeout { .. }) {
                        unreachable.insert(addr.to_owned(), e.to_string());
                    }
                    Err(e.to_string())
                }
            },
        };
        replicas.push((addr.to_owned(), digest));
    }
    RangeReport { range, replicas }
}

/// What a repair copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repaired {
    /// Ranges copied between their replicas.
    pub ranges: usize,
    /// Pages copied, from every replica to every other.
    pub pages: usize,
    /// What merging the pages wrote, on all replicas.
    pub merged: Merged,
}

/// Copies every range of `reports` that [needs repair](RangeReport::needs_repair) from each
/// replica that answered into each other one, page by page, merged as a rebuild merges
/// ([`Storage::merge_range_page`](crate::Storage::merge_range_page)). Merging only adds
/// versions and tombstones, and a
/// tombstone wins over the version it supersedes, so afterwards each of them holds the union
/// of what they held minus what any of them superseded (what a replica purged past its
/// tombstone grace may come back from one that never saw it removed: repair within the grace).
/// A replica that did not answer the digest is left out (and replicas that answered alike are
/// left alone). Stops at the first failure; what was merged until then stays merged.
///
/// ```no_run
/// # async fn run() -> Result<(), rhinobus_dht::ClientError> {
/// use rhinobus_dht::Client;
/// use rhinobus_dht::verify::{compare_replicas, repair};
///
/// let client = Client::connect("127.0.0.1:7481").await?;
/// let reports = compare_replicas(&client, &client.topology()).await;
/// let repaired = repair(&client, &reports).await?;
/// println!("{} ranges repaired", repaired.ranges);
/// # Ok(()) }
/// ```
pub async fn repair(client: &Client, reports: &[RangeReport]) -> Result<Repaired, ClientError> {
    let mut repaired = Repaired::default();
    for report in reports.iter().filter(|r| r.needs_repair()) {
        let answered: Vec<&str> = (report.replicas.iter())
            .filter(|(_, d)| d.is_ok())
            .map(|(addr, _)| addr.as_str())
            .collect();
        for from in &answered {
            let mut cursor: Option<PageCursor> = None;
            loop {
                let mut page = client.range_page(from, report.range, cursor, None).await?;
                cursor = page.next.take();
                repaired.pages += 1;
                for to in answered.iter().filter(|to| *to != from) {
                    let merged = client.merge_page(to, report.range, page.clone()).await?;
                    repaired.merged += merged;
                }
                if cursor.is_none() {
                    break;
                }
            }
        }
        repaired.ranges += 1;
    }
    Ok(repaired)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(keys: u64, md5: &str) -> Result<RangeDigest, String> {
        Ok(RangeDigest {
            keys,
            md5: md5.into(),
        })
    }

    #[test]
    fn a_range_agrees_only_when_every_replica_answered_the_same() {
        let report = |replicas: Vec<Result<RangeDigest, String>>| RangeReport {
            range: RangeId::of(b"k"),
            replicas: (replicas.into_iter())
                .enumerate()
                .map(|(i, d)| (format!("n{i}"), d))
                .collect(),
        };
        assert!(report(vec![digest(1, "a"), digest(1, "a"), digest(1, "a")]).agrees());
        assert!(!report(vec![digest(1, "a"), digest(1, "b"), digest(1, "a")]).agrees());
        assert!(!report(vec![digest(1, "a"), Err("down".into())]).agrees());
        assert!(!report(vec![Err("down".into()), digest(1, "a")]).agrees());
        assert!(!report(vec![]).agrees());
        // Repair needs two replicas that answered differently.
        assert!(report(vec![digest(1, "a"), Err("down".into()), digest(2, "b")]).needs_repair());
        assert!(!report(vec![digest(1, "a"), Err("down".into()), digest(1, "a")]).needs_repair());
        assert!(!report(vec![digest(1, "a"), Err("down".into())]).needs_repair());
        assert!(!report(vec![digest(1, "a"), digest(1, "a"), digest(1, "a")]).needs_repair());
    }
}
