//! Reachability probing: offline servers whose backoff ended are claimed in batches and probed
//! all at once (TCP connect and SSH banner, no login); those that answer get one recovery sync.

use std::sync::Arc;

use super::{LeaseGuard, Runner};
use fleetsync_common::RequestId;

use crate::model::{JobOrigin, Scopes};
use crate::store::{Claim, NewJob, Selection};

impl Runner {
    /// Probes offline servers whose backoff ended, all of a batch at once: TCP connect and SSH
    /// banner, no login. Servers that answer get one recovery sync (the syncs they missed);
    /// the others back off further.
    pub(super) async fn probe_offline_forever(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(self.config.probe_interval) => {}
            }
            // A quarantined agent's probes would say what its own network sees; one outside
            // the schema's range writes nothing.
            if !self.standing.claims() {
                continue;
            }
            loop {
                let ttl = self.config.lease_ttl.as_millis() as i64;
                // A probe is a dial (connect and banner: waiting, not CPU), so a batch is as
                // large as the dials a scheduler keeps in flight, not its CPU slots: each batch
                // costs two transactions whatever its size (64 at a time, MariaDB probed
                // 4,800 servers a second). Its sockets come on top of the runs', so it takes at
                // most a quarter of what the open-file limit allows runs.
                let limit = super::wanted_in_flight(self.config.concurrency, self.config.in_flight)
                    .min(self.config.open_files_cap.unwrap_or(usize::MAX) / 4)
                    .clamp(1, 1024);
                let taken = std::time::Instant::now();
                let due = match self.store.claim_due_offline(&self.holder, ttl, limit).await {
                    Ok(due) => due,
                    Err(err) => {
                        tracing::warn!(error = %err, "could not read offline servers; retrying");
                        break;
                    }
                };
                let full = due.len() == limit;
                if due.is_empty() {
                    break;
                }
                let guards: Vec<LeaseGuard> = due
                    .iter()
                    .map(|(claim, _)| self.held.hold(*claim, taken))
                    .collect();
                let this = &*self;
                let probes = due.iter().map(|(claim, registration)| async move {
                    let server = match registration {
                        Ok(server) => server,
                        // Nothing to probe: still offline, probed again after the first
                        // backoff (its runs say why, as PARSE_FAILED).
                        Err(unreadable) => {
                            tracing::warn!(server_id = unreadable.id.get(), reason = %unreadable.reason, "cannot probe: the registration cannot be read");
                            return (*claim, Some(this.backoff_ms(1)));
                        }
                    };
                    let probed = this.ssh.probe(&server.ip, server.port).await;
                    this.metrics.probed(probed.is_ok());
                    if let Err(err) = &probed {
                        tracing::debug!(server_id = server.id.get(), error = %err, "still offline");
                    }
                    let backoff = probed
                        .is_err()
                        .then(|| this.backoff_ms(server.consecutive_failures + 1));
                    (*claim, backoff)
                });
                let probed = tokio::select! {
                    () = self.shutdown.cancelled() => None,
                    probed = futures_util::future::join_all(probes) => Some(probed),
                };
                let Some(probed) = probed else {
                    let claims: Vec<Claim> = due.iter().map(|(c, _)| *c).collect();
                    let _ = self.store.release(&self.holder, &claims).await;
                    return;
                };
                let back = match self.store.record_probes(&self.holder, &probed).await {
                    Ok(back) => back,
                    Err(err) => {
                        tracing::warn!(error = %err, "could not record probes; their leases expire");
                        break;
                    }
                };
                drop(guards);
                if !back.is_empty() {
                    tracing::info!(
                        servers = back.len(),
                        "servers are back: syncing what they missed"
                    );
                    let job = NewJob {
                        request_id: RequestId::new(format!(
                            "recovery-{}-{}",
                            self.holder,
                            crate::new_id()
                        )),
                        origin: JobOrigin::Recovery,
                        selection: Selection::Ids(back),
                        scopes: Scopes::ALL,
                        force: true,
                        reason: "the server is reachable again".into(),
                    };
                    if let Err(err) = self.store.create_job(&job).await {
                        tracing::warn!(error = %err, "could not start the recovery sync");
                    }
                    self.signals.wake.notify_one();
                }
                if !full {
                    break;
                }
            }
        }
    }
}
