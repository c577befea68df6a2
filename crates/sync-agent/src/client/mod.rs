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
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use crate::config::{
    AgentArgs, CheckArgs, JobArgs, JobsArgs, Output, ResetHostKeyArgs, ServersArgs, SyncArgs,
};
use crate::service::convert;

mod render;

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

async fn connect(
    args: &AgentArgs,
) -> anyhow::Result<(SyncAgentClient<Authed>, FleetClient<Authed>)> {
    let mut endpoint = Endpoint::from_shared(args.agent_url.clone())
        .with_context(|| format!("invalid agent URL {}", args.agent_url))?
        .connect_timeout(Duration::from_secs(5));
    if args.agent_url.starts_with("https://") || args.agent_ca.is_some() {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &args.agent_ca {
            let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).context("TLS settings")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the sync-agent at {}", args.agent_url))?;
    let token = match &args.agent_token_file {
        Some(path) => {
            let token = fleetsync_common::grpc::read_token(path)?;
            Some(
                format!("Bearer {token}")
                    .parse()
                    .context("the token is not a valid header value")?,
            )
        }
        None => None,
    };
    let bearer = Bearer(token);
    Ok((
        SyncAgentClient::with_interceptor(channel.clone(), bearer.clone()),
        FleetClient::with_interceptor(channel, bearer),
    ))
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

fn status(err: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", err.code(), err.message())
}

/// Follows a job's stream from the start, with a progress bar on a terminal.
async fn follow(
    client: &mut SyncAgentClient<Authed>,
    job_id: &str,
    total: u64,
    output: Output,
) -> anyhow::Result<(Vec<pb::ServerOutcome>, Option<pb::JobSummary>)> {
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
    let mut stream = client
        .watch_sync(WatchSyncRequest {
            job_id: job_id.into(),
            cursor: 0,
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut outcomes = Vec::new();
    let mut summary = None;
    while let Some(event) = stream.next().await {
        match event.map_err(status)?.event {
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

/// `sync-agent sync`.
pub async fn sync(args: &SyncArgs) -> anyhow::Result<()> {
    let (mut client, _) = connect(&args.agent).await?;
    let started = client
        .start_sync(StartSyncRequest {
            request_id: args.request_id.clone().unwrap_or_default(),
            server_ids: args.servers.clone(),
            all_servers: args.all,
            scopes: Vec::new(),
            force: args.force,
            reason: args.reason.clone(),
        })
        .await
        .map_err(status)?
        .into_inner();
    if !args.watch {
        match args.agent.output {
            Output::Json => println!(
                "{}",
                json!({"job_id": started.job_id, "created": started.created, "servers": started.server_count})
            ),
            Output::Human => println!(
                "job {} {} for {} server(s); follow it with `sync-agent job {} --watch`",
                started.job_id,
                if started.created {
                    "started"
                } else {
                    "already exists"
                },
                started.server_count,
                started.job_id
            ),
        }
        return Ok(());
    }
    let (outcomes, summary) = follow(
        &mut client,
        &started.job_id,
        u64::from(started.server_count),
        args.agent.output,
    )
    .await?;
    report(&outcomes, summary.as_ref(), args.agent.output);
    Ok(())
}

/// `sync-agent job`.
pub async fn job(args: &JobArgs) -> anyhow::Result<()> {
    let (mut client, _) = connect(&args.agent).await?;
    let mut read = client
        .get_sync_job(GetSyncJobRequest {
            job_id: args.job_id.clone(),
            include_outcomes: !args.watch,
            page_size: 10_000,
            page_token: String::new(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let job = read.job.clone().context("the agent sent no job")?;
    // Outcomes come a page at a time: a job of any size fits.
    if !read.next_page_token.is_empty() {
        let rest = pages(read.next_page_token, usize::MAX, |page_token, _| {
            let mut client = client.clone();
            let job_id = args.job_id.clone();
            async move {
                let page = client
                    .get_sync_job(GetSyncJobRequest {
                        job_id,
                        include_outcomes: true,
                        page_size: 10_000,
                        page_token,
                    })
                    .await?
                    .into_inner();
                Ok((page.outcomes, page.next_page_token))
            }
        })
        .await
        .map_err(status)?;
        read.outcomes.extend(rest);
    }
    if args.watch {
        let (outcomes, summary) = follow(
            &mut client,
            &job.job_id,
            u64::from(job.total),
            args.agent.output,
        )
        .await?;
        report(&outcomes, summary.as_ref(), args.agent.output);
    } else {
        let mut outcomes = read.outcomes;
        outcomes.sort_by(|a, b| a.server_name.cmp(&b.server_name));
        report(&outcomes, Some(&job), args.agent.output);
    }
    Ok(())
}

/// `sync-agent jobs`.
pub async fn jobs(args: &JobsArgs) -> anyhow::Result<()> {
    let (client, _) = connect(&args.agent).await?;
    let origin = args
        .origin
        .map_or(pb::JobOrigin::Unspecified, convert::origin);
    let state = args
        .state
        .map_or(pb::JobState::Unspecified, convert::job_state);
    let server_id = args.server.unwrap_or(0);
    let jobs = pages(String::new(), args.limit as usize, |page_token, room| {
        let mut client = client.clone();
        async move {
            let page = client
                .list_jobs(pb::ListJobsRequest {
                    origin: origin as i32,
                    state: state as i32,
                    server_id,
                    page_size: room.min(1000) as u32,
                    page_token,
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok((page.jobs, page.next_page_token))
        }
    })
    .await
    .map_err(status)?;
    if args.agent.output == Output::Json {
        let list: Vec<Value> = jobs.iter().map(summary_json).collect();
        println!("{}", serde_json::to_string_pretty(&list).expect("JSON"));
        return Ok(());
    }
    println!(
        "{:<32}  {:<9} {:<7} {:>13}  {:<20}  REASON",
        "JOB", "ORIGIN", "STATE", "DONE", "CREATED"
    );
    for j in &jobs {
        println!(
            "{:<32}  {:<9} {:<7} {:>13}  {:<20}  {}",
            j.job_id,
            short(j.origin().as_str_name(), "JOB_ORIGIN_").to_lowercase(),
            short(j.state().as_str_name(), "JOB_STATE_").to_lowercase(),
            format!("{}/{}", j.finished, j.total),
            time(j.created_at.as_ref()),
            printable(&j.reason),
        );
    }
    println!("{} job(s)", jobs.len());
    Ok(())
}

/// `sync-agent servers`.
pub async fn servers(args: &ServersArgs) -> anyhow::Result<()> {
    let (_, fleet) = connect(&args.agent).await?;
    let reachability = args
        .reachability
        .map_or(pb::Reachability::Unspecified, convert::reachability) as i32;
    let servers = pages(String::new(), usize::MAX, |page_token, _| {
        let mut fleet = fleet.clone();
        async move {
            let page = fleet
                .list_servers(ListServersRequest {
                    reachability,
                    page_size: 1000,
                    page_token,
                })
                .await?
                .into_inner();
            Ok((page.servers, page.next_page_token))
        }
    })
    .await
    .map_err(status)?;
    if args.agent.output == Output::Json {
        let list: Vec<Value> = servers
            .iter()
            .map(|s| {
                let spec = s.spec.clone().unwrap_or_default();
                json!({
                    "id": s.id, "name": spec.name, "ip": spec.ip, "port": spec.port,
                    "ssh_user": spec.ssh_user,
                    "database_service": short(spec.database_service().as_str_name(), "DATABASE_SERVICE_").to_lowercase(),
                    "reachability": short(s.reachability().as_str_name(), "REACHABILITY_").to_lowercase(),
                    "consecutive_failures": s.consecutive_failures,
                    "next_probe_at": s.next_probe_at.as_ref().map(|t| time(Some(t))),
                    "host_key": s.host_key.as_ref().map(|k| k.fingerprint.clone()),
                    "last_outcome": s.last_outcome.as_ref().map(outcome_json),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list).expect("JSON"));
        return Ok(());
    }
    println!(
        "{:>5}  {:<20} {:<22} {:<11} {:<8} {:<26} NEXT PROBE",
        "ID", "NAME", "ADDRESS", "SERVICE", "STATE", "LAST OUTCOME"
    );
    for s in &servers {
        let spec = s.spec.clone().unwrap_or_default();
        println!(
            "{:>5}  {:<20} {:<22} {:<11} {:<8} {:<26} {}",
            s.id,
            printable(&spec.name),
            format!("{}:{}", spec.ip, spec.port),
            short(spec.database_service().as_str_name(), "DATABASE_SERVICE_").to_lowercase(),
            short(s.reachability().as_str_name(), "REACHABILITY_").to_lowercase(),
            s.last_outcome
                .as_ref()
                .map(outcome_name)
                .unwrap_or_else(|| "-".into()),
            time(s.next_probe_at.as_ref()),
        );
    }
    println!("{} server(s)", servers.len());
    Ok(())
}

/// `sync-agent check`.
pub async fn check(args: &CheckArgs) -> anyhow::Result<()> {
    let (mut client, _) = connect(&args.agent).await?;
    let c = client
        .check_connection(CheckConnectionRequest {
            server_id: args.server_id,
        })
        .await
        .map_err(status)?
        .into_inner();
    let outcome = short(c.outcome().as_str_name(), "OUTCOME_");
    let key_check = short(c.host_key_check().as_str_name(), "HOST_KEY_CHECK_").to_lowercase();
    if args.agent.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "server_id": c.server_id, "outcome": outcome, "message": c.message,
                "connect_ms": c.connect_latency.as_ref().map(|d| millis(Some(d))),
                "banner": c.banner, "host_key": format!("{} {}", c.host_key_algorithm, c.host_key_fingerprint).trim(),
                "host_key_check": key_check, "authenticated": c.authenticated,
            }))
            .expect("JSON")
        );
        return Ok(());
    }
    println!("server {}: {outcome}", c.server_id);
    if let Some(d) = &c.connect_latency {
        println!("  connect        {} ms", millis(Some(d)));
    }
    if !c.banner.is_empty() {
        println!("  banner         {}", printable(&c.banner));
    }
    if !c.host_key_fingerprint.is_empty() {
        println!(
            "  host key       {} {} ({key_check})",
            c.host_key_algorithm, c.host_key_fingerprint
        );
    }
    println!(
        "  authenticated  {}",
        if c.authenticated { "yes" } else { "no" }
    );
    if !c.message.is_empty() {
        println!("  problem        {}", printable(&c.message));
    }
    Ok(())
}

/// `sync-agent reset-host-key ID`.
pub async fn reset_host_key(args: &ResetHostKeyArgs) -> anyhow::Result<()> {
    let (_, mut fleet) = connect(&args.agent).await?;
    let response = fleet
        .reset_host_key(ResetHostKeyRequest { id: args.server_id })
        .await
        .map_err(status)?
        .into_inner();
    match response.previous {
        Some(key) => println!(
            "server {}: forgot pinned host key {} {}; the next sync pins the key it presents",
            args.server_id, key.algorithm, key.fingerprint
        ),
        None => println!("server {}: no host key was pinned", args.server_id),
    }
    Ok(())
}
