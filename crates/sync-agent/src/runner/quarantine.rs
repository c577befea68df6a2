//! Self-government: which peers can give a second opinion, and the quarantine of an agent whose
//! failures its peers keep overruling. The rule (README, "Running several agents"): over the
//! last [`WINDOW`] heartbeats, at least [`MIN_OVERRULED`] of this agent's failures were
//! overruled (a peer of its zone then got past authentication on the same server), and they are
//! at least half of the attempts it made in that time. A quarantined agent claims nothing; it
//! returns to service when its own check passes (it logs in to a server it was overruled on) or
//! when an operator asks (`sync-agent agents resume ID`). And the version skew: on every
//! heartbeat the agent checks that the schema is inside its range (`schema::check`); outside,
//! it claims nothing, hands over the runs that have not reached their server, and serves again
//! once the schema is back in range.

use fleetsync_common::{AgentId, ServerId};
use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use crate::{
    model::{AgentState, Outcome},
    store::{AgentRecord, Verdicts},
};

use super::Runner;

/// Heartbeats the quarantine rule looks back over (a third of a lease TTL apart: about three
/// TTLs).
pub(super) const WINDOW: usize = 9;
/// Fewest overruled failures in the window that quarantine an agent.
pub(super) const MIN_OVERRULED: u64 = 5;
/// Servers remembered for the agent's own check (the latest it handed to a peer).
const CHECK_CANDIDATES: usize = 8;

/// One heartbeat's totals since the agent started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Sample {
    /// Runs it recorded plus failures it handed over.
    pub attempts: u64,
    /// Its failures peers overruled.
    pub overruled: u64,
}

/// Whether the samples (oldest first) call for quarantine; the reason if so.
pub(super) fn verdict(samples: &VecDeque<Sample>) -> Option<String> {
    let (first, last) = (samples.front()?, samples.back()?);
    let overruled = last.overruled.saturating_sub(first.overruled);
    let attempts = last.attempts.saturating_sub(first.attempts).max(1);
    (overruled >= MIN_OVERRULED && overruled * 2 >= attempts).then(|| {
        format!(
            "{overruled} of its {attempts} latest attempts failed where a peer of its zone then \
             succeeded (its SSH key or its network, not the servers)"
        )
    })
}

/// The agent's standing: its state and reason, what the rule looks at, and the servers its own
/// check may try.
#[derive(Debug, Default)]
pub(super) struct Standing {
    /// Live serving peers of its zone (read from the registry at each heartbeat).
    pub peers: AtomicUsize,
    /// Failures handed to a peer since start.
    pub asked: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    quarantined: Option<String>,
    incompatible: Option<String>,
    samples: VecDeque<Sample>,
    handed_over: VecDeque<ServerId>,
}

impl Standing {
    /// The reason this agent is quarantined, if it is.
    pub(super) fn quarantined(&self) -> Option<String> {
        self.inner.lock().expect("standing").quarantined.clone()
    }

    /// Why the schema is outside this agent's range, if it is.
    pub(super) fn incompatible(&self) -> Option<String> {
        self.inner.lock().expect("standing").incompatible.clone()
    }

    /// Whether it may claim work: neither quarantined nor out of the schema's range.
    pub(super) fn claims(&self) -> bool {
        let inner = self.inner.lock().expect("standing");
        inner.quarantined.is_none() && inner.incompatible.is_none()
    }

    /// Records the schema check; true when the answer changed.
    fn schema_checked(&self, incompatible: Option<String>) -> bool {
        let mut inner = self.inner.lock().expect("standing");
        let changed = inner.incompatible != incompatible;
        inner.incompatible = incompatible;
        changed
    }

    /// A failure on `server_id` was handed to a peer.
    pub(super) fn handed_over(&self, server_id: ServerId) {
        self.asked.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.inner.lock().expect("standing");
        inner.handed_over.retain(|&id| id != server_id);
        inner.handed_over.push_back(server_id);
        if inner.handed_over.len() > CHECK_CANDIDATES {
            inner.handed_over.pop_front();
        }
    }

    /// Takes one heartbeat's sample; returns the reason when it quarantines the agent now.
    fn observe(&self, sample: Sample) -> Option<String> {
        let mut inner = self.inner.lock().expect("standing");
        inner.samples.push_back(sample);
        while inner.samples.len() > WINDOW {
            inner.samples.pop_front();
        }
        if inner.quarantined.is_some() {
            return None;
        }
        let reason = verdict(&inner.samples)?;
        inner.quarantined = Some(reason.clone());
        Some(reason)
    }

    /// Back to service: the window starts afresh (what happened before does not count twice).
    fn resume(&self) {
        let mut inner = self.inner.lock().expect("standing");
        inner.quarantined = None;
        let last = inner.samples.back().copied();
        inner.samples.clear();
        inner.samples.extend(last);
    }

    fn candidates(&self) -> Vec<ServerId> {
        let inner = self.inner.lock().expect("standing");
        inner.handed_over.iter().rev().copied().collect()
    }
}

/// Live serving agents of `zone` other than `me` in the registry.
pub(super) fn live_peers(agents: &[AgentRecord], me: &AgentId, zone: &str) -> usize {
    agents
        .iter()
        .filter(|a| {
            a.report.id != *me && a.report.zone == zone && a.status.state == AgentState::Serving
        })
        .count()
}

impl Runner {
    /// Reads the registry's view of the peers, judges this agent's standing from what its row
    /// says (`verdicts`, `None` when unknown this time), and acts: quarantine, its own check,
    /// or an operator's resume.
    pub(super) async fn govern(&self, verdicts: Option<Verdicts>) {
        match self.store.agents().await {
            Ok(agents) => {
                let peers = live_peers(&agents, &self.holder, &self.report.zone);
                self.standing.peers.store(peers, Ordering::Relaxed);
            }
            Err(err) => tracing::warn!(error = %err, "could not read the registry of agents"),
        }
        let Some(verdicts) = verdicts else { return };
        let attempts = self.metrics.outcomes().values().sum::<u64>()
            + self.standing.asked.load(Ordering::Relaxed);
        if let Some(reason) = self.standing.observe(Sample {
            attempts,
            overruled: verdicts.overruled,
        }) {
            tracing::error!(%reason, "quarantined: claiming nothing until its own check passes or an operator resumes it (sync-agent agents resume)");
            self.publish_state();
            return;
        }
        if self.standing.quarantined().is_none() {
            return;
        }
        if let Some(at) = verdicts.resume_requested_at {
            tracing::warn!("an operator resumed this agent: serving again");
            self.standing.resume();
            if let Err(err) = self.store.clear_resume_request(&self.holder, at).await {
                tracing::warn!(error = %err, "could not clear the resume request");
            }
            self.publish_state();
            return;
        }
        if let Some(server) = self.own_check().await {
            tracing::warn!(
                server_id = server.get(),
                "its own check passed (logged in to a server it had failed on): serving again"
            );
            self.standing.resume();
            self.publish_state();
        }
    }

    /// Whether the schema is still inside this agent's range: outside, it stops claiming (and
    /// its runs not yet at their server hand them over); back inside, it serves again. A
    /// database it cannot read changes nothing (the lease heartbeat says the rest).
    pub(super) async fn check_schema(&self) {
        let incompatible = match crate::schema::check(self.store.db()).await {
            Ok(_) => None,
            Err(err) if err.out_of_range() => Some(err.to_string()),
            Err(err) => {
                tracing::warn!(error = %err, "could not check the schema");
                return;
            }
        };
        if !self.standing.schema_checked(incompatible.clone()) {
            return;
        }
        match incompatible {
            Some(reason) => tracing::error!(
                %reason,
                "the schema is outside this agent's range: claiming nothing, handing over what has not reached its server"
            ),
            None => tracing::warn!(
                range = %crate::schema::range(),
                "the schema is inside this agent's range again: serving"
            ),
        }
        self.publish_state();
    }

    /// Tries to log in to the servers it handed over, newest first; the first it logs in to.
    async fn own_check(&self) -> Option<ServerId> {
        for id in self.standing.candidates() {
            let server = match self.store.server(id).await {
                Ok(Some(server)) => server,
                Ok(None) => continue,
                Err(err) => {
                    tracing::warn!(error = %err, "own check: could not read a server");
                    return None;
                }
            };
            let check = self.ssh.check(server.target()).await;
            match &check.error {
                None if check.authenticated => return Some(id),
                None => {}
                Some(err) => {
                    let (outcome, _) = err.outcome();
                    tracing::info!(server_id = id.get(), %outcome, error = %err, "own check failed; still quarantined");
                    if outcome == Outcome::HostKeyMismatch {
                        continue;
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(points: &[(u64, u64)]) -> VecDeque<Sample> {
        points
            .iter()
            .map(|&(attempts, overruled)| Sample {
                attempts,
                overruled,
            })
            .collect()
    }

    #[test]
    fn quarantine_needs_enough_overruled_failures_and_half_the_attempts() {
        // A key no host accepts: every attempt fails and is overruled.
        assert!(verdict(&samples(&[(0, 0), (40, 30)])).is_some());
        // Too few to judge.
        assert!(verdict(&samples(&[(0, 0), (4, 4)])).is_none());
        // Cut off from a tenth of the fleet: overruled there, fine elsewhere.
        assert!(verdict(&samples(&[(0, 0), (1000, 100)])).is_none());
        // Only what happened in the window counts.
        assert!(verdict(&samples(&[(1000, 100), (1010, 100)])).is_none());
        assert!(verdict(&samples(&[])).is_none());
        let standing = Standing::default();
        assert_eq!(standing.observe(Sample::default()), None);
        let reason = standing.observe(Sample {
            attempts: 10,
            overruled: 10,
        });
        assert!(reason.is_some_and(|r| r.starts_with("10 of its 10 latest attempts")));
        assert!(standing.quarantined().is_some());
        standing.resume();
        assert_eq!(standing.quarantined(), None);
        assert_eq!(
            standing.observe(Sample {
                attempts: 11,
                overruled: 10,
            }),
            None,
            "the window starts afresh"
        );
    }
}
