//! The leases this agent holds: taken at the claim, renewed together by one heartbeat (after
//! shutdown too, while runs finish), checked fresh before a run's command, and let go when the
//! run's guard drops.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fleetsync_common::ServerId;
use prometheus_client::metrics::gauge::Gauge;

use super::Runner;
use crate::{
    model::AgentState,
    store::{AgentStatus, Claim},
};

/// The leases this agent holds for runs in flight or waiting to be recorded: the heartbeat
/// renews exactly these. A lease leaves the set when its guard drops, whatever ends the run
/// (recorded, released, or a panic), so no lease is renewed past the run that holds it.
///
/// Each lease also keeps when it was last taken or renewed by this agent's clock (the moment
/// before the statement was sent, so never later than the database's): a run that finds its
/// lease older than the TTL (the agent stalled: a pause, a frozen VM, `SIGSTOP`) does not start
/// its command, as another agent may be running the server by now.
#[derive(Debug, Default)]
pub(super) struct HeldLeases {
    /// server id -> (token, when it was last taken or renewed).
    leases: Mutex<HashMap<ServerId, (i64, Instant)>>,
    /// `fleetsync_leases_held`.
    gauge: Gauge,
}

impl HeldLeases {
    /// An empty set that keeps `gauge` at its size.
    pub(super) fn new(gauge: Gauge) -> Self {
        Self {
            leases: Mutex::default(),
            gauge,
        }
    }

    /// Holds `claim`, taken by a statement sent at `taken`.
    pub(super) fn hold(self: &Arc<Self>, claim: Claim, taken: Instant) -> LeaseGuard {
        let mut leases = self.leases.lock().expect("lease set");
        leases.insert(claim.server_id, (claim.token, taken));
        self.gauge.set(leases.len() as i64);
        drop(leases);
        LeaseGuard {
            leases: Arc::clone(self),
            claim,
        }
    }

    /// The leases of `ids` were renewed by a statement sent at `sent`.
    pub(super) fn renewed(&self, ids: &[ServerId], sent: Instant) {
        let mut leases = self.leases.lock().expect("lease set");
        for id in ids {
            if let Some((_, at)) = leases.get_mut(id) {
                *at = (*at).max(sent);
            }
        }
    }

    /// How many of `asked` are still held here but were not `renewed`.
    pub(super) fn stale_among(&self, asked: &[ServerId], renewed: &[ServerId]) -> usize {
        let renewed: std::collections::HashSet<ServerId> = renewed.iter().copied().collect();
        let leases = self.leases.lock().expect("lease set");
        asked
            .iter()
            .filter(|id| !renewed.contains(id) && leases.contains_key(id))
            .count()
    }

    /// True while `claim` was taken or renewed less than `within` ago (by this agent's clock).
    pub(super) fn fresh(&self, claim: &Claim, within: Duration) -> bool {
        self.leases
            .lock()
            .expect("lease set")
            .get(&claim.server_id)
            .is_some_and(|(token, at)| *token == claim.token && at.elapsed() < within)
    }

    pub(super) fn server_ids(&self) -> Vec<ServerId> {
        self.leases
            .lock()
            .expect("lease set")
            .keys()
            .copied()
            .collect()
    }
}

/// Holds one lease in [`HeldLeases`] until dropped.
#[derive(Debug)]
pub(super) struct LeaseGuard {
    leases: Arc<HeldLeases>,
    claim: Claim,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let mut held = self.leases.leases.lock().expect("lease set");
        if held
            .get(&self.claim.server_id)
            .is_some_and(|(token, _)| *token == self.claim.token)
        {
            held.remove(&self.claim.server_id);
            self.leases.gauge.set(held.len() as i64);
        }
    }
}

impl Runner {
    /// Renews every lease this agent holds, a third of the TTL apart, in one statement; after
    /// shutdown too, while the runs in flight finish. It never waits on a lease row that
    /// another transaction holds (`Store::renew` skips locked rows): a completion stuck behind
    /// someone else's lock cannot hold up the renewal of every other lease.
    pub(super) async fn heartbeat_forever(self: Arc<Self>) {
        let ttl = self.config.lease_ttl;
        loop {
            tokio::select! {
                () = self.abandon.cancelled() => return,
                () = tokio::time::sleep(ttl / 3) => {}
            }
            // First: a schema rolled back under this agent must not make it write columns
            // the schema no longer has.
            self.check_schema().await;
            self.renew_leases().await;
            if self.standing.incompatible().is_some() {
                self.report_standing_down().await;
                continue;
            }
            let verdicts = self.report_alive().await;
            self.govern(verdicts).await;
        }
    }

    /// One renewal of every lease held.
    async fn renew_leases(&self) {
        let ttl = self.config.lease_ttl;
        {
            let ids = self.held.server_ids();
            if ids.is_empty() {
                return;
            }
            let sent = Instant::now();
            match self
                .store
                .renew(&self.holder, &ids, ttl.as_millis() as i64)
                .await
            {
                Ok(renewal) => {
                    self.held.renewed(&renewal.renewed, sent);
                    // A lease released between the snapshot and the renewal is not lost: only
                    // those still held here and not renewed are. A busy one (locked by our
                    // completion of its run) is not lost either: nobody can claim it while
                    // it is locked, and the completer renews it if it must start over.
                    let mut kept = renewal.renewed;
                    kept.extend(renewal.busy);
                    let lost = self.held.stale_among(&ids, &kept);
                    if lost > 0 {
                        tracing::warn!(held = ids.len(), lost, "some leases were lost");
                    }
                }
                Err(err) => tracing::warn!(error = %err, "lease heartbeat failed"),
            }
        }
    }

    /// This agent's state as the registry shows it now.
    fn status(&self, stopped: bool) -> AgentStatus {
        let (state, reason) = if stopped {
            (AgentState::Gone, "stopped".to_owned())
        } else if self.shutdown.is_cancelled() {
            (
                AgentState::Draining,
                "shutting down: claims nothing new, finishes or hands over what it holds"
                    .to_owned(),
            )
        } else if let Some(reason) = self.standing.incompatible() {
            (AgentState::Incompatible, reason)
        } else if let Some(reason) = self.standing.quarantined() {
            (AgentState::Quarantined, reason)
        } else {
            (AgentState::Serving, String::new())
        };
        AgentStatus {
            state,
            reason,
            leases: self.metrics.leases_held().get(),
            in_flight: self.metrics.runs_in_flight().get(),
            outcomes: self.metrics.outcomes(),
            asked: self
                .standing
                .asked
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Tells the metrics and the health service whether this agent claims work.
    pub(super) fn publish_state(&self) {
        let status = self.status(false);
        self.metrics.agent_state(status.state);
        self.work.send_replace((status.state, status.reason));
    }

    /// Writes this agent's row in the registry as it starts, and reads who its peers are.
    pub(super) async fn register(&self) {
        self.check_schema().await;
        let status = self.status(false);
        self.publish_state();
        if let Err(err) = self.store.register_agent(&self.report, &status).await {
            tracing::warn!(error = %err, "could not register in sync_agents; the heartbeat tries again");
        }
        self.govern(None).await;
    }

    /// The registry's heartbeat: state, leases, runs in flight, outcomes; returns what peers
    /// and operators wrote on this agent's row. A row gone meanwhile (pruned while this agent
    /// stalled) is written again.
    async fn report_alive(&self) -> Option<crate::store::Verdicts> {
        let status = self.status(false);
        self.publish_state();
        match self.store.agent_heartbeat(&self.holder, &status).await {
            Ok(Some(verdicts)) => Some(verdicts),
            Ok(None) => {
                if let Err(err) = self.store.register_agent(&self.report, &status).await {
                    tracing::warn!(error = %err, "could not register in sync_agents");
                }
                None
            }
            Err(err) => {
                tracing::warn!(error = %err, "registry heartbeat failed");
                None
            }
        }
    }

    /// The heartbeat while the schema is outside this agent's range: its state and why, in the
    /// columns every schema's registry has; no peers read, no verdicts.
    async fn report_standing_down(&self) {
        let status = self.status(false);
        self.publish_state();
        if let Err(err) = self.store.agent_standing_down(&self.holder, &status).await {
            tracing::warn!(error = %err, "could not record standing down in sync_agents");
        }
    }

    /// The last word in the registry: stopped.
    pub(super) async fn report_stopped(&self) {
        let status = self.status(true);
        self.metrics.agent_state(status.state);
        self.work
            .send_replace((status.state, status.reason.clone()));
        let recorded = if self.standing.incompatible().is_some() {
            self.store.agent_standing_down(&self.holder, &status).await
        } else {
            self.store
                .agent_heartbeat(&self.holder, &status)
                .await
                .map(drop)
        };
        if let Err(err) = recorded {
            tracing::warn!(error = %err, "could not record the stop in sync_agents");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_fresh_until_its_ttl_passes_without_a_renewal() {
        let ttl = Duration::from_secs(2);
        let held = Arc::new(HeldLeases::default());
        let claim = |server_id, token| Claim {
            server_id: ServerId::stored(server_id),
            token,
            claimed_at: 0,
        };
        let ids =
            |ids: &[i64]| -> Vec<ServerId> { ids.iter().copied().map(ServerId::stored).collect() };
        let stalled = Instant::now() - Duration::from_secs(3);
        let _old = held.hold(claim(1, 7), stalled);
        let new = held.hold(claim(2, 1), Instant::now());
        assert!(
            !held.fresh(&claim(1, 7), ttl),
            "taken 3 s ago, never renewed"
        );
        assert!(held.fresh(&claim(2, 1), ttl));
        assert!(!held.fresh(&claim(2, 2), ttl), "another token is not ours");
        assert!(!held.fresh(&claim(3, 1), ttl), "not held here");
        // A renewal sent before the lease was taken does not date it back; one after does.
        held.renewed(&ids(&[1]), stalled - Duration::from_secs(1));
        assert!(!held.fresh(&claim(1, 7), ttl));
        held.renewed(&ids(&[1]), Instant::now());
        assert!(held.fresh(&claim(1, 7), ttl));
        assert_eq!(
            held.stale_among(&ids(&[1, 2, 3]), &ids(&[1])),
            1,
            "2 held, not renewed"
        );
        drop(new);
        assert_eq!(
            held.stale_among(&ids(&[1, 2, 3]), &ids(&[1])),
            0,
            "2 released meanwhile"
        );
    }
}
