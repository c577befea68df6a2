//! One server's run: skip it (no database service, offline and in backoff), or dial it, take a
//! busy slot, connect, read its inventory and parse it, into one `Completion`. No database
//! access: everything it needs came with the claim.

use std::time::{Duration, Instant};

use fleetsync_common::clock::jitter;
use tokio::sync::Semaphore;

use super::Runner;
use crate::{
    inventory,
    model::{Cause, Outcome, Reachability},
    ssh::{Dialed, HostKey, SshError, Target},
    store::{ClaimedServer, Completion, InventoryWrite, Reach, RunResult, ServerRecord},
};

/// What connecting to a server and reading its inventory came to.
struct RunOutput {
    /// The outcome, as stored.
    result: RunResult,
    /// What was read, to store (only with `OK`).
    inventory: Option<InventoryWrite>,
    /// The host key to pin: the one presented on first contact.
    pin: Option<HostKey>,
    /// Whether the server answered at all (its reachability).
    reachable: bool,
}

/// A run that ended on an SSH failure: its outcome, and whether the server answered at all.
fn failed(err: &SshError) -> Result<RunOutput, RunEnd> {
    Ok(RunOutput {
        result: ssh_failure(err),
        inventory: None,
        pin: None,
        reachable: !err.is_unreachable(),
    })
}

/// How a run ended.
#[derive(Debug)]
pub(super) enum RunEnd {
    /// With a result to record.
    Done(Box<Completion>),
    /// Nothing ran: the lease lapsed before the command (this agent stalled). The lease is left
    /// to expire: releasing by holder could drop a newer lease this agent has taken since.
    Lapsed,
    /// Nothing ran, or what ran was cut off: the agent is stopping. The lease is released, so
    /// that the next agent takes the server at once.
    Stopped,
}

impl Runner {
    /// Resolves once runs that have not reached their server should hand it over: the agent is
    /// stopping, or the schema left its range.
    async fn standing_down(&self) {
        let mut work = self.work.subscribe();
        tokio::select! {
            () = self.shutdown.cancelled() => {}
            closed = async {
                work.wait_for(|(state, _)| *state == crate::model::AgentState::Incompatible)
                    .await
                    .is_err()
            } => {
                if closed {
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    /// One server: skip it, or connect, read its inventory and parse it. No database access:
    /// everything it needs came with the claim.
    pub(super) async fn sync_server(&self, work: &ClaimedServer, busy: &Semaphore) -> RunEnd {
        let started = Instant::now();
        let done = |result: RunResult, reach: Reach| Completion {
            claim: work.claim,
            result: finish(result, started),
            inventory: None,
            pin: None,
            reach,
            ask_peer_ms: None,
        };
        let server = match &work.registration {
            Ok(server) => server,
            Err(unreadable) => {
                let result = failure(
                    Outcome::ParseFailed,
                    None,
                    format!(
                        "the server's registration cannot be read: {} (register it again \
                         through Fleet, or mend the row)",
                        unreadable.reason
                    ),
                );
                return RunEnd::Done(Box::new(done(result, Reach::Untried)));
            }
        };
        let Some(service) = server.database_service else {
            let result = failure(
                Outcome::SkippedNoDatabaseService,
                None,
                "no database service registered".into(),
            );
            return RunEnd::Done(Box::new(done(result, Reach::Untried)));
        };
        // Backoff is judged by the database's clock (the claim time), as it was written. The
        // servers in backoff when the job was made were skipped then (`Store::create_job`):
        // this is a server that went into backoff since.
        if let Some(until) = server.next_probe_at
            && server.reachability == Reachability::Offline
            && until > work.claim.claimed_at
            && !work.forced
        {
            let result = RunResult::skipped_offline(server.consecutive_failures, until);
            return RunEnd::Done(Box::new(done(result, Reach::Untried)));
        }
        let RunOutput {
            result,
            inventory,
            pin,
            reachable,
        } = match self.read_inventory(work, server, service, busy).await {
            Ok(output) => output,
            Err(end) => return end,
        };
        let reach = if reachable {
            Reach::Online
        } else {
            Reach::Offline {
                backoff_ms: self.backoff_ms(server.consecutive_failures + 1),
            }
        };
        let ask_peer_ms = (self.config.second_opinions
            && result.outcome.may_be_the_agents()
            && self
                .standing
                .peers
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0)
        .then_some(self.config.lease_ttl.as_millis() as i64);
        RunEnd::Done(Box::new(Completion {
            claim: work.claim,
            result: finish(result, started),
            inventory,
            pin,
            reach,
            ask_peer_ms,
        }))
    }

    /// Connects and reads the inventory (the "probe" command of `inventory`). An error when
    /// nothing is to be recorded: the lease lapsed, or the agent is stopping.
    async fn read_inventory(
        &self,
        work: &ClaimedServer,
        server: &ServerRecord,
        service: crate::store::DatabaseService,
        busy: &Semaphore,
    ) -> Result<RunOutput, RunEnd> {
        let target = server.target();
        // Dialing waits on the network; only what follows (key exchange, authentication, the
        // command) takes one of the busy slots, held until the run ends. A run that has not
        // reached the key exchange when the agent starts stopping (or the schema leaves its
        // range) hands its server over at once instead of spending the shutdown grace on
        // waiting.
        let dialed = tokio::select! {
            biased;
            () = self.standing_down() => return Err(RunEnd::Stopped),
            dialed = self.ssh.dial(target.host, target.port) => match dialed {
                Ok(dialed) => dialed,
                Err(err) => return failed(&err),
            },
        };
        let _busy = tokio::select! {
            biased;
            () = self.standing_down() => return Err(RunEnd::Stopped),
            permit = busy.acquire() => permit.expect("the slots are never closed"),
        };
        // What follows runs in a future of its own, on the heap: a run waiting on a silent host
        // holds only the dialing future, not the key exchange's and the command's (18 KB each
        // before: 10,000 runs in flight took 280 MiB; `bench/scale.md`).
        Box::pin(self.talk(work, server, service, dialed, target)).await
    }

    /// Past dialing, with a busy slot: key exchange, authentication, the command, the parse.
    async fn talk(
        &self,
        work: &ClaimedServer,
        server: &ServerRecord,
        service: crate::store::DatabaseService,
        dialed: Dialed,
        target: Target<'_>,
    ) -> Result<RunOutput, RunEnd> {
        let unpinned = target.pinned.is_none();
        let connection = match self.ssh.establish(dialed, target).await {
            Ok(connection) => connection,
            Err(err) => return failed(&err),
        };
        self.metrics.connected(connection.times());
        let pin = unpinned.then(|| connection.host_key().clone());
        let (command, input) = inventory::probe(service, server.inventory_key.as_deref());
        let started = Instant::now();
        let opened = connection.open_command().await;
        // A stall (a pause, a frozen VM, SIGSTOP) may have outlived the lease: another agent may
        // be running this server now. Its result would be fenced off at the write; the command
        // must not run either. Checked with the channel open, so that no round trip stands
        // between the check and the command, and with a heartbeat period of the lease left, so
        // that a late heartbeat cannot let the lease lapse just as the command starts.
        if opened.is_ok() && !self.held.fresh(&work.claim, self.config.lease_ttl * 2 / 3) {
            tracing::warn!(
                server_id = server.id.get(),
                "the lease lapsed before the command (this agent stalled): left to the next run"
            );
            self.metrics.discarded();
            connection.close().await;
            return Err(RunEnd::Lapsed);
        }
        let output = match opened {
            Ok(channel) => channel.run(command, input.as_bytes()).await,
            Err(err) => Err(err),
        };
        if output.is_ok() {
            self.metrics.command(started.elapsed());
        }
        connection.close().await;
        let (result, inventory) = match output {
            Err(err) => (ssh_failure(&err), None),
            Ok(out) if !out.success() => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let first: Vec<&str> = stderr.lines().take(5).collect();
                let mut message = format!(
                    "`{}` exited with {}",
                    command
                        .split_whitespace()
                        .take(4)
                        .collect::<Vec<_>>()
                        .join(" "),
                    out.exit_status
                        .map_or("no status".into(), |s| s.to_string())
                );
                if !first.is_empty() {
                    message.push_str(": ");
                    message.push_str(&truncate(&first.join(" | "), 500));
                }
                let mut result = failure(Outcome::CommandFailed, None, message);
                result.exit_status = Some(out.exit_status.map_or(-1, i64::from));
                (result, None)
            }
            Ok(out) => match inventory::parse(service, &out.stdout) {
                Ok(inventory) => {
                    let charsets = inventory.charsets.as_ref().map_or_else(
                        || "charsets unchanged".to_owned(),
                        |c| format!("{} charset(s)", c.document.charsets.len()),
                    );
                    let message = format!(
                        "{} database(s), {} user(s), {charsets}",
                        inventory.databases.len(),
                        inventory.users.len(),
                    );
                    (RunResult::new(Outcome::Ok, message), Some(inventory))
                }
                Err(inventory::ParseError::Unsupported(message)) => {
                    (failure(Outcome::CommandFailed, None, message), None)
                }
                Err(inventory::ParseError::Invalid(message)) => {
                    (failure(Outcome::ParseFailed, None, message), None)
                }
            },
        };
        Ok(RunOutput {
            result,
            inventory,
            pin,
            reachable: true,
        })
    }

    /// How long a server that failed `failures` times in a row waits before its next probe:
    /// exponential backoff from `backoff_base`, capped at `backoff_max`, with ±20% jitter so
    /// that a fleet that went down together does not come back in lockstep. Added to the
    /// database's clock when written.
    pub(super) fn backoff_ms(&self, failures: i64) -> i64 {
        let exponent = failures.clamp(1, 32) - 1;
        let base = self.config.backoff_base.as_millis() as f64;
        let delay =
            (base * 2f64.powi(exponent as i32)).min(self.config.backoff_max.as_millis() as f64);
        jitter(Duration::from_millis(delay as u64), 0.2).as_millis() as i64
    }
}

fn failure(outcome: Outcome, cause: Option<Cause>, message: String) -> RunResult {
    RunResult {
        cause,
        ..RunResult::new(outcome, message)
    }
}

fn ssh_failure(err: &SshError) -> RunResult {
    let (outcome, cause) = err.outcome();
    let mut result = failure(outcome, cause, err.to_string());
    if matches!(
        err,
        SshError::Timeout {
            stage: crate::ssh::Stage::Command,
            ..
        }
    ) {
        result.exit_status = Some(-1);
    }
    result
}

fn finish(mut result: RunResult, started: Instant) -> RunResult {
    result.duration_ms = started.elapsed().as_millis() as i64;
    result
}

pub(super) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}
