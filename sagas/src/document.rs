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

/// Merges the handled lists of siblings, every id once, keeping each list's order: an id
/// missing so far goes right after the id that came before it in its own list. Siblings
/// share the history of their common parent, so older ids stay in front of newer ones
/// whichever sibling still remembers them, and trimming to the most recent `remember` drops
/// the oldest.
pub(crate) fn union_handled(
    lists: Vec<Vec<HandledMessage>>,
    remember: usize,
) -> Vec<HandledMessage> {
    let mut out: Vec<HandledMessage> = Vec::new();
    for list in lists {
        let mut next = 0;
        for h in list {
            match out.iter().position(|o| o.id == h.id) {
                Some(at) => next = next.max(at + 1),
                None => {
                    out.insert(next, h);
                    next += 1;
                }
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
    fn union_trims_the_oldest_whichever_sibling_remembers_them() {
        let ids = |list: &[HandledMessage]| list.iter().map(|h| h.id.clone()).collect::<Vec<_>>();
        let list = |names: &[&str]| names.iter().map(|n| h(n)).collect::<Vec<_>>();
        // Both diverged from [p1..p5] with room for 5: one handled two messages (forgetting
        // p1, p2), the other one (forgetting p1).
        let a = list(&["p3", "p4", "p5", "a1", "a2"]);
        let b = list(&["p2", "p3", "p4", "p5", "b1"]);
        let merged = union_handled(vec![a.clone(), b.clone()], 5);
        assert_eq!(ids(&merged), ["p4", "p5", "b1", "a1", "a2"]);
        let merged = union_handled(vec![b, a], 5);
        assert_eq!(ids(&merged), ["p4", "p5", "a1", "a2", "b1"]);
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
