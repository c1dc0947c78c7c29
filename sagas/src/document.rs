//! What is stored under a saga's key: the state, and the messages recently handled with what
//! each of them sent.

use crate::error::SagaError;
use rhinobus::transport::OutgoingMessage;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// One stored version of a saga instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(bound(deserialize = "St: DeserializeOwned", serialize = "St: Serialize"))]
pub(crate) struct SagaDocument<St> {
    /// `None` once the saga completed: the document stays (for a while) so that late and
    /// redelivered messages are recognised instead of starting the saga again.
    pub(crate) state: Option<St>,
    /// Recently handled messages, oldest first.
    #[serde(default)]
    pub(crate) handled: Vec<HandledMessage>,
}

/// A message the saga handled, and what that handling sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct HandledMessage {
    pub(crate) id: String,
    /// Envelopes and all, so that a redelivery stages them again with the same ids.
    #[serde(default)]
    pub(crate) outgoing: Vec<OutgoingMessage>,
}

impl<St> SagaDocument<St> {
    pub(crate) fn handled(&self, message_id: &str) -> Option<&HandledMessage> {
        self.handled.iter().rev().find(|h| h.id == message_id)
    }

    /// Records a handling and forgets the oldest beyond `remember`.
    pub(crate) fn remember(&mut self, handled: HandledMessage, remember: usize) {
        self.handled.push(handled);
        let excess = self.handled.len().saturating_sub(remember.max(1));
        self.handled.drain(..excess);
    }
}

impl<St: Serialize> SagaDocument<St> {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, SagaError> {
        rmp_serde::to_vec_named(self).map_err(|e| SagaError::Encode(e.to_string()))
    }
}

impl<St: DeserializeOwned> SagaDocument<St> {
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, SagaError> {
        rmp_serde::from_slice(bytes).map_err(|e| SagaError::Corrupt(e.to_string()))
    }
}

/// Merges the handled lists of siblings: every id once, in the order first seen, the most
/// recent `remember` kept.
pub(crate) fn union_handled(
    lists: Vec<Vec<HandledMessage>>,
    remember: usize,
) -> Vec<HandledMessage> {
    let mut out: Vec<HandledMessage> = Vec::new();
    for list in lists {
        for h in list {
            if !out.iter().any(|o| o.id == h.id) {
                out.push(h);
            }
        }
    }
    let excess = out.len().saturating_sub(remember.max(1));
    out.drain(..excess);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(id: &str) -> HandledMessage {
        HandledMessage {
            id: id.into(),
            outgoing: Vec::new(),
        }
    }

    #[test]
    fn remembers_a_bounded_window() {
        let mut doc = SagaDocument::<u32> {
            state: Some(1),
            handled: Vec::new(),
        };
        for i in 0..5 {
            doc.remember(h(&i.to_string()), 3);
        }
        let ids: Vec<_> = doc.handled.iter().map(|h| h.id.as_str()).collect();
        assert_eq!(ids, ["2", "3", "4"]);
        assert!(doc.handled("4").is_some() && doc.handled("1").is_none());
    }

    #[test]
    fn union_keeps_each_id_once() {
        let merged = union_handled(vec![vec![h("a"), h("b")], vec![h("b"), h("c")]], 10);
        let ids: Vec<_> = merged.iter().map(|h| h.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(SagaDocument::<u32>::decode(&[0xc1, 0x00]).is_err());
    }
}
