//! Conversions between stored records and protobuf messages.

use std::time::{Duration, UNIX_EPOCH};

use fleetsync_common::{ServerId, proto::sync::v1 as pb};

use crate::model::{
    AgentState, Cause, InventoryStatus, JobOrigin, JobState, Outcome, Reachability,
};
use crate::store::{
    AgentRecord, DatabaseService, Inventory, JobRecord, LastRuns, OutcomeRecord, PinnedKey,
    RunResult, ServerRecord,
};

/// Milliseconds since the epoch as a timestamp.
pub fn timestamp(ms: i64) -> Option<prost_types::Timestamp> {
    let ms = u64::try_from(ms).ok()?;
    Some((UNIX_EPOCH + Duration::from_millis(ms)).into())
}

/// Milliseconds as a duration.
pub fn duration(ms: i64) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(Duration::from_millis(u64::try_from(ms).ok()?)).ok()
}

/// An outcome as the proto's enum.
pub fn outcome(outcome: Outcome) -> pb::Outcome {
    match outcome {
        Outcome::Ok => pb::Outcome::Ok,
        Outcome::SkippedOffline => pb::Outcome::SkippedOffline,
        Outcome::SkippedNoDatabaseService => pb::Outcome::SkippedNoDatabaseService,
        Outcome::Unreachable => pb::Outcome::Unreachable,
        Outcome::HandshakeFailed => pb::Outcome::HandshakeFailed,
        Outcome::AuthFailed => pb::Outcome::AuthFailed,
        Outcome::HostKeyMismatch => pb::Outcome::HostKeyMismatch,
        Outcome::CommandFailed => pb::Outcome::CommandFailed,
        Outcome::ParseFailed => pb::Outcome::ParseFailed,
        Outcome::Cancelled => pb::Outcome::Cancelled,
    }
}

/// A cause as the proto's enum (`UNSPECIFIED` where none is known).
pub fn cause(cause: Option<Cause>) -> pb::UnreachableCause {
    match cause {
        None => pb::UnreachableCause::Unspecified,
        Some(Cause::Refused) => pb::UnreachableCause::Refused,
        Some(Cause::NoRoute) => pb::UnreachableCause::NoRoute,
        Some(Cause::Timeout) => pb::UnreachableCause::Timeout,
        Some(Cause::Dns) => pb::UnreachableCause::Dns,
    }
}

/// A run's result as a server outcome.
pub fn server_outcome(
    server_id: ServerId,
    server_name: &str,
    result: &RunResult,
    finished_at: i64,
) -> pb::ServerOutcome {
    pb::ServerOutcome {
        server_id: server_id.get(),
        server_name: server_name.to_owned(),
        outcome: outcome(result.outcome) as i32,
        cause: cause(result.cause) as i32,
        message: result.message.clone(),
        exit_status: result.exit_status.map_or(0, |s| s as i32),
        duration: duration(result.duration_ms),
        finished_at: timestamp(finished_at),
        next_probe_at: result.next_probe_at.and_then(timestamp),
        counts: result.counts.map(|c| pb::SyncCounts {
            databases_added: c.databases_added,
            databases_updated: c.databases_updated,
            databases_gone: c.databases_gone,
            users_added: c.users_added,
            users_updated: c.users_updated,
            users_gone: c.users_gone,
            charsets: c.charsets,
        }),
    }
}

/// A stored outcome as a stream event.
pub fn outcome_event(record: &OutcomeRecord) -> pb::SyncEvent {
    pb::SyncEvent {
        cursor: record.seq as u64,
        event: Some(pb::sync_event::Event::Outcome(server_outcome(
            record.server_id,
            &record.server_name,
            &record.result,
            record.finished_at,
        ))),
    }
}

/// A job's origin in the proto.
pub fn origin(origin: JobOrigin) -> pb::JobOrigin {
    match origin {
        JobOrigin::Rpc => pb::JobOrigin::Rpc,
        JobOrigin::Migration => pb::JobOrigin::Migration,
        JobOrigin::Schedule => pb::JobOrigin::Schedule,
        JobOrigin::Recovery => pb::JobOrigin::Recovery,
    }
}

/// A job's state in the proto.
pub fn job_state(state: JobState) -> pb::JobState {
    match state {
        JobState::Pending => pb::JobState::Pending,
        JobState::Running => pb::JobState::Running,
        JobState::Done => pb::JobState::Done,
    }
}

/// A job as its summary.
pub fn summary(job: &JobRecord) -> pb::JobSummary {
    pb::JobSummary {
        job_id: job.id.to_string(),
        request_id: job.request_id.to_string(),
        origin: origin(job.origin) as i32,
        state: job_state(job.state()) as i32,
        scopes: job.scopes.to_proto(),
        force: job.force,
        reason: job.reason.clone(),
        total: job.total as u32,
        finished: job.finished as u32,
        outcome_counts: job
            .outcome_counts
            .iter()
            .map(|(o, count)| pb::OutcomeCount {
                outcome: outcome(*o) as i32,
                count: *count as u32,
            })
            .collect(),
        created_at: timestamp(job.created_at),
        finished_at: job.finished_at.and_then(timestamp),
        duration: job.finished_at.and_then(|f| duration(f - job.created_at)),
    }
}

/// The summary event that ends a job's stream (its cursor is one past the last outcome).
pub fn summary_event(job: &JobRecord) -> pb::SyncEvent {
    pb::SyncEvent {
        cursor: job.total as u64 + 1,
        event: Some(pb::sync_event::Event::Summary(summary(job))),
    }
}

/// The service enum of a registered service.
pub fn database_service(service: Option<DatabaseService>) -> pb::DatabaseService {
    match service {
        None => pb::DatabaseService::None,
        Some(DatabaseService::Mysql) => pb::DatabaseService::Mysql,
        Some(DatabaseService::Mariadb) => pb::DatabaseService::Mariadb,
        Some(DatabaseService::Postgresql) => pb::DatabaseService::Postgresql,
    }
}

fn status(name: &str) -> pb::ServerStatus {
    pb::ServerStatus::from_str_name(&format!("SERVER_STATUS_{}", name.to_ascii_uppercase()))
        .unwrap_or(pb::ServerStatus::Unspecified)
}

/// A server's reachability in the proto.
pub fn reachability(reachability: Reachability) -> pb::Reachability {
    match reachability {
        Reachability::Online => pb::Reachability::Online,
        Reachability::Offline => pb::Reachability::Offline,
        Reachability::Unknown => pb::Reachability::Unknown,
    }
}

fn host_key(key: &PinnedKey) -> pb::HostKey {
    pb::HostKey {
        algorithm: key.key.algorithm.clone(),
        fingerprint: key.key.fingerprint.clone(),
        pinned_at: timestamp(key.pinned_at),
    }
}

/// A server with its last outcome (and, behind a skip, its last attempt).
pub fn server(record: &ServerRecord, last: Option<&LastRuns>) -> pb::Server {
    let outcome =
        |(result, at): &(RunResult, i64)| server_outcome(record.id, &record.name, result, *at);
    pb::Server {
        id: record.id.get(),
        spec: Some(pb::ServerSpec {
            name: record.name.clone(),
            ip: record.ip.clone(),
            port: u32::from(record.port),
            ssh_user: record.ssh_user.clone(),
            database_service: database_service(record.database_service) as i32,
            database_version: record.database_version.clone(),
            status: status(&record.status) as i32,
            // The pinned key is in `host_key` below (its fingerprint); the key itself is not kept.
            host_key: String::new(),
            zone: record.zone.clone(),
        }),
        reachability: reachability(record.reachability) as i32,
        last_seen_at: record.last_seen_at.and_then(timestamp),
        consecutive_failures: record.consecutive_failures.max(0) as u32,
        next_probe_at: record.next_probe_at.and_then(timestamp),
        host_key: record.host_key.as_ref().map(host_key),
        last_outcome: last.map(|runs| outcome(&runs.last)),
        created_at: timestamp(record.created_at),
        updated_at: timestamp(record.updated_at),
        last_attempt: last.and_then(|runs| runs.attempt.as_ref()).map(outcome),
    }
}

/// A pinned key as the reset response's previous key.
pub fn previous_key(key: Option<&PinnedKey>) -> Option<pb::HostKey> {
    key.map(host_key)
}

/// What the syncs stored, as the inventory message (`None` before the first successful sync).
pub fn inventory(service: Option<DatabaseService>, inventory: &Inventory) -> Option<pb::Inventory> {
    let document = inventory.charsets.as_ref()?;
    let charsets = document
        .charsets
        .iter()
        .map(|(name, entry)| pb::Charset {
            name: name.clone(),
            collations: entry.list.clone(),
            default_collation: entry.default.clone().unwrap_or_default(),
        })
        .collect();
    let state = |status: &InventoryStatus| {
        if *status == InventoryStatus::Gone {
            pb::DatabaseState::Gone
        } else {
            pb::DatabaseState::Ready
        }
    };
    Some(pb::Inventory {
        database_service: database_service(service) as i32,
        default_charset: document.default_charset.clone(),
        charsets,
        databases: inventory
            .databases
            .iter()
            .map(|d| pb::Database {
                name: d.name.clone(),
                charset: d.charset.clone().unwrap_or_default(),
                collation: d.collation.clone().unwrap_or_default(),
                state: state(&d.status) as i32,
                synced_at: timestamp(d.updated_at),
            })
            .collect(),
        users: inventory
            .users
            .iter()
            .map(|u| pb::DatabaseUser {
                username: u.username.clone(),
                host: u.host.clone(),
                databases: u.databases.clone(),
                state: state(&u.status) as i32,
            })
            .collect(),
        synced_at: inventory
            .databases
            .iter()
            .map(|d| d.updated_at)
            .max()
            .and_then(timestamp),
    })
}

/// An agent of the registry.
pub fn agent(record: &AgentRecord) -> pb::Agent {
    let state = match record.status.state {
        AgentState::Serving => pb::AgentState::Serving,
        AgentState::Draining => pb::AgentState::Draining,
        AgentState::Quarantined => pb::AgentState::Quarantined,
        AgentState::Incompatible => pb::AgentState::Incompatible,
        AgentState::Gone => pb::AgentState::Gone,
    };
    pb::Agent {
        id: record.report.id.to_string(),
        host: record.report.host.clone(),
        version: record.report.version.clone(),
        schema_version: record.report.schema_version,
        schema_max: record.report.schema_max.unwrap_or(0),
        key_fingerprints: record.report.key_fingerprints.clone(),
        zone: record.report.zone.clone(),
        started_at: timestamp(record.started_at),
        heartbeat_at: timestamp(record.heartbeat_at),
        state: state as i32,
        reason: record.status.reason.clone(),
        leases: u32::try_from(record.status.leases).unwrap_or(u32::MAX),
        runs_in_flight: u32::try_from(record.status.in_flight).unwrap_or(u32::MAX),
        outcomes: record
            .status
            .outcomes
            .iter()
            .map(|(outcome, n)| (format!("OUTCOME_{outcome}"), *n))
            .collect(),
        second_opinions_asked: record.status.asked,
        overruled: record.verdicts.overruled,
        confirmed: record.verdicts.confirmed,
    }
}
