//! The command-line commands (`migrate`, `status`, `plan`, `verify`) with human and JSON output.

use std::{
    process::ExitCode,
    time::{Duration, UNIX_EPOCH},
};

use fleetsync_common::{Db, out};
use serde_json::{Value, json};

use crate::{
    agents::LiveAgent,
    config::{MigrateArgs, Output, PlanArgs, ReadArgs},
    engine::{Engine, EngineError, Event, Options, Status},
    history::Rollback,
    model::RollbackState,
    outbox::{AgentTarget, dispatch_pending},
};

/// Exit status for a command line that names what does not exist (clap exits 2 as well).
pub const EXIT_USAGE: u8 = 2;
/// Exit status for refusals where the database and the binary disagree.
pub const EXIT_VERIFICATION: u8 = 3;
/// Exit status when `migrate` refuses to stop serving agents (without `--stop-agents`).
pub const EXIT_AGENTS: u8 = 4;
/// Exit status when `migrate` refuses a way down that would destroy data (without
/// `--allow-data-loss`) or passes an irreversible migration.
pub const EXIT_DATA_LOSS: u8 = 5;

fn exit_status(err: &EngineError) -> u8 {
    if matches!(err, EngineError::UnknownTarget(_)) {
        EXIT_USAGE
    } else if matches!(
        err,
        EngineError::WouldStopAgents { .. } | EngineError::RollbackStopsAgents { .. }
    ) {
        EXIT_AGENTS
    } else if matches!(
        err,
        EngineError::WouldLoseData { .. } | EngineError::Irreversible { .. }
    ) {
        EXIT_DATA_LOSS
    } else if err.is_verification() {
        EXIT_VERIFICATION
    } else {
        1
    }
}

fn exit_for(err: &EngineError) -> ExitCode {
    ExitCode::from(exit_status(err))
}

/// How a failed command ends: the error on stderr, or with `-o json` one document on stdout,
/// `{"error": {"exit": N, "message": "..."}}`. A stdout closed by its reader (`| head`) ends
/// the command quietly, with success.
pub fn fail(output: Output, err: &anyhow::Error) -> ExitCode {
    if fleetsync_common::cli::is_closed_pipe(err.as_ref()) {
        return ExitCode::SUCCESS;
    }
    let exit = match (
        err.downcast_ref::<EngineError>(),
        err.downcast_ref::<crate::grants::GrantError>(),
    ) {
        (Some(err), _) => exit_status(err),
        (None, Some(crate::grants::GrantError::Database { .. })) | (None, None) => 1,
        (None, Some(_)) => EXIT_USAGE,
    };
    let message = format!("{err:#}");
    match output {
        Output::Json => {
            // Nothing else to do if even this cannot be written.
            let _ = out!("{:#}", json!({"error": {"exit": exit, "message": message}}));
        }
        Output::Human => eprintln!("error: {message}"),
    }
    ExitCode::from(exit)
}

fn print_json(value: &Value) -> std::io::Result<()> {
    out!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialise")
    )
}

fn time(ms: Option<i64>) -> String {
    ms.and_then(|ms| u64::try_from(ms).ok())
        .map(|ms| {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        })
        .unwrap_or_default()
}

/// `migrator status`.
pub async fn status(db: Db, args: &ReadArgs) -> anyhow::Result<ExitCode> {
    let engine = Engine::new(db, Options::default());
    let status = engine.status().await?;
    match args.output {
        Output::Json => print_json(&status_json(&status))?,
        Output::Human => print_status(&status)?,
    }
    Ok(if status.unknown_versions.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_VERIFICATION)
    })
}

fn status_json(status: &Status) -> Value {
    json!({
        "backend": status.backend.as_str(),
        "current_version": status.current_version,
        "latest_version": status.latest_version,
        "unknown_versions": status.unknown_versions,
        "pending_sync_requests": status.pending_sync_requests,
        "agents": status.agents.iter().map(agent_json).collect::<Vec<_>>(),
        "rollbacks": status.rollbacks.iter().map(rollback_json).collect::<Vec<_>>(),
        "migrations": status.migrations.iter().map(|m| {
            let h = m.history.as_ref();
            json!({
                "version": m.migration.version,
                "name": m.migration.name,
                "state": m.state.as_str(),
                "checksum": m.migration.checksum,
                "applied_checksum": h.map(|h| h.checksum.clone()),
                "statements_applied": h.map_or(0, |h| h.statements_applied),
                "statements_total": m.migration.statements.len(),
                "resync": m.migration.resync.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                "started_at": h.and_then(|h| h.started_at),
                "finished_at": h.and_then(|h| h.finished_at),
                "duration_ms": h.and_then(|h| h.duration_ms),
                "installed_by": h.map(|h| h.installed_by.clone()),
                "error": h.and_then(|h| h.error.clone()),
                "failing_statement": h.and_then(|h| h.failing_statement.clone()),
                "last_rollback": m.rolled_back.as_ref().map(rollback_json),
            })
        }).collect::<Vec<_>>(),
    })
}

fn rollback_json(r: &Rollback) -> Value {
    json!({
        "version": r.version, "name": r.name, "state": r.state.as_str(),
        "statements_done": r.statements_done, "statements_total": r.statements_total,
        "from_version": r.from_version, "to_version": r.to_version,
        "started_at": r.started_at, "finished_at": r.finished_at,
        "rolled_back_by": r.rolled_back_by, "error": r.error,
        "withdrawn_request": r.withdrawn_request,
    })
}

/// The latest roll-backs, one line each (the whole record is in `-o json`).
fn print_rollbacks(rollbacks: &[Rollback]) -> std::io::Result<()> {
    const SHOWN: usize = 10;
    if rollbacks.is_empty() {
        return Ok(());
    }
    out!(
        "roll-backs: {} (latest {} shown)",
        rollbacks.len(),
        rollbacks.len().min(SHOWN)
    )?;
    for r in rollbacks.iter().rev().take(SHOWN) {
        let what = match r.state {
            RollbackState::Reverted => format!("rolled back at {}", time(r.finished_at)),
            RollbackState::Reverting => format!(
                "INTERRUPTED after {}/{} reverse statements{} (migrate finishes it)",
                r.statements_done,
                r.statements_total,
                r.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        };
        out!(
            "  {} {}: {what} by {} (from {} to {}){}",
            r.version,
            r.name,
            r.rolled_back_by,
            r.from_version,
            r.to_version,
            r.withdrawn_request
                .as_deref()
                .map(|id| format!("; withdrew {id}"))
                .unwrap_or_default()
        )?;
    }
    Ok(())
}

fn print_status(status: &Status) -> std::io::Result<()> {
    out!(
        "backend {}: at version {} of {}",
        status.backend,
        status.current_version,
        status.latest_version
    )?;
    out!("{:<16} {:<8} {:<40} APPLIED", "VERSION", "STATE", "NAME")?;
    for m in &status.migrations {
        let h = m.history.as_ref();
        let when = match h {
            Some(h) if m.state == crate::engine::State::Applied => format!(
                "{} ({} ms)",
                time(h.finished_at),
                h.duration_ms.unwrap_or_default()
            ),
            Some(h) => format!(
                "{}/{} statements{}",
                h.statements_applied,
                m.migration.statements.len(),
                h.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
            None => match &m.rolled_back {
                Some(r) => format!(
                    "(rolled back {} by {})",
                    time(r.finished_at),
                    r.rolled_back_by
                ),
                None => String::new(),
            },
        };
        out!(
            "{:<16} {:<8} {:<40} {}",
            m.migration.version,
            m.state.as_str(),
            m.migration.name,
            when
        )?;
    }
    for version in &status.unknown_versions {
        out!("{version:<16} unknown  (recorded in the database, not in this binary)")?;
    }
    out!("pending sync requests: {}", status.pending_sync_requests)?;
    print_rollbacks(&status.rollbacks)?;
    print_agents(&status.agents)
}

fn agent_json(a: &LiveAgent) -> Value {
    json!({
        "id": a.id, "host": a.host, "version": a.version, "zone": a.zone, "state": a.state.as_str(),
        "schema_min": a.schema_min, "schema_max": a.schema_max,
    })
}

/// The live agents, one line each.
fn print_agents(agents: &[LiveAgent]) -> std::io::Result<()> {
    if agents.is_empty() {
        return out!("live sync-agents: none");
    }
    out!("live sync-agents: {}", agents.len())?;
    for a in agents {
        out!("  {a}")?;
    }
    Ok(())
}

/// `migrator plan`.
pub async fn plan(db: Db, args: &PlanArgs) -> anyhow::Result<ExitCode> {
    let engine = Engine::new(db, Options::default());
    let plan = engine.plan(args.target).await?;
    let planned = &plan.migrations;
    match args.read.output {
        Output::Json => print_json(&json!({
            "migrations": planned.iter().map(|p| json!({
                "version": p.version,
                "name": p.name,
                "direction": if p.reverse { "down" } else { "up" },
                "transactional": p.transactional,
                "statements": p.statements,
                "resync": p.resync.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                "stops_agents": p.stops_agents,
                "stops": p.stops.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
                "losses": p.losses.iter().map(crate::engine::Loss::json).collect::<Vec<_>>(),
                "irreversible": p.irreversible,
            })).collect::<Vec<_>>(),
            "agents": plan.agents.iter().map(agent_json).collect::<Vec<_>>(),
        }))?,
        Output::Human => {
            let live = plan.agents.len();
            out!("-- live sync-agents: {live}")?;
            for a in &plan.agents {
                out!("--   {a}")?;
            }
            if planned.is_empty() {
                out!("-- nothing to migrate")?;
            }
            for p in planned {
                if p.reverse {
                    print_reverse(p)?;
                    continue;
                }
                out!("-- {} {}", p.version, p.name)?;
                if !p.resync.is_empty() {
                    let scopes: Vec<&str> = p.resync.iter().map(|s| s.as_str()).collect();
                    out!("-- then re-sync: {}", scopes.join(", "))?;
                }
                if p.stops_agents {
                    out!(
                        "-- stops sync-agents built before it: {} of the {live} live agent(s){}",
                        p.stops.len(),
                        if p.stops.is_empty() { "" } else { ":" }
                    )?;
                    for a in &p.stops {
                        out!("--   {}", a.id)?;
                    }
                }
                print_statements(p)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One reverse of the way down in `plan`: its SQL, what it destroys, the agents it stops.
fn print_reverse(p: &crate::engine::Planned) -> std::io::Result<()> {
    out!("-- roll back {} {}", p.version, p.name)?;
    if let Some(reason) = &p.irreversible {
        out!("-- IRREVERSIBLE: {reason}; migrate refuses to go below it")?;
        return out!();
    }
    if !p.stops.is_empty() {
        out!(
            "-- the target is below the schema range of {} live agent(s); they stand down:",
            p.stops.len()
        )?;
        for a in &p.stops {
            out!("--   {}", a.id)?;
        }
    }
    if p.losses.is_empty() {
        out!("-- destroys no data")?;
    } else {
        out!("-- DESTROYS (migrate needs --allow-data-loss):")?;
        for loss in &p.losses {
            out!("--   {loss}")?;
        }
    }
    print_statements(p)
}

/// A planned migration's SQL as it will run.
fn print_statements(p: &crate::engine::Planned) -> std::io::Result<()> {
    if p.transactional {
        out!("BEGIN;")?;
    }
    for statement in &p.statements {
        out!("{statement};")?;
    }
    if p.transactional {
        out!("COMMIT;")?;
    }
    out!()
}

/// `migrator verify`.
pub async fn verify(db: Db, args: &ReadArgs) -> anyhow::Result<ExitCode> {
    let engine = Engine::new(db, Options::default());
    let problems = engine.verify().await?;
    match args.output {
        Output::Json => print_json(&json!({
            "ok": problems.is_empty(),
            "problems": problems.iter().map(|p| json!({"version": p.version, "problem": p.problem})).collect::<Vec<_>>(),
        }))?,
        Output::Human if problems.is_empty() => {
            out!("ok: every applied migration matches this binary")?
        }
        Output::Human => {
            for p in &problems {
                out!("{}: {}", p.version, p.problem)?;
            }
        }
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_VERIFICATION)
    })
}

/// `migrator migrate`.
pub async fn migrate(db: Db, args: &MigrateArgs) -> anyhow::Result<ExitCode> {
    let human = args.read.output == Output::Human;
    // A role that cannot be granted is refused before anything is written.
    if let Some(role) = &args.agent_role {
        crate::grants::statements(db.backend(), role)?;
    }
    let options = Options {
        lock_timeout: args.lock_timeout.into(),
        stop_agents: args.stop_agents,
        allow_data_loss: args.allow_data_loss,
        #[cfg(feature = "crash-points")]
        crash_at: args.crash_at.clone(),
        ..Options::default()
    };
    let engine = Engine::new(db.clone(), options);
    let mut events = Vec::new();
    let result = engine
        .migrate(args.target, &mut |event| {
            if human {
                // A closed stdout does not stop a migration that is under way.
                let _ = print_event(&event);
            }
            events.push(event);
        })
        .await;
    // The agent's rights, once the tables are there (a failure here fails the command).
    let granted = match (&result, &args.agent_role) {
        (Ok(_), Some(role)) => Some(crate::grants::grant_agent(&db, role).await.map(|_| role)),
        _ => None,
    };

    // Whatever happened, requests that did commit are handed over (best effort).
    // Like every other hand-over problem, an unreadable token or CA file is a warning: the
    // migration stands, and the requests wait in the outbox for the agent to take them.
    let credentials = || -> anyhow::Result<(Option<String>, Option<Vec<u8>>)> {
        let token = args
            .agent_token_file
            .as_deref()
            .map(fleetsync_common::grpc::read_token)
            .transpose()?;
        let ca_pem = match &args.agent_ca {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|err| anyhow::anyhow!("cannot read {}: {err}", path.display()))?,
            ),
            None => None,
        };
        Ok((token, ca_pem))
    };
    let dispatches = if args.no_dispatch {
        Vec::new()
    } else {
        match credentials() {
            Err(err) => {
                eprintln!(
                    "warning: not contacting the sync-agent ({err:#}); the sync requests wait \
                     in the database for the agent to take them"
                );
                Vec::new()
            }
            Ok((token, ca_pem)) => {
                let agent = AgentTarget {
                    url: args.agent_url.clone(),
                    timeout: args.agent_timeout.into(),
                    token,
                    ca_pem,
                };
                match dispatch_pending(&db, &agent).await {
                    Ok(dispatches) => dispatches,
                    Err(err) => {
                        eprintln!("warning: could not read the sync requests to hand over: {err}");
                        Vec::new()
                    }
                }
            }
        }
    };
    if human {
        match &result {
            Ok(report) if report.applied.is_empty() && report.rolled_back.is_empty() => {
                out!(
                    "nothing to migrate: the database is at version {}",
                    report.current_version
                )?;
            }
            Ok(report) if report.rolled_back.is_empty() => out!(
                "done: {} migration(s) applied, the database is at version {}",
                report.applied.len(),
                report.current_version
            )?,
            Ok(report) => out!(
                "done: {} migration(s) rolled back, {} applied, the database is at version {}",
                report.rolled_back.len(),
                report.applied.len(),
                report.current_version
            )?,
            Err(err) => eprintln!("error: {err}"),
        }
        match &granted {
            Some(Ok(role)) => out!("granted the sync-agent's rights to {role}")?,
            Some(Err(err)) => eprintln!("error: {err}"),
            None => {}
        }
        for d in &dispatches {
            match &d.result {
                Ok(job) => out!(
                    "sync request {} handed to the sync-agent: job {job}",
                    d.request_id
                )?,
                Err(why) => eprintln!(
                    "warning: sync request {} stays pending ({why}); the sync-agent takes it when it runs",
                    d.request_id
                ),
            }
        }
    } else {
        print_json(&json!({
            "success": result.is_ok(),
            "error": result.as_ref().err().map(ToString::to_string),
            "applied": result.as_ref().map(|r| r.applied.clone()).unwrap_or_default(),
            "rolled_back": result.as_ref().map(|r| r.rolled_back.clone()).unwrap_or_default(),
            "withdrawn": result.as_ref().map(|r| r.withdrawn.clone()).unwrap_or_default(),
            "current_version": result.as_ref().map(|r| r.current_version).ok(),
            "sync_requests": result.as_ref().map(|r| r.sync_requests.clone()).unwrap_or_default(),
            "events": events.iter().map(event_json).collect::<Vec<_>>(),
            "agent_role": granted.as_ref().map(|g| json!({
                "granted": g.is_ok(),
                "error": g.as_ref().err().map(ToString::to_string),
            })),
            "dispatch": dispatches.iter().map(|d| json!({
                "request_id": d.request_id,
                "job_id": d.result.as_ref().ok(),
                "error": d.result.as_ref().err(),
            })).collect::<Vec<_>>(),
        }))?;
    }
    Ok(match (&result, &granted) {
        (Err(err), _) => exit_for(err),
        (Ok(_), Some(Err(crate::grants::GrantError::Database { .. }))) => ExitCode::FAILURE,
        (Ok(_), Some(Err(_))) => ExitCode::from(EXIT_USAGE),
        (Ok(_), _) => ExitCode::SUCCESS,
    })
}

fn print_event(event: &Event) -> std::io::Result<()> {
    match event {
        Event::Started {
            version,
            name,
            statements,
        } => out!("applying {version} {name} ({statements} statement(s))")?,
        Event::Applied {
            version,
            duration,
            sync_request,
        } => {
            let ms = duration.as_millis();
            match sync_request {
                Some(id) => out!("  applied {version} in {ms} ms; recorded sync request {id}")?,
                None => out!("  applied {version} in {ms} ms")?,
            }
        }
        Event::RollingBack {
            version,
            name,
            statements,
        } => out!("rolling back {version} {name} ({statements} reverse statement(s))")?,
        Event::RolledBack {
            version,
            duration,
            withdrawn,
        } => {
            let ms = duration.as_millis();
            match withdrawn {
                Some(id) => out!(
                    "  rolled back {version} in {ms} ms; withdrew sync request {id} (no agent had taken it)"
                )?,
                None => out!("  rolled back {version} in {ms} ms")?,
            }
        }
        Event::Failed { version, .. } => out!("  {version} failed")?,
    }
    Ok(())
}

fn event_json(event: &Event) -> Value {
    match event {
        Event::Started {
            version,
            name,
            statements,
        } => {
            json!({"event": "started", "version": version, "name": name, "statements": statements})
        }
        Event::Applied {
            version,
            duration,
            sync_request,
        } => {
            json!({"event": "applied", "version": version, "duration_ms": duration.as_millis() as u64, "sync_request": sync_request})
        }
        Event::RollingBack {
            version,
            name,
            statements,
        } => {
            json!({"event": "rolling_back", "version": version, "name": name, "statements": statements})
        }
        Event::RolledBack {
            version,
            duration,
            withdrawn,
        } => {
            json!({"event": "rolled_back", "version": version, "duration_ms": duration.as_millis() as u64, "withdrawn": withdrawn})
        }
        Event::Failed {
            version,
            duration,
            error,
            statement,
        } => {
            json!({"event": "failed", "version": version, "duration_ms": duration.as_millis() as u64, "error": error, "statement": statement})
        }
    }
}
