//! The bus messages of replication.

use crate::storage::{Change, ChangeRef, StorageError, unpack_array};
use bytes::Bytes;
use rhinobus::Message;
use serde::{Deserialize, Serialize};

/// Changes committed on node `from` for ranges the receiving node also holds. Several writes
/// travel in one message: a sender ships whatever accumulated while its previous message was
/// being confirmed.
///
/// Senders put the changes in `packed`, encoded once when the write staged them; `changes`
/// is what builds before packed replication sent, still applied. A message with `packed` only
/// fails to decode on such a build (no `changes`), so it goes to its error queue, to be
/// replayed once the node is upgraded, rather than being taken for an empty message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replicate {
    /// The node that accepted the writes.
    pub from: String,
    /// Changes as values, in the order they were committed there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
    /// Changes as a MessagePack array of their encodings (what `changes` would encode to), in
    /// the order they were committed there, after those in `changes`; see
    /// [`storage::write_array`](crate::storage::write_array).
    #[serde(default, skip_serializing_if = "Bytes::is_empty")]
    pub packed: Bytes,
}

impl Replicate {
    /// Every change the message carries, borrowed from it, in order.
    pub fn change_refs(&self) -> Result<Vec<ChangeRef<'_>>, StorageError> {
        let mut refs: Vec<ChangeRef<'_>> = self.changes.iter().map(ChangeRef::from).collect();
        if !self.packed.is_empty() {
            refs.extend(unpack_array(&self.packed)?);
        }
        Ok(refs)
    }
}

impl Message for Replicate {
    const NAME: &'static str = "dht.replicate";

    fn encoded_size_hint(&self) -> usize {
        let changes: usize = self.changes.iter().map(Change::encoded_size).sum();
        64 + self.from.len() + changes + self.packed.len()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{PackedChanges, write_array};
    use crate::version::Version;

    fn put(key: &str) -> Change {
        Change::Put {
            key: key.to_owned().into(),
            version: Version::new(),
            parents: vec![],
            value: "v".into(),
            expires_at: None,
        }
    }

    /// `changes` as a `packed` field.
    fn packed(changes: &[Change]) -> Bytes {
        let packed = PackedChanges::pack(changes).unwrap();
        let mut array = Vec::new();
        write_array(packed.iter().map(|(_, bytes)| bytes), &mut array);
        array.into()
    }

    /// What builds before packed replication decode a message as.
    #[derive(Deserialize)]
    struct BeforePacked {
        #[allow(dead_code)]
        from: String,
        changes: Vec<Change>,
    }

    #[test]
    fn values_and_packed_changes_are_both_applied_in_order() {
        let message = Replicate {
            from: "n1".into(),
            changes: vec![put("a")],
            packed: packed(&[put("b"), put("c")]),
        };
        let back: Replicate =
            rhinobus::message::decode(&rhinobus::message::encode(&message).unwrap()).unwrap();
        let keys: Vec<&[u8]> = back
            .change_refs()
            .unwrap()
            .iter()
            .map(|c| c.key())
            .collect();
        assert_eq!(keys, [b"a", b"b", b"c"]);
    }

    #[test]
    fn a_packed_message_fails_to_decode_on_a_build_before_packing_rather_than_looking_empty() {
        let message = Replicate {
            from: "n1".into(),
            changes: vec![],
            packed: packed(&[put("k")]),
        };
        let body = rhinobus::message::encode(&message).unwrap();
        assert!(rmp_serde::from_slice::<BeforePacked>(&body).is_err());
        // And a message of values only is what such a build reads.
        let legacy = Replicate {
            from: "n1".into(),
            changes: vec![put("k")],
            packed: Bytes::new(),
        };
        let body = rhinobus::message::encode(&legacy).unwrap();
        assert_eq!(
            rmp_serde::from_slice::<BeforePacked>(&body)
                .unwrap()
                .changes
                .len(),
            1
        );
    }

    #[test]
    fn a_corrupt_packed_array_is_an_error() {
        let message = Replicate {
            from: "n1".into(),
            changes: vec![],
            packed: Bytes::from_static(&[0x92, 0xc1]),
        };
        assert!(matches!(
            message.change_refs(),
            Err(StorageError::Corrupt { .. })
        ));
    }
}
