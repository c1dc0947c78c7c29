//! Which failed messages an operation applies to.

use super::FailedMessage;
use std::time::SystemTime;

/// Which failed messages an operation applies to. Every criterion given must match; a
/// selection with no criterion and without `all` selects nothing.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Message ids (or the digests shown for messages without one).
    pub ids: Vec<String>,
    /// A failure group id.
    pub group: Option<String>,
    /// A message type.
    pub message_type: Option<String>,
    /// A source queue.
    pub source_queue: Option<String>,
    /// Only failures at or after this time.
    pub since: Option<SystemTime>,
    /// Everything (further narrowed by the other criteria).
    pub all: bool,
}

impl Selection {
    /// Every message.
    pub fn all() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }

    /// The messages with these ids.
    pub fn ids(ids: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            ids: ids.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Whether any criterion was given.
    pub fn is_empty(&self) -> bool {
        !self.all
            && self.ids.is_empty()
            && self.group.is_none()
            && self.message_type.is_none()
            && self.source_queue.is_none()
            && self.since.is_none()
    }

    /// Whether `m` is selected.
    pub fn matches(&self, m: &FailedMessage) -> bool {
        if self.is_empty() {
            return false;
        }
        (self.ids.is_empty() || self.ids.contains(&m.id))
            && self.group.as_ref().is_none_or(|g| *g == m.group_id())
            && self
                .message_type
                .as_ref()
                .is_none_or(|t| Some(t) == m.message_type.as_ref())
            && self
                .source_queue
                .as_ref()
                .is_none_or(|q| Some(q) == m.source_queue.as_ref())
            && self
                .since
                .is_none_or(|since| m.failed_at.is_some_and(|at| at >= since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::{Headers, names};

    #[test]
    fn an_empty_selection_selects_nothing_and_criteria_combine() {
        let mut h = Headers::new();
        h.insert(names::MESSAGE_ID.into(), "m1".into());
        h.insert(names::MESSAGE_TYPE.into(), "t".into());
        let m = FailedMessage::new(h, vec![]);
        assert!(!Selection::default().matches(&m));
        assert!(Selection::all().matches(&m));
        assert!(Selection::ids(["m1"]).matches(&m));
        assert!(!Selection::ids(["m2"]).matches(&m));
        let typed = Selection {
            message_type: Some("t".into()),
            ids: vec!["m2".into()],
            ..Selection::default()
        };
        assert!(!typed.matches(&m));
    }
}
