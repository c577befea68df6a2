//! `fleetsync.sync.v1.SyncAgent`: starting jobs, streaming their outcomes from a cursor, and
//! reading them back.

use std::sync::Arc;

use fleetsync_common::{
    AgentId, JobId, ServerId, ServiceError,
    proto::sync::v1::{
        self as pb, CheckConnectionRequest, CheckConnectionResponse, GetSyncJobRequest,
        GetSyncJobResponse, ListAgentsRequest, ListAgentsResponse, ListJobsRequest,
        ListJobsResponse, ResumeAgentRequest, ResumeAgentResponse, StartSyncRequest,
        StartSyncResponse, WatchSyncRequest, sync_agent_server::SyncAgent,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{
    AgentState, EventStream, convert,
    sync_requests::{ListQuery, Start, validate_list, validate_start},
};
use crate::{model::Outcome, store::JobRecord};

/// Outcomes read per database round trip while streaming.
const BATCH: i64 = 256;
/// Outcomes per `GetSyncJob` page unless the caller says otherwise.
const DEFAULT_PAGE: i64 = 1000;
/// Most outcomes per `GetSyncJob` page (about 2 MiB: well under the 4 MiB message limit).
const MAX_PAGE: i64 = 10_000;
/// Most bytes of outcomes in one `GetSyncJob` page (a page ends early rather than pass it).
const PAGE_BYTES: usize = 2 << 20;

/// `fleetsync.sync.v1.SyncAgent`.
#[derive(Debug, Clone)]
pub struct SyncAgentService {
    state: AgentState,
}

impl SyncAgentService {
    /// The service over shared agent state.
    pub fn new(state: AgentState) -> Self {
        Self { state }
    }

    async fn start(&self, request: StartSyncRequest) -> Result<(JobRecord, bool), ServiceError> {
        let job = match validate_start(request)? {
            Start::New(job) => job,
            Start::Join(request_id) => {
                let job = self
                    .state
                    .store
                    .job_by_request(&request_id)
                    .await?
                    .ok_or_else(|| ServiceError::not_found("job with request_id", &request_id))?;
                return Ok((job, false));
            }
        };
        let (record, created) = self.state.store.create_job(&job).await?;
        if created {
            tracing::info!(job_id = %record.id, servers = record.total, origin = job.origin.as_str(), "sync job accepted");
            self.state.signals.wake.notify_one();
        }
        Ok((record, created))
    }

    async fn job(&self, job_id: &str) -> Result<JobRecord, ServiceError> {
        let job_id = JobId::from_request(job_id, "job_id")?;
        self.state
            .store
            .job(&job_id)
            .await?
            .ok_or_else(|| ServiceError::not_found("job", &job_id))
    }

    /// Streams a job's events after `cursor`, then its summary. Each wake-up reads only the
    /// outcomes after the cursor (an index range) and the job's row; the outcome counts are
    /// read once, for the summary.
    fn stream(&self, job: JobRecord, cursor: u64) -> Result<EventStream, ServiceError> {
        /// Idle wake-ups between two checks that the job still exists.
        const GONE_CHECK_EVERY: u32 = 10;
        let permit = Arc::clone(&self.state.streams)
            .try_acquire_owned()
            .map_err(|_| {
                ServiceError::ResourceExhausted(
                    "too many event streams are open on this sync-agent; retry later or raise \
                     --max-streams"
                        .into(),
                )
            })?;
        let (tx, rx) = mpsc::channel(64);
        let state = self.state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut cursor = cursor as i64;
            let mut changed = state.signals.changed.subscribe();
            let job_id = job.id;
            let total = job.total;
            if cursor > total {
                return; // After the summary: nothing more.
            }
            // Wake-ups that found nothing new: every so often the job is looked up, so that a
            // job pruned by retention while watched ends the stream with NOT_FOUND instead of
            // leaving it open forever.
            let mut idle = 0u32;
            let feed = state.feeds.feed(&job_id);
            loop {
                let woke = std::time::Instant::now();
                changed.mark_unchanged();
                let batch = match feed.after(&state.store, &job_id, cursor, BATCH, woke).await {
                    Ok(batch) => batch,
                    Err(err) => {
                        let _ = tx.send(Err(ServiceError::from(err).into())).await;
                        return;
                    }
                };
                for record in batch.iter() {
                    cursor = record.seq;
                    if tx.send(Ok(convert::outcome_event(record))).await.is_err() {
                        return; // The client left.
                    }
                }
                if batch.len() as i64 == BATCH {
                    continue;
                }
                idle = if batch.is_empty() { idle + 1 } else { 0 };
                if idle % GONE_CHECK_EVERY == GONE_CHECK_EVERY - 1 {
                    match state.store.job(&job_id).await {
                        Ok(Some(_)) => {}
                        Ok(None) => {
                            let status = Status::not_found(format!(
                                "job {job_id} was deleted while it was watched (past the \
                                 retention, or by hand); its outcomes up to cursor {cursor} were \
                                 streamed"
                            ));
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                        Err(err) => {
                            let _ = tx.send(Err(ServiceError::from(err).into())).await;
                            return;
                        }
                    }
                }
                if cursor >= total {
                    let summary = match state.store.job(&job_id).await {
                        Ok(Some(job)) => Ok(convert::summary_event(&job)),
                        Ok(None) => Err(ServiceError::not_found("job", &job_id).into()),
                        Err(err) => Err(ServiceError::from(err).into()),
                    };
                    let _ = tx.send(summary).await;
                    return;
                }
                tokio::select! {
                    _ = changed.changed() => {}
                    () = tokio::time::sleep(state.watch_poll) => {}
                    () = tx.closed() => return,
                    () = state.shutdown.cancelled() => {
                        let status = Status::unavailable(format!(
                            "the sync-agent is shutting down; resume with WatchSync from cursor {cursor}"
                        ));
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl SyncAgent for SyncAgentService {
    type WatchSyncStream = EventStream;
    type SyncStream = EventStream;

    async fn start_sync(
        &self,
        request: Request<StartSyncRequest>,
    ) -> Result<Response<StartSyncResponse>, Status> {
        let (job, created) = self.start(request.into_inner()).await?;
        Ok(Response::new(StartSyncResponse {
            job_id: job.id.into_string(),
            created,
            server_count: job.total as u32,
        }))
    }

    async fn watch_sync(
        &self,
        request: Request<WatchSyncRequest>,
    ) -> Result<Response<Self::WatchSyncStream>, Status> {
        let request = request.into_inner();
        let job = self.job(&request.job_id).await?;
        // Cursors run 1..=total for outcomes; total + 1 is the summary.
        if request.cursor > job.total as u64 + 1 {
            return Err(ServiceError::OutOfRange(format!(
                "cursor {} is past the end of job {} (its stream ends at {})",
                request.cursor,
                job.id,
                job.total + 1
            ))
            .into());
        }
        Ok(Response::new(self.stream(job, request.cursor)?))
    }

    async fn sync(
        &self,
        request: Request<StartSyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let (job, _) = self.start(request.into_inner()).await?;
        Ok(Response::new(self.stream(job, 0)?))
    }

    async fn get_sync_job(
        &self,
        request: Request<GetSyncJobRequest>,
    ) -> Result<Response<GetSyncJobResponse>, Status> {
        let request = request.into_inner();
        let job = self.job(&request.job_id).await?;
        let (outcomes, next_page_token) = if request.include_outcomes {
            let size = match request.page_size {
                0 => DEFAULT_PAGE,
                n if n as i64 > MAX_PAGE => {
                    return Err(ServiceError::invalid(
                        "page_size",
                        format!("{n}; at most {MAX_PAGE}"),
                    )
                    .into());
                }
                n => i64::from(n),
            };
            let after = match request.page_token.as_str() {
                "" => 0,
                token => token
                    .parse::<i64>()
                    .ok()
                    .filter(|c| *c >= 0 && *c <= job.total)
                    .ok_or_else(|| {
                        ServiceError::invalid("page_token", "not a token this job returned")
                    })?,
            };
            let page = self
                .state
                .store
                .outcomes_after(&job.id, after, size)
                .await
                .map_err(ServiceError::from)?;
            // A page also ends before it would pass PAGE_BYTES encoded, whatever its size
            // asks: outcomes carry messages of up to a kilobyte, and a page must stay within
            // what any gRPC client decodes by default (4 MiB).
            let mut outcomes = Vec::with_capacity(page.len());
            let mut bytes = 0;
            let mut last_seq = None;
            for o in &page {
                let outcome =
                    convert::server_outcome(o.server_id, &o.server_name, &o.result, o.finished_at);
                bytes += prost::Message::encoded_len(&outcome) + 8;
                if bytes > PAGE_BYTES && !outcomes.is_empty() {
                    break;
                }
                outcomes.push(outcome);
                last_seq = Some(o.seq);
            }
            let cut = outcomes.len() < page.len();
            let next = match last_seq {
                Some(seq) if (cut || page.len() as i64 == size) && seq < job.total => {
                    seq.to_string()
                }
                _ => String::new(),
            };
            (outcomes, next)
        } else {
            (Vec::new(), String::new())
        };
        Ok(Response::new(GetSyncJobResponse {
            job: Some(convert::summary(&job)),
            outcomes,
            next_page_token,
        }))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let request = request.into_inner();
        let ListQuery {
            filter,
            after,
            size,
        } = validate_list(&request)?;
        let jobs = self
            .state
            .store
            .list_jobs(&filter, after, size + 1)
            .await
            .map_err(ServiceError::from)?;
        let more = jobs.len() as i64 > size;
        let page = &jobs[..jobs.len().min(size as usize)];
        let next_page_token = match page.last() {
            Some(last) if more => format!("{}:{}", last.created_at, last.id),
            _ => String::new(),
        };
        Ok(Response::new(ListJobsResponse {
            jobs: page.iter().map(convert::summary).collect(),
            next_page_token,
        }))
    }

    async fn list_agents(
        &self,
        _request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let agents = self
            .state
            .store
            .agents()
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(ListAgentsResponse {
            agents: agents.iter().map(convert::agent).collect(),
        }))
    }

    async fn resume_agent(
        &self,
        request: Request<ResumeAgentRequest>,
    ) -> Result<Response<ResumeAgentResponse>, Status> {
        let id = AgentId::from_request(request.into_inner().id.trim(), "id")?;
        let agent = self
            .state
            .store
            .request_resume(&id)
            .await
            .map_err(ServiceError::from)?
            .ok_or_else(|| ServiceError::not_found("agent", &id))?;
        if agent.status.state != crate::model::AgentState::Quarantined {
            return Err(ServiceError::FailedPrecondition(format!(
                "agent {id} is {}, not quarantined: nothing to resume",
                agent.status.state
            ))
            .into());
        }
        Ok(Response::new(ResumeAgentResponse {
            agent: Some(convert::agent(&agent)),
        }))
    }

    async fn check_connection(
        &self,
        request: Request<CheckConnectionRequest>,
    ) -> Result<Response<CheckConnectionResponse>, Status> {
        let server_id = ServerId::from_request(request.into_inner().server_id, "server_id")?;
        let _permit = Arc::clone(&self.state.checks)
            .try_acquire_owned()
            .map_err(|_| {
                ServiceError::ResourceExhausted(
                    "too many CheckConnection calls are in flight on this sync-agent; retry \
                     later or raise --max-checks"
                        .into(),
                )
            })?;
        let server = self
            .state
            .store
            .server(server_id)
            .await
            .map_err(ServiceError::from)?
            .ok_or_else(|| ServiceError::not_found("server", server_id))?;
        let check = self.state.ssh.check(server.target()).await;
        let (outcome, cause) = match &check.error {
            None => (Outcome::Ok, None),
            Some(err) => err.outcome(),
        };
        let host_key_check = match (&check.host_key, server.pinned_key()) {
            (None, _) => pb::HostKeyCheck::Unspecified,
            (Some(_), None) => pb::HostKeyCheck::NotPinned,
            (Some(presented), Some(pinned)) if presented == pinned => pb::HostKeyCheck::Match,
            (Some(_), Some(_)) => pb::HostKeyCheck::Mismatch,
        };
        Ok(Response::new(CheckConnectionResponse {
            server_id: server_id.get(),
            outcome: convert::outcome(outcome) as i32,
            cause: convert::cause(cause) as i32,
            message: check
                .error
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            connect_latency: check
                .connect_latency
                .and_then(|d| prost_types::Duration::try_from(d).ok()),
            banner: check.banner.unwrap_or_default(),
            host_key_algorithm: check
                .host_key
                .as_ref()
                .map(|k| k.algorithm.clone())
                .unwrap_or_default(),
            host_key_fingerprint: check
                .host_key
                .as_ref()
                .map(|k| k.fingerprint.clone())
                .unwrap_or_default(),
            host_key_check: host_key_check as i32,
            authenticated: check.authenticated,
        }))
    }
}
