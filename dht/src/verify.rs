//! Comparing replicas: whether the replicas of every range hold the same data, by the digest
//! each node computes of its copy ([`Storage::digest`](crate::Storage::digest)), without
//! sending the data itself.
//!
//! Replication in flight shows up as a difference: compare again once writes have stopped (or
//! a moment later) before concluding that replicas diverged, then `--rebuild` the one behind.

use crate::client::{Client, ClientError};
use crate::routing::{RangeId, Topology};
use crate::storage::RangeDigest;
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
}

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
    let mut unreachable: BTreeMap<String, String> = BTreeMap::new();
    let mut reports = Vec::new();
    for range in RangeId::all() {
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
        reports.push(RangeReport { range, replicas });
    }
    reports
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
    }
}
