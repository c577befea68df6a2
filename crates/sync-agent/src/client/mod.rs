//! Operator commands of the agent binary, for people without grpcurl: they talk to a running
//! agent over gRPC (token and TLS as configured), print tables and a live progress bar, or JSON.

use std::time::Duration;

use anyhow::Context;
use fleetsync_common::proto::sync::v1::{
    self as pb, CheckConnectionRequest, GetSyncJobRequest, ListServersRequest, ResetHostKeyRequest,
    StartSyncRequest, WatchSyncRequest, fleet_client::FleetClient,
    sync_agent_client::SyncAgentClient, sync_event,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

use crate::config::{
    AddServerArgs, AgentArgs, CheckArgs, JobArgs, JobsArgs, Output, RemoveServerArgs,
    ResetHostKeyArgs, ServersAction, ServersArgs, ServiceArg, SyncArgs,
};
use crate::service::convert;

mod agents;
mod exit;
mod import;
mod render;

pub use agents::agents;

use exit::out;
pub use exit::{Exit, Failure};
use render::{millis, outcome_json, outcome_name, printable, report, short, summary_json, time};

type Authed = InterceptedService<Channel, Bearer>;

/// Adds the bearer token, if any, to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A connection to the agent, and how long each answer may take.
struct Agent {
    sync: SyncAgentClient<Authed>,
    fleet: FleetClient<Authed>,
    url: String,
    timeout: Duration,
}

impl Agent {
    /// `call`'s answer, or DEADLINE_EXCEEDED after `--timeout`; an error becomes a [`Failure`].
    async fn answer<T>(
        &self,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Failure> {
        within(self.timeout, call)
            .await
            .map_err(|status| Failure::status(&self.url, status))
    }
}

/// The same bound inside a listing's pages (their errors are statuses until the end).
async fn within<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(limit, call).await {
        Ok(answer) => answer.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "did not answer within {} (--timeout)",
            humantime::format_duration(limit)
        ))),
    }
}

async fn connect(args: &AgentArgs) -> Result<Agent, Failure> {
    let timeout: Duration = args.timeout.into();
    let url = args.agent_url.clone();
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| Failure::new(Exit::Usage, format!("invalid agent URL {url}: {e}")))?
        .connect_timeout(timeout)
        // A watch may wait long for its next event; a connection that stops answering pings
        // is given up after the timeout all the same.
        .http2_keep_alive_interval(timeout.min(Duration::from_secs(10)))
        .keep_alive_timeout(timeout)
        .keep_alive_while_idle(true);
    if url.starts_with("https://") || args.agent_ca.is_some() {
        let ca_pem = match &args.agent_ca {
            Some(ca) => {
                Some(std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?)
            }
            None => None,
        };
        endpoint = endpoint
            .tls_config(fleetsync_common::grpc::client_tls(ca_pem))
            .context("TLS settings")?;
    }
    let token = match &args.agent_token_file {
        Some(path) => {
            let token = fleetsync_common::grpc::read_token(path)
                .map_err(|e| Failure::new(Exit::Usage, e.to_string()))?;
            Some(
                format!("Bearer {token}")
                    .parse()
                    .context("the token is not a valid header value")?,
            )
        }
        None => None,
    };
    let channel = match tokio::time::timeout(timeout, endpoint.connect()).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(err)) => return Err(Failure::unreachable(&url, &err)),
        Err(_) => return Err(Failure::silent(&url, timeout)),
    };
    let bearer = Bearer(token);
    Ok(Agent {
        sync: SyncAgentClient::with_interceptor(channel.clone(), bearer.clone()),
        fleet: FleetClient::with_interceptor(channel, bearer),
        url,
        timeout,
    })
}

/// Every item of a paged listing from `token` on, at most `limit`: `page(token, room)` reads
/// the page after `token` with room for `room` more items, and returns its items and the next
/// token (empty after the last page).
async fn pages<T, F, Fut>(
    mut token: String,
    limit: usize,
    mut page: F,
) -> Result<Vec<T>, tonic::Status>
where
    F: FnMut(String, usize) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut items = Vec::new();
    while items.len() < limit {
        let (got, next) = page(token, limit - items.len()).await?;
        items.extend(got);
        if next.is_empty() {
            break;
        }
        token = next;
    }
    items.truncate(limit);
    Ok(items)
}

/// Follows a job's stream from the start, with a progress bar on a terminal.
async fn follow(
    agent: &mut Agent,
    job_id: &str,
    total: u64,
    output: Output,
) -> Result<(Vec<pb::ServerOutcome>, Option<pb::JobSummary>), Failure> {
    let bar = if output == Output::Human {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} servers {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut client = agent.sync.clone();
    let mut stream = agent
        .answer(client.watch_sync(WatchSyncRequest {
            job_id: job_id.into(),
            cursor: 0,
        }))
        .await?;
    let mut outcomes = Vec::new();
    let mut summary = None;
    // Events come as servers finish, however long that takes; a dead connection ends the
    // stream with an error (keepalive).
    while let Some(event) = stream.next().await {
        match event.map_err(|s| Failure::status(&agent.url, s))?.event {
            Some(sync_event::Event::Outcome(o)) => {
                bar.set_message(format!(
                    "{}: {}",
                    printable(&o.server_name),
                    outcome_name(&o)
                ));
                bar.inc(1);
                outcomes.push(o);
            }
            Some(sync_event::Event::Summary(s)) => summary = Some(s),
            None => {}
        }
    }
    bar.finish_and_clear();
    outcomes.sort_by(|a, b| a.server_name.cmp(&b.server_name));
    Ok((outcomes, summary))
}

/// 0 when every outcome is OK, 1 otherwise.
fn exit_of(outcomes: &[pb::ServerOutcome]) -> Exit {
    Exit::of_outcomes(outcomes.iter().map(|o| o.outcome() == pb::Outcome::Ok))
}

/// `sync-agent sync`.
pub async fn sync(args: &SyncArgs) -> Result<Exit, Failure> {
    let mut agent = connect(&args.agent).await?;
    let mut client = agent.sync.clone();
    let started = agent
        .answer(client.start_sync(StartSyncRequest {
            request_id: args.request_id.clone().unwrap_or_default(),
            server_ids: args.servers.clone(),
            all_servers: args.all,
            scopes: Vec::new(),
            force: args.force,
            reason: args.reason.clone(),
        }))
        .await?;
    if !args.watch {
        match args.agent.output {
            Output::Json => out!(
                "{}",
                json!({"job_id": started.job_id, "created": started.created, "servers": started.server_count})
            )?,
            Output::Human => out!(
                "job {} {} for {} server(s); follow it with `sync-agent job {} --watch`",
                started.job_id,
                if started.created {
                    "started"
                } else {
                    "already exists"
                },
                started.server_count,
                started.job_id
            )?,
        }
        return Ok(Exit::Ok);
    }
    let (outcomes, summary) = follow(
        &mut agent,
        &started.job_id,
        u64::from(started.server_count),
        args.agent.output,
    )
    .await?;
    report(&outcomes, summary.as_ref(), args.agent.output)?;
    Ok(exit_of(&outcomes))
}

/// `sync-agent job`.
pub async fn job(args: &JobArgs) -> Result<Exit, Failure> {
    let mut agent = connect(&args.agent).await?;
    let mut client = agent.sync.clone();
    let mut read = agent
        .answer(client.get_sync_job(GetSyncJobRequest {
            job_id: args.job_id.clone(),
            include_outcomes: !args.watch,
            page_size: 10_000,
            page_token: String::new(),
        }))
        .await?;
    let job = read
        .job
        .clone()
        .ok_or_else(|| Failure::new(Exit::Refused, "the agent sent no job"))?;
    // Outcomes come a page at a time: a job of any size fits.
    if !read.next_page_token.is_empty() {
        let limit = agent.timeout;
        let rest = pages(read.next_page_token, usize::MAX, |page_token, _| {
            let mut client = client.clone();
            let job_id = args.job_id.clone();
            async move {
                let page = within(
                    limit,
                    client.get_sync_job(GetSyncJobRequest {
                        job_id,
                        include_outcomes: true,
                        page_size: 10_000,
                        page_token,
                    }),
                )
                .await?;
                Ok((page.outcomes, page.next_page_token))
            }
        })
        .await
        .map_err(|s| Failure::status(&agent.url, s))?;
        read.outcomes.extend(rest);
    }
    let outcomes = if args.watch {
        let (outcomes, summary) = follow(
            &mut agent,
            &job.job_id,
            u64::from(job.total),
            args.agent.output,
        )
        .await?;
        report(&outcomes, summary.as_ref(), args.agent.output)?;
        outcomes
    } else {
        let mut outcomes = read.outcomes;
        outcomes.sort_by(|a, b| a.server_name.cmp(&b.server_name));
        report(&outcomes, Some(&job), args.agent.output)?;
        outcomes
    };
    Ok(exit_of(&outcomes))
}

/// `sync-agent jobs`.
pub async fn jobs(args: &JobsArgs) -> Result<Exit, Failure> {
    let agent = connect(&args.agent).await?;
    let origin = args
        .origin
        .map_or(pb::JobOrigin::Unspecified, convert::origin);
    let state = args
        .state
        .map_or(pb::JobState::Unspecified, convert::job_state);
    let server_id = args.server.unwrap_or(0);
    let limit = agent.timeout;
    let jobs = pages(String::new(), args.limit as usize, |page_token, room| {
        let mut client = agent.sync.clone();
        async move {
            let page = within(
                limit,
                client.list_jobs(pb::ListJobsRequest {
                    origin: origin as i32,
                    state: state as i32,
                    server_id,
                    page_size: room.min(1000) as u32,
                    page_token,
                    ..Default::default()
                }),
            )
            .await?;
            Ok((page.jobs, page.next_page_token))
        }
    })
    .await
    .map_err(|s| Failure::status(&agent.url, s))?;
    if args.agent.output == Output::Json {
        let list: Vec<Value> = jobs.iter().map(summary_json).collect();
        out!("{}", serde_json::to_string_pretty(&list).expect("JSON"))?;
        return Ok(Exit::Ok);
    }
    out!(
        "{:<32}  {:<9} {:<7} {:>13}  {:<20}  REASON",
        "JOB",
        "ORIGIN",
        "STATE",
        "DONE",
        "CREATED"
    )?;
    for j in &jobs {
        out!(
            "{:<32}  {:<9} {:<7} {:>13}  {:<20}  {}",
            j.job_id,
            short(j.origin().as_str_name(), "JOB_ORIGIN_").to_lowercase(),
            short(j.state().as_str_name(), "JOB_STATE_").to_lowercase(),
            format!("{}/{}", j.finished, j.total),
            time(j.created_at.as_ref()),
            printable(&j.reason),
        )?;
    }
    out!("{} job(s)", jobs.len())?;
    Ok(Exit::Ok)
}

/// `sync-agent servers`, `servers add`, `servers remove`, `servers import`.
pub async fn servers(args: &ServersArgs) -> Result<Exit, Failure> {
    let agent = connect(&args.agent).await?;
    match &args.action {
        None => list_servers(&agent, args).await,
        Some(ServersAction::Add(add)) => add_server(&agent, add, args.agent.output).await,
        Some(ServersAction::Remove(remove)) => {
            remove_server(&agent, remove, args.agent.output).await
        }
        Some(ServersAction::Import(file)) => import::import(&agent, file, args.agent.output).await,
    }
}

/// `sync-agent servers add NAME IP`: UpsertServer.
async fn add_server(agent: &Agent, add: &AddServerArgs, output: Output) -> Result<Exit, Failure> {
    let service = match add.service {
        ServiceArg::None => pb::DatabaseService::None,
        ServiceArg::Mysql => pb::DatabaseService::Mysql,
        ServiceArg::Mariadb => pb::DatabaseService::Mariadb,
        ServiceArg::Postgresql => pb::DatabaseService::Postgresql,
    };
    let mut fleet = agent.fleet.clone();
    let stored = agent
        .answer(fleet.upsert_server(pb::UpsertServerRequest {
            id: add.id.unwrap_or(0),
            spec: Some(pb::ServerSpec {
                name: add.name.clone(),
                ip: add.ip.clone(),
                port: u32::from(add.port),
                ssh_user: add.user.clone(),
                database_service: service as i32,
                database_version: add.service_version.clone(),
                host_key: add.host_key.clone().unwrap_or_default(),
                zone: add.zone.clone(),
                ..Default::default()
            }),
        }))
        .await?;
    let id = stored.server.as_ref().map_or(0, |s| s.id);
    match output {
        Output::Json => out!(
            "{:#}",
            json!({"id": id, "name": add.name, "created": stored.created})
        )?,
        Output::Human => out!(
            "server {id} {} ({}:{}) {}",
            printable(&add.name),
            add.ip,
            add.port,
            if stored.created {
                "registered"
            } else {
                "updated"
            }
        )?,
    }
    Ok(Exit::Ok)
}

/// `sync-agent servers remove ID`: DeleteServer.
async fn remove_server(
    agent: &Agent,
    remove: &RemoveServerArgs,
    output: Output,
) -> Result<Exit, Failure> {
    let mut fleet = agent.fleet.clone();
    agent
        .answer(fleet.delete_server(pb::DeleteServerRequest {
            id: remove.server_id,
        }))
        .await?;
    match output {
        Output::Json => out!("{:#}", json!({"id": remove.server_id, "removed": true}))?,
        Output::Human => out!("server {} removed", remove.server_id)?,
    }
    Ok(Exit::Ok)
}

/// `sync-agent servers`: every server, a page at a time.
async fn list_servers(agent: &Agent, args: &ServersArgs) -> Result<Exit, Failure> {
    let reachability = args
        .reachability
        .map_or(pb::Reachability::Unspecified, convert::reachability) as i32;
    let limit = agent.timeout;
    let servers = pages(String::new(), usize::MAX, |page_token, _| {
        let mut fleet = agent.fleet.clone();
        async move {
            let page = within(
                limit,
                fleet.list_servers(ListServersRequest {
                    reachability,
                    page_size: 1000,
                    page_token,
                }),
            )
            .await?;
            Ok((page.servers, page.next_page_token))
        }
    })
    .await
    .map_err(|s| Failure::status(&agent.url, s))?;
    if args.agent.output == Output::Json {
        let list: Vec<Value> = servers
            .iter()
            .map(|s| {
                let spec = s.spec.clone().unwrap_or_default();
                json!({
                    "id": s.id, "name": spec.name, "ip": spec.ip, "port": spec.port,
                    "ssh_user": spec.ssh_user, "zone": spec.zone,
                    "database_service": short(spec.database_service().as_str_name(), "DATABASE_SERVICE_").to_lowercase(),
                    "reachability": short(s.reachability().as_str_name(), "REACHABILITY_").to_lowercase(),
                    "consecutive_failures": s.consecutive_failures,
                    "next_probe_at": s.next_probe_at.as_ref().map(|t| time(Some(t))),
                    "host_key": s.host_key.as_ref().map(|k| k.fingerprint.clone()),
                    "last_outcome": s.last_outcome.as_ref().map(outcome_json),
                    "last_attempt": s.last_attempt.as_ref().map(outcome_json),
                })
            })
            .collect();
        out!("{}", serde_json::to_string_pretty(&list).expect("JSON"))?;
        return Ok(Exit::Ok);
    }
    out!(
        "{:>5}  {:<20} {:<22} {:<11} {:<8} {:<26} NEXT PROBE",
        "ID",
        "NAME",
        "ADDRESS",
        "SERVICE",
        "STATE",
        "LAST OUTCOME"
    )?;
    for s in &servers {
        let spec = s.spec.clone().unwrap_or_default();
        out!(
            "{:>5}  {:<20} {:<22} {:<11} {:<8} {:<26} {}",
            s.id,
            printable(&spec.name),
            format!("{}:{}", spec.ip, spec.port),
            short(spec.database_service().as_str_name(), "DATABASE_SERVICE_").to_lowercase(),
            short(s.reachability().as_str_name(), "REACHABILITY_").to_lowercase(),
            last_outcome(s),
            time(s.next_probe_at.as_ref()),
        )?;
    }
    out!("{} server(s)", servers.len())?;
    Ok(Exit::Ok)
}

/// A server's last outcome for the table: its last run, "UNREACHABLE (refused)" for a server
/// offline since; a skip stored as a run by earlier agents says why with the attempt before it:
/// "SKIPPED_OFFLINE (refused)".
fn last_outcome(s: &pb::Server) -> String {
    let Some(last) = &s.last_outcome else {
        return "-".into();
    };
    match &s.last_attempt {
        Some(attempt) if attempt.cause() != pb::UnreachableCause::Unspecified => format!(
            "{} ({})",
            short(last.outcome().as_str_name(), "OUTCOME_"),
            short(attempt.cause().as_str_name(), "UNREACHABLE_CAUSE_").to_lowercase()
        ),
        Some(attempt) => format!(
            "{} ({})",
            short(last.outcome().as_str_name(), "OUTCOME_"),
            short(attempt.outcome().as_str_name(), "OUTCOME_")
        ),
        None => outcome_name(last),
    }
}

/// `sync-agent check`: 0 when the server answered, authenticated and matched its pinned key.
pub async fn check(args: &CheckArgs) -> Result<Exit, Failure> {
    let agent = connect(&args.agent).await?;
    let mut client = agent.sync.clone();
    let c = agent
        .answer(client.check_connection(CheckConnectionRequest {
            server_id: args.server_id,
        }))
        .await?;
    let outcome = short(c.outcome().as_str_name(), "OUTCOME_");
    let cause = (c.cause() != pb::UnreachableCause::Unspecified)
        .then(|| short(c.cause().as_str_name(), "UNREACHABLE_CAUSE_"));
    let key_check = short(c.host_key_check().as_str_name(), "HOST_KEY_CHECK_").to_lowercase();
    let exit = Exit::of_outcomes(std::iter::once(c.outcome() == pb::Outcome::Ok));
    if args.agent.output == Output::Json {
        out!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "server_id": c.server_id, "outcome": outcome, "cause": cause, "message": c.message,
                "connect_ms": c.connect_latency.as_ref().map(|d| millis(Some(d))),
                "banner": c.banner, "host_key": format!("{} {}", c.host_key_algorithm, c.host_key_fingerprint).trim(),
                "host_key_check": key_check, "authenticated": c.authenticated,
            }))
            .expect("JSON")
        )?;
        return Ok(exit);
    }
    match &cause {
        Some(cause) => out!(
            "server {}: {outcome} ({})",
            c.server_id,
            cause.to_lowercase()
        )?,
        None => out!("server {}: {outcome}", c.server_id)?,
    }
    if let Some(d) = &c.connect_latency {
        out!("  connect        {} ms", millis(Some(d)))?;
    }
    if !c.banner.is_empty() {
        out!("  banner         {}", printable(&c.banner))?;
    }
    if !c.host_key_fingerprint.is_empty() {
        out!(
            "  host key       {} {} ({key_check})",
            c.host_key_algorithm,
            c.host_key_fingerprint
        )?;
    }
    out!(
        "  authenticated  {}",
        if c.authenticated { "yes" } else { "no" }
    )?;
    if !c.message.is_empty() {
        out!("  problem        {}", printable(&c.message))?;
    }
    Ok(exit)
}

/// `sync-agent reset-host-key ID`.
pub async fn reset_host_key(args: &ResetHostKeyArgs) -> Result<Exit, Failure> {
    let agent = connect(&args.agent).await?;
    let mut fleet = agent.fleet.clone();
    let response = agent
        .answer(fleet.reset_host_key(ResetHostKeyRequest { id: args.server_id }))
        .await?;
    if args.agent.output == Output::Json {
        out!(
            "{:#}",
            json!({
                "server_id": args.server_id,
                "forgotten": response.previous.as_ref().map(|k| json!({
                    "algorithm": k.algorithm, "fingerprint": k.fingerprint,
                })),
            })
        )?;
        return Ok(Exit::Ok);
    }
    match response.previous {
        Some(key) => out!(
            "server {}: forgot pinned host key {} {}; the next sync pins the key it presents",
            args.server_id,
            key.algorithm,
            key.fingerprint
        )?,
        None => out!("server {}: no host key was pinned", args.server_id)?,
    }
    Ok(Exit::Ok)
}
