//! Reachability of offline servers: which ones are due for a probe (their backoff ended, by the
//! database's clock), claimed in batches under the same fenced leases as syncs, and what a
//! probe found (back online, or one more failure with the next probe time).

use std::collections::HashMap;

use fleetsync_common::{
    AgentId, Backend, ServerId,
    sql::{Tx, Value},
};

use super::{
    CHUNK, Registration, Store, Unreadable, case, db_now, for_update, list,
    queue::{Claim, WaitMark, release_leases, take_leases},
    servers::{SERVER_COLUMNS, SERVER_FROM, registration},
    services::service_type,
};
use crate::model::Reachability;

/// Marks `ids` online as of `now`: seen, no failures, no probe due. The one place a server
/// comes back, from a run or a probe.
pub(super) async fn mark_online(
    tx: &mut Tx,
    now: i64,
    ids: &[ServerId],
) -> Result<(), sqlx::Error> {
    tx.execute_in(
        "UPDATE servers SET reachability = ?, last_seen_at = ?, \
         consecutive_failures = 0, next_probe_at = NULL WHERE id IN $ids",
        &[Reachability::Online.as_str().into(), now.into()],
        ids,
    )
    .await?;
    Ok(())
}

/// Marks servers offline one failure further, each with its next probe (ms, database clock).
/// The one place a server goes offline, from a run or a probe.
pub(super) async fn mark_offline(
    tx: &mut Tx,
    servers: &[(ServerId, i64)],
) -> Result<(), sqlx::Error> {
    for chunk in servers.chunks(CHUNK / 2) {
        let next = case(chunk.len());
        let mut args: Vec<Value> = vec![Reachability::Offline.as_str().into()];
        for (id, at) in chunk {
            args.extend([(*id).into(), Value::Int(*at)]);
        }
        args.extend(chunk.iter().map(|(id, _)| (*id).into()));
        tx.execute(
            &format!(
                "UPDATE servers SET reachability = ?, \
                 consecutive_failures = consecutive_failures + 1, next_probe_at = {next} \
                 WHERE id IN {}",
                list(chunk.len())
            ),
            &args,
        )
        .await?;
    }
    Ok(())
}

impl Store {
    /// Claims up to `limit` offline servers whose backoff has ended and whose lease is free,
    /// soonest due first, each with its registration (or why it cannot be read).
    pub async fn claim_due_offline(
        &self,
        holder: &AgentId,
        ttl_ms: i64,
        limit: usize,
    ) -> Result<Vec<(Claim, Registration)>, sqlx::Error> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut tx = self.db.begin().await?;
        let now = db_now(&mut tx).await?;
        let skip = match self.backend() {
            Backend::Sqlite => "",
            // Only the lease rows: registrations stay free for Fleet calls.
            Backend::Postgres => " FOR UPDATE OF l SKIP LOCKED",
            // MariaDB has no `OF`: the joined server rows are locked too, briefly.
            Backend::MySql => " FOR UPDATE SKIP LOCKED",
        };
        let ids: Vec<ServerId> = tx
            .fetch(
                &format!(
                    "SELECT l.server_id FROM servers s JOIN server_leases l ON l.server_id = s.id \
                     WHERE s.next_probe_at <= ? AND s.reachability = ? \
                     AND (l.holder IS NULL OR l.expires_at < ?) ORDER BY s.next_probe_at LIMIT ?{skip}"
                ),
                &[
                    now.into(),
                    Reachability::Offline.as_str().into(),
                    now.into(),
                    (limit as i64).into(),
                ],
            )
            .await?
            .iter()
            .map(fleetsync_common::sql::Row::decode)
            .collect::<Result<_, _>>()?;
        let claims = take_leases(&mut tx, &ids, holder, ttl_ms, now).await?;
        let mut servers = std::collections::HashMap::new();
        let sql = format!("SELECT {SERVER_COLUMNS} FROM {SERVER_FROM} WHERE s.id IN $ids");
        for row in tx.fetch_in(&sql, &[service_type()], &ids).await? {
            let registration = registration(&row)?;
            servers.insert(Unreadable::id_of(&registration), registration);
        }
        tx.commit().await?;
        Ok(claims
            .into_iter()
            .filter_map(|c| servers.remove(&c.server_id).map(|s| (c, s)))
            .collect())
    }

    /// Records probes (fenced like runs) and releases their leases: `None` is back online,
    /// `Some(backoff_ms)` one more failure, probed again that long after now (database clock).
    /// Returns the servers that came back (whose lease was still ours).
    pub async fn record_probes(
        &self,
        holder: &AgentId,
        probes: &[(Claim, Option<i64>)],
    ) -> Result<Vec<ServerId>, sqlx::Error> {
        fleetsync_common::sql::retry("record probes", || self.record_probes_once(holder, probes))
            .await
    }

    async fn record_probes_once(
        &self,
        holder: &AgentId,
        probes: &[(Claim, Option<i64>)],
    ) -> Result<Vec<ServerId>, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let now = db_now(&mut tx).await?;
        // Fenced like runs: the batch's lease rows locked in server order (every writer of
        // lease rows locks in that order), one statement per chunk.
        let mut sorted: Vec<ServerId> = probes.iter().map(|(c, _)| c.server_id).collect();
        sorted.sort_unstable();
        let sql = format!(
            "SELECT server_id, token, holder, expires_at FROM server_leases \
             WHERE server_id IN $ids ORDER BY server_id{}",
            for_update(self.backend())
        );
        let mut held = HashMap::with_capacity(sorted.len());
        for row in tx.fetch_in(&sql, &[], &sorted).await? {
            let (id, token, by, expires): (ServerId, i64, Option<AgentId>, Option<i64>) =
                row.decode()?;
            held.insert(id, (token, by, expires));
        }
        let (mut back, mut failed, mut ours) = (Vec::new(), Vec::new(), Vec::new());
        for (claim, backoff) in probes {
            let still_ours = held
                .get(&claim.server_id)
                .is_some_and(|(token, by, expires)| {
                    *token == claim.token
                        && by.as_ref() == Some(holder)
                        && expires.is_some_and(|e| e >= now)
                });
            if !still_ours {
                continue;
            }
            ours.push(claim.server_id);
            match backoff {
                None => back.push(claim.server_id),
                Some(backoff) => failed.push((claim.server_id, now + backoff)),
            }
        }
        mark_offline(&mut tx, &failed).await?;
        mark_online(&mut tx, now, &back).await?;
        release_leases(&mut tx, &ours, None, WaitMark::Keep).await?;
        tx.commit().await?;
        Ok(back)
    }
}
