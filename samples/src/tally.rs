//! The tally saga: the smallest saga that shows whether every update was applied exactly
//! once. The integration tests, the crash-test worker and the saga bench scenarios use it.
//!
//! Every [`TallyUpdate`] initiates or continues the tally named in it; the state records the
//! update numbers in the order they were applied, so a duplicate or a gap is visible. Each
//! update is acknowledged with a [`TallyApplied`] to the audit queue, if one is configured.

use async_trait::async_trait;
use rhinobus::{HandlerError, Message};
use rhinobus_sagas::{
    InitiatedBy, MergeSagaState, OrchestratesMerge, Routes, Saga, SagaContext, SagaStateMerger,
};
use serde::{Deserialize, Serialize};

/// One update of one tally.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TallyUpdate {
    /// Which tally.
    pub tally: String,
    /// The update's number, unique per run.
    pub update: u64,
    /// When it was sent, for the bench's latencies (microseconds since the bench started).
    #[serde(default)]
    pub sent_at_micros: u64,
}

impl Message for TallyUpdate {
    const NAME: &'static str = "tally.update";
}

/// Sent to the audit queue for each applied update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TallyApplied {
    /// Which tally.
    pub tally: String,
    /// The update applied.
    pub update: u64,
}

impl Message for TallyApplied {
    const NAME: &'static str = "tally.applied";
}

/// A tally's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// Update numbers in the order they were applied (merged: sorted union).
    pub applied: Vec<u64>,
    /// How many merges the saga saw.
    pub merges: u64,
}

/// The tally saga; `audit` is the queue that gets a [`TallyApplied`] per update.
#[derive(Debug, Clone, Default)]
pub struct TallySaga {
    /// Queue for [`TallyApplied`] messages; none are sent when `None`.
    pub audit: Option<String>,
}

impl Saga for TallySaga {
    const NAME: &'static str = "samples.tally";
    type State = Tally;
    type Key = String;

    fn routes(routes: &mut Routes<Self>) {
        routes.initiated_by::<TallyUpdate>();
    }
}

#[async_trait]
impl InitiatedBy<TallyUpdate> for TallySaga {
    fn correlate(m: &TallyUpdate) -> String {
        m.tally.clone()
    }

    async fn handle(
        &self,
        m: TallyUpdate,
        saga: &mut SagaContext<Self>,
    ) -> Result<(), HandlerError> {
        saga.state.applied.push(m.update);
        if let Some(audit) = &self.audit {
            saga.send(
                audit,
                &TallyApplied {
                    tally: m.tally,
                    update: m.update,
                },
            )?;
        }
        Ok(())
    }
}

#[async_trait]
impl OrchestratesMerge for TallySaga {
    async fn merged(
        &self,
        _merge: MergeSagaState<Tally>,
        saga: &mut SagaContext<Self>,
    ) -> Result<(), HandlerError> {
        saga.state.merges += 1;
        Ok(())
    }
}

/// Merges tallies: every update of every sibling, once each.
#[derive(Debug, Clone, Copy, Default)]
pub struct TallyMerger;

impl SagaStateMerger<Tally> for TallyMerger {
    fn merge(&self, states: Vec<Tally>) -> Tally {
        let merges = states.iter().map(|s| s.merges).max().unwrap_or(0);
        let mut applied: Vec<u64> = states.into_iter().flat_map(|s| s.applied).collect();
        applied.sort_unstable();
        applied.dedup();
        Tally { applied, merges }
    }
}
