//! The bus messages of replication.

use crate::storage::Change;
use rhinobus::Message;
use serde::{Deserialize, Serialize};

/// Changes committed on node `from` for ranges the receiving node also holds. Several writes
/// travel in one message: a sender ships whatever accumulated while its previous message was
/// being confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replicate {
    /// The node that accepted the writes.
    pub from: String,
    /// The changes, in the order they were committed there.
    pub changes: Vec<Change>,
}

impl Message for Replicate {
    const NAME: &'static str = "dht.replicate";

    fn encoded_size_hint(&self) -> usize {
        self.from.len() + self.changes.iter().map(Change::encoded_size).sum::<usize>()
    }
}

/// A node sends this to its own queue when it starts: once it comes back out, everything that
/// was queued before it has been applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatchUpMarker {
    /// The node that sent it.
    pub node: String,
    /// Unique per start-up, so a marker left over from an earlier life is not mistaken for it.
    pub token: String,
}

impl Message for CatchUpMarker {
    const NAME: &'static str = "dht.catch-up-marker";
}
