//! The work queue: which servers wait for a sync, and the per-server leases that divide them
//! between agents.
//!
//! A server waits while its lease row has `pending_since` set (by `create_job`, cleared by the
//! completion that serves its last waiting request). Agents claim waiting servers in batches:
//! one short transaction picks up to k of them whose lease is free or expired, oldest request
//! first, skipping rows another agent is claiming right now (`FOR UPDATE SKIP LOCKED`; SQLite
//! has one writer), and bumps each lease's fencing token. A claim remembers when it was made by
//! the database's clock: only requests older than that are served by the run.

use fleetsync_common::{AgentId, ServerId};
use fleetsync_common::{
    Backend, ServiceError,
    sql::{Tx, Value, is_unique_violation, retry},
};

use super::{
    CHUNK, Registration, Store, Unreadable, db_now, list,
    servers::{SERVER_COLUMN_COUNT, SERVER_COLUMNS, SERVER_FROM, registration},
    services::service_type,
};

/// A lease this agent holds on one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// The server.
    pub server_id: ServerId,
    /// The fencing token: every write for this run checks it.
    pub token: i64,
    /// When the lease was taken, by the database's clock (ms).
    pub claimed_at: i64,
}

/// A claimed server with what its run needs.
#[derive(Debug, Clone)]
pub struct ClaimedServer {
    /// The lease.
    pub claim: Claim,
    /// The server as registered, or why its registration cannot be read.
    pub registration: Registration,
    /// True if a waiting request asked to try it even while it is backing off.
    pub forced: bool,
}

/// Which servers an agent may claim.
#[derive(Debug, Clone, Copy)]
pub struct Claimer<'a> {
    /// The agent (its leases' holder).
    pub holder: &'a AgentId,
    /// Its zone: it claims only servers of this zone (empty: servers without one).
    pub zone: &'a str,
}

impl<'a> From<&'a AgentId> for Claimer<'a> {
    /// An agent without a zone.
    fn from(holder: &'a AgentId) -> Self {
        Self { holder, zone: "" }
    }
}

/// `FOR UPDATE SKIP LOCKED` where the backend has it (SQLite's write transaction is exclusive).
fn skip_locked(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "",
        _ => " FOR UPDATE SKIP LOCKED",
    }
}

impl Store {
    /// Claims up to `limit` waiting servers of the claimer's zone whose lease is free or
    /// expired, oldest request first; returns them with their registration. Servers claimed by
    /// other agents at this moment are skipped, not waited for, and so are those this agent
    /// handed to a peer for a second opinion, until the peer's time is up.
    pub async fn claim<'a>(
        &self,
        claimer: impl Into<Claimer<'a>>,
        ttl_ms: i64,
        limit: usize,
    ) -> Result<Vec<ClaimedServer>, sqlx::Error> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let claimer = claimer.into();
        let holder = claimer.holder;
        let mut tx = self.db.begin().await?;
        let now = db_now(&mut tx).await?;
        let free = "pending_since IS NOT NULL AND (holder IS NULL OR expires_at < ?) AND zone = ? \
                    AND (second_opinion_of IS NULL OR second_opinion_of <> ? \
                    OR second_opinion_until < ?)";
        let free_args: [Value; 4] = [now.into(), claimer.zone.into(), holder.into(), now.into()];
        let decode = |rows: Vec<fleetsync_common::sql::Row>| -> Result<Vec<ServerId>, sqlx::Error> {
            rows.iter()
                .map(fleetsync_common::sql::Row::decode)
                .collect()
        };
        let oldest = format!(
            "SELECT server_id FROM server_leases WHERE {free} ORDER BY pending_since LIMIT ?"
        );
        let limited = |n: usize| -> Vec<Value> {
            free_args
                .iter()
                .cloned()
                .chain([(n as i64).into()])
                .collect()
        };
        let ids: Vec<ServerId> = if self.backend() == Backend::MySql {
            // MariaDB's locking read walks, and keeps lock memory for, every row it skips:
            // while a job of 1,000,000 servers marks them waiting (one transaction), a claim
            // held up to 100 MB of locks and the marking ran out of lock space (error 1206,
            // with the default 128 MiB buffer pool). So the oldest free servers are chosen by
            // a plain read, which skips what is not committed without locking it, and only
            // those are locked, still skipping any another agent is claiming. Twice as many
            // candidates as wanted (one statement's list at most), so that agents claiming at
            // once each find some their peers are not locking.
            let candidates = decode(tx.fetch(&oldest, &limited((limit * 2).min(CHUNK))).await?)?;
            decode(
                tx.fetch_in(
                    &format!(
                        "SELECT server_id FROM server_leases WHERE {free} AND server_id IN $ids \
                         ORDER BY pending_since LIMIT {} FOR UPDATE SKIP LOCKED",
                        limit.min(CHUNK)
                    ),
                    &free_args,
                    &candidates,
                )
                .await?,
            )?
        } else {
            decode(
                tx.fetch(
                    &format!("{oldest}{}", skip_locked(self.backend())),
                    &limited(limit),
                )
                .await?,
            )?
        };
        let claims = take_leases(&mut tx, &ids, holder, ttl_ms, now).await?;
        let mut servers = servers_for_run(&mut tx, &ids).await?;
        // The queue's copy of a zone disagrees with the server's (a zone written by hand, not
        // through Fleet): the copy is put right and the server left to its zone's agents.
        let strays: Vec<(ServerId, String)> = servers
            .values()
            .filter_map(|(r, _)| r.as_ref().ok())
            .filter(|s| s.zone != claimer.zone)
            .map(|s| (s.id, s.zone.clone()))
            .collect();
        for (id, zone) in &strays {
            tx.execute(
                "UPDATE server_leases SET zone = ?, holder = NULL, expires_at = NULL \
                 WHERE server_id = ?",
                &[zone.as_str().into(), (*id).into()],
            )
            .await?;
            servers.remove(id);
        }
        tx.commit().await?;
        Ok(claims
            .into_iter()
            .filter_map(|claim| {
                let (registration, forced) = servers.remove(&claim.server_id)?;
                Some(ClaimedServer {
                    claim,
                    registration,
                    forced,
                })
            })
            .collect())
    }

    /// Makes the queue agree with the job rows, once at start-up: every server gets a lease row,
    /// and every server with rows waiting (recorded before this schema, or by hand) is marked as
    /// waiting. Returns how many servers it marked.
    pub async fn repair_queue(&self) -> Result<u64, ServiceError> {
        // Agents starting together race on the inserts: a unique violation is a twin's row,
        // and the retry finds it there.
        let twin = |err: sqlx::Error| {
            if is_unique_violation(&err) {
                ServiceError::Aborted(format!("another agent repaired the queue: {err}"))
            } else {
                err.into()
            }
        };
        retry("repair queue", || async {
            let mut tx = self.db.begin().await?;
            add_missing_leases(&mut tx, "servers s", None, &[])
                .await
                .map_err(twin)?;
            let marked = tx
                .execute(
                    "UPDATE server_leases SET pending_since = (SELECT MIN(j.created_at) \
                     FROM sync_job_servers js JOIN sync_jobs j ON j.id = js.job_id \
                     WHERE js.server_id = server_leases.server_id AND js.outcome IS NULL) \
                     WHERE pending_since IS NULL AND server_id IN \
                     (SELECT server_id FROM sync_job_servers WHERE outcome IS NULL)",
                    &[],
                )
                .await?;
            tx.commit().await?;
            Ok(marked)
        })
        .await
    }

    /// Extends the leases `holder` holds on these servers and that have not expired. Never waits
    /// on a lease row another transaction holds (`SKIP LOCKED`): such a lease is `busy` (our own
    /// completion is writing it, or someone is claiming it) and is safe from claims while
    /// locked; the completer renews its batch's leases itself when it must start over.
    pub async fn renew(
        &self,
        holder: &AgentId,
        server_ids: &[ServerId],
        ttl_ms: i64,
    ) -> Result<Renewal, sqlx::Error> {
        retry("renew leases", || {
            self.renew_once(holder, server_ids, ttl_ms)
        })
        .await
    }

    async fn renew_once(
        &self,
        holder: &AgentId,
        server_ids: &[ServerId],
        ttl_ms: i64,
    ) -> Result<Renewal, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let now = db_now(&mut tx).await?;
        let mut renewal = Renewal::default();
        let skip = skip_locked(self.backend());
        // Chunk by chunk by hand: each chunk's locked leases are told apart from the renewed.
        for chunk in server_ids.chunks(CHUNK) {
            // A lease that already expired is not revived: its run outlived it (the agent
            // stalled), and its result must not be recorded.
            let live = |suffix: &str| {
                format!(
                    "SELECT server_id FROM server_leases WHERE holder = ? AND expires_at >= ? \
                     AND server_id IN {} ORDER BY server_id{suffix}",
                    list(chunk.len())
                )
            };
            let mut args: Vec<Value> = vec![holder.into(), now.into()];
            args.extend(chunk.iter().map(Value::from));
            let mut ids = Vec::with_capacity(chunk.len());
            for row in tx.fetch(&live(skip), &args).await? {
                ids.push(row.decode()?);
            }
            if ids.len() < chunk.len() && self.backend() != Backend::Sqlite {
                // Which of the others are ours but locked (a plain read does not wait).
                for row in tx.fetch(&live(""), &args).await? {
                    let id: ServerId = row.decode()?;
                    if ids.binary_search(&id).is_err() {
                        renewal.busy.push(id);
                    }
                }
            }
            if ids.is_empty() {
                continue;
            }
            let sql = format!(
                "UPDATE server_leases SET expires_at = ?, heartbeat_at = ? WHERE server_id IN {}",
                list(ids.len())
            );
            let mut args: Vec<Value> = vec![(now + ttl_ms).into(), now.into()];
            args.extend(ids.iter().map(Value::from));
            tx.execute(&sql, &args).await?;
            renewal.renewed.extend(ids);
        }
        tx.commit().await?;
        Ok(renewal)
    }

    /// Gives leases back without recording anything (the agent is stopping): the servers stay
    /// waiting for whoever runs next.
    /// Only these very leases (holder and token) are released: a newer lease on the same
    /// server, even one this agent took since, is left alone.
    pub async fn release(&self, holder: &AgentId, claims: &[Claim]) -> Result<(), sqlx::Error> {
        for chunk in claims.chunks(CHUNK / 2) {
            let mut args: Vec<Value> = vec![holder.into()];
            for claim in chunk {
                args.extend([claim.server_id.into(), Value::Int(claim.token)]);
            }
            let pairs = vec!["(?, ?)"; chunk.len()].join(", ");
            self.db
                .execute(
                    &format!(
                        "UPDATE server_leases SET holder = NULL, expires_at = NULL \
                         WHERE holder = ? AND (server_id, token) IN ({pairs})"
                    ),
                    &args,
                )
                .await?;
        }
        Ok(())
    }
}

/// What a lease renewal did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Renewal {
    /// Renewed: still held, expiry moved on.
    pub renewed: Vec<ServerId>,
    /// Still held and live, but locked by another transaction (our completion of that server,
    /// most likely): not waited for, not renewed this time.
    pub busy: Vec<ServerId>,
}

/// What releasing a lease does to the server's waiting mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WaitMark {
    /// Leave it: a job row still waits (or the run recorded nothing).
    Keep,
    /// Clear it: nothing waits for the server any more.
    Clear,
}

/// Releases the leases of `ids` (only those `holder` still holds, when given): the one place
/// a lease is given back.
pub(super) async fn release_leases(
    tx: &mut Tx,
    ids: &[ServerId],
    holder: Option<&AgentId>,
    waiting: WaitMark,
) -> Result<(), sqlx::Error> {
    let pending = match waiting {
        WaitMark::Keep => "",
        WaitMark::Clear => ", pending_since = NULL",
    };
    let held = if holder.is_some() {
        "holder = ? AND "
    } else {
        ""
    };
    let holder: Vec<Value> = holder.into_iter().map(Value::from).collect();
    tx.execute_in(
        &format!(
            "UPDATE server_leases SET holder = NULL, expires_at = NULL{pending}, \
             second_opinion_of = NULL, second_opinion_until = NULL, \
             second_opinion_note = NULL WHERE {held}server_id IN $ids"
        ),
        &holder,
        ids,
    )
    .await?;
    Ok(())
}

/// Gives a lease row to each server of `from` (`s` is the servers' alias) that matches
/// `only` (a condition with `args`, if any) and has none: servers inserted by hand, not
/// through Fleet.
///
/// PostgreSQL and SQLite insert every such server and skip those with a row (`ON CONFLICT DO
/// NOTHING`: one primary-key probe each, whatever the statistics say). A `NOT EXISTS` there
/// let PostgreSQL plan from statistics taken while `server_leases` was empty: a scan of the
/// lease table per server, which grows with every row the statement inserts (an agent started
/// on 100,000 servers added by hand did not finish its start-up in 20 s). MySQL checks each
/// server by its primary key in either form, and its `ON DUPLICATE KEY` would lock every
/// existing row: it keeps `NOT EXISTS`.
pub(super) async fn add_missing_leases(
    tx: &mut Tx,
    from: &str,
    only: Option<&str>,
    args: &[Value],
) -> Result<u64, sqlx::Error> {
    let insert = "INSERT INTO server_leases (server_id, token, zone) SELECT s.id, 0, s.zone";
    let sql = match (tx.backend(), only) {
        (Backend::MySql, only) => format!(
            "{insert} FROM {from} WHERE NOT EXISTS \
             (SELECT 1 FROM server_leases l WHERE l.server_id = s.id){}",
            only.map(|c| format!(" AND {c}")).unwrap_or_default()
        ),
        // SQLite reads `ON CONFLICT` after a join as the join's `ON` unless a `WHERE` comes
        // first.
        (_, only) => format!(
            "{insert} FROM {from} WHERE {} ON CONFLICT (server_id) DO NOTHING",
            only.unwrap_or("true")
        ),
    };
    tx.execute(&sql, args).await
}

/// Takes the leases of `ids` (already chosen as free under this transaction): token + 1,
/// holder, expiry and claim time by the database's clock.
pub(super) async fn take_leases(
    tx: &mut Tx,
    ids: &[ServerId],
    holder: &AgentId,
    ttl_ms: i64,
    now: i64,
) -> Result<Vec<Claim>, sqlx::Error> {
    let mut claims = Vec::with_capacity(ids.len());
    tx.execute_in(
        "UPDATE server_leases SET token = token + 1, holder = ?, claimed_at = ?, \
         expires_at = ?, heartbeat_at = ? WHERE server_id IN $ids",
        &[holder.into(), now.into(), (now + ttl_ms).into(), now.into()],
        ids,
    )
    .await?;
    let sql = "SELECT server_id, token FROM server_leases WHERE server_id IN $ids";
    for row in tx.fetch_in(sql, &[], ids).await? {
        let (server_id, token) = row.decode()?;
        claims.push(Claim {
            server_id,
            token,
            claimed_at: now,
        });
    }
    claims.sort_by_key(|c| c.server_id);
    Ok(claims)
}

/// The registration of each server (or why it cannot be read) and whether a waiting request
/// forces past its backoff.
async fn servers_for_run(
    tx: &mut Tx,
    ids: &[ServerId],
) -> Result<std::collections::HashMap<ServerId, (Registration, bool)>, sqlx::Error> {
    let mut out = std::collections::HashMap::with_capacity(ids.len());
    let sql = format!(
        "SELECT {SERVER_COLUMNS}, (SELECT COUNT(*) FROM sync_job_servers js \
         JOIN sync_jobs j ON j.id = js.job_id WHERE js.server_id = s.id \
         AND js.outcome IS NULL AND j.force_offline <> 0) FROM {SERVER_FROM} \
         WHERE s.id IN $ids"
    );
    for row in tx.fetch_in(&sql, &[service_type()], ids).await? {
        // The one column the statement selects after the declared server row.
        let forced = row.int(SERVER_COLUMN_COUNT)? > 0;
        let registration = registration(&row)?;
        out.insert(Unreadable::id_of(&registration), (registration, forced));
    }
    Ok(out)
}
