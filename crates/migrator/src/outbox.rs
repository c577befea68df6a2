//! The outbox of sync requests that migrations record, and the best-effort fast path that hands
//! them to the sync-agent right after migrating. A request the agent did not take stays
//! pending: the agent drains pending requests when it starts and periodically.

use std::time::Duration;

use fleetsync_common::{
    Db, RequestId,
    clock::now_ms,
    model::RequestState,
    proto::sync::v1::{StartSyncRequest, sync_agent_client::SyncAgentClient},
    sql::{Conn, Value},
};
use tonic::transport::Endpoint;

use crate::{catalog::table_exists, model::SyncRequest};

/// The outbox of sync requests, the engine's own: it must exist before any migration that
/// records a request runs.
pub(crate) const OUTBOX_TABLE: &str = "sync_requests";

/// Where the sync-agent is.
#[derive(Debug, Clone)]
pub struct AgentTarget {
    /// gRPC URL, e.g. `http://127.0.0.1:50051`.
    pub url: String,
    /// Deadline for the whole hand-over (connect included).
    pub timeout: Duration,
    /// Bearer token the agent requires, if any.
    pub token: Option<String>,
    /// PEM of the CA that signed the agent's certificate, for a private CA.
    pub ca_pem: Option<Vec<u8>>,
}

/// What became of one pending request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    /// The request's id.
    pub request_id: RequestId,
    /// The agent's job id, or why the agent did not take it.
    pub result: Result<String, String>,
}

/// Hands every pending request to the agent within the deadline. Never fails the caller for the
/// agent's sake: an unreachable, slow or refusing agent yields `Err` results, and the requests
/// stay pending. Only the database's own errors are returned as `Err`.
pub async fn dispatch_pending(db: &Db, agent: &AgentTarget) -> Result<Vec<Dispatch>, sqlx::Error> {
    let mut conn = Conn::open(db).await?;
    let pending = read_pending(&mut conn).await;
    let pending = match pending {
        Ok(p) => p,
        Err(err) => {
            conn.close().await;
            return Err(err);
        }
    };
    if pending.is_empty() {
        conn.close().await;
        return Ok(Vec::new());
    }

    let results = match tokio::time::timeout(agent.timeout, hand_over(&pending, agent)).await {
        Ok(results) => results,
        Err(_) => pending
            .iter()
            .map(|p| Dispatch {
                request_id: p.id.clone(),
                result: Err(format!(
                    "the sync-agent at {} did not answer within {}",
                    agent.url,
                    humantime::format_duration(agent.timeout)
                )),
            })
            .collect(),
    };

    for dispatch in &results {
        let update = match &dispatch.result {
            Ok(job_id) => {
                conn.execute(
                    &format!(
                        "UPDATE {OUTBOX_TABLE} SET state = ?, job_id = ?, dispatched_at = ?, \
                         last_error = NULL WHERE id = ? AND state = ?"
                    ),
                    &[
                        RequestState::Dispatched.as_str().into(),
                        Value::Text(job_id.clone()),
                        Value::Int(now_ms()),
                        (&dispatch.request_id).into(),
                        RequestState::Pending.as_str().into(),
                    ],
                )
                .await
            }
            Err(error) => {
                conn.execute(
                    &format!("UPDATE {OUTBOX_TABLE} SET last_error = ? WHERE id = ?"),
                    &[Value::Text(error.clone()), (&dispatch.request_id).into()],
                )
                .await
            }
        };
        if let Err(err) = update {
            conn.close().await;
            return Err(err);
        }
    }
    conn.close().await;
    Ok(results)
}

async fn read_pending(conn: &mut Conn) -> Result<Vec<SyncRequest>, sqlx::Error> {
    if !table_exists(conn, OUTBOX_TABLE).await? {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT {} FROM {OUTBOX_TABLE} WHERE state = ? ORDER BY created_at, id",
        SyncRequest::COLUMNS
    );
    conn.fetch(&sql, &[RequestState::Pending.as_str().into()])
        .await?
        .iter()
        .map(SyncRequest::try_from)
        .collect()
}

async fn hand_over(pending: &[SyncRequest], agent: &AgentTarget) -> Vec<Dispatch> {
    let failed_all = |error: String| {
        pending
            .iter()
            .map(|p| Dispatch {
                request_id: p.id.clone(),
                result: Err(error.clone()),
            })
            .collect::<Vec<_>>()
    };
    let mut endpoint = match Endpoint::from_shared(agent.url.clone()) {
        Ok(endpoint) => endpoint
            .connect_timeout(agent.timeout)
            .timeout(agent.timeout),
        Err(err) => return failed_all(format!("invalid agent URL {}: {err}", agent.url)),
    };
    if agent.url.starts_with("https://") || agent.ca_pem.is_some() {
        let tls = fleetsync_common::grpc::client_tls(agent.ca_pem.clone());
        endpoint = match endpoint.tls_config(tls) {
            Ok(endpoint) => endpoint,
            Err(err) => {
                return failed_all(format!(
                    "TLS settings for {}: {}",
                    agent.url,
                    fleetsync_common::error::causes(&err)
                ));
            }
        };
    }
    let channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(err) => {
            return failed_all(format!(
                "cannot reach the sync-agent at {}: {}",
                agent.url,
                fleetsync_common::error::causes(&err)
            ));
        }
    };
    let token = match agent.token.as_deref().map(|t| {
        format!("Bearer {t}").parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>()
    }) {
        Some(Ok(value)) => Some(value),
        Some(Err(_)) => return failed_all("the agent token is not a valid header value".into()),
        None => None,
    };
    let mut client =
        SyncAgentClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
            if let Some(value) = &token {
                request
                    .metadata_mut()
                    .insert("authorization", value.clone());
            }
            Ok(request)
        });
    let mut results = Vec::with_capacity(pending.len());
    for request in pending {
        let scopes = request.scopes.to_proto();
        let result = client
            .start_sync(StartSyncRequest {
                request_id: request.id.to_string(),
                server_ids: Vec::new(),
                all_servers: true,
                scopes,
                force: false,
                reason: request.reason.clone(),
            })
            .await
            .map(|response| response.into_inner().job_id)
            .map_err(|status| match status.code() {
                // The client-side deadline ends a call as Cancelled.
                tonic::Code::Cancelled | tonic::Code::DeadlineExceeded => format!(
                    "the sync-agent at {} did not answer within {}",
                    agent.url,
                    humantime::format_duration(agent.timeout)
                ),
                code => format!(
                    "the sync-agent at {} refused: {code:?}: {}",
                    agent.url,
                    status.message()
                ),
            });
        results.push(Dispatch {
            request_id: request.id.clone(),
            result,
        });
    }
    results
}
