//! `sync-agent agents`: the registry as a table or JSON, and `agents resume ID`.

use fleetsync_common::proto::sync::v1 as pb;
use serde_json::{Value, json};

use super::{
    Exit, Failure, connect,
    exit::out,
    render::{printable, short, time},
};
use crate::config::{AgentsArgs, Output};

/// `sync-agent agents`: the registry, oldest agent first.
pub async fn agents(args: &AgentsArgs) -> Result<Exit, Failure> {
    let agent = connect(&args.agent).await?;
    let mut client = agent.sync.clone();
    if let Some(crate::config::AgentsAction::Resume { id }) = &args.action {
        let resumed = agent
            .answer(client.resume_agent(pb::ResumeAgentRequest { id: id.clone() }))
            .await?;
        if args.agent.output == Output::Json {
            out!(
                "{}",
                json!({"id": id, "resume_requested": true, "reason": resumed.agent.map(|a| a.reason)})
            )?;
        } else {
            out!(
                "asked agent {} to serve again; it acts at its next heartbeat",
                printable(id)
            )?;
        }
        return Ok(Exit::Ok);
    }
    let agents = agent
        .answer(client.list_agents(pb::ListAgentsRequest {}))
        .await?
        .agents;
    if args.agent.output == Output::Json {
        let list: Vec<Value> = agents
            .iter()
            .map(|a| {
                json!({
                    "id": a.id, "host": a.host, "version": a.version,
                    "schema_version": a.schema_version,
                    "schema_max": (a.schema_max != 0).then_some(a.schema_max),
                    "key_fingerprints": a.key_fingerprints,
                    "zone": a.zone,
                    "state": short(a.state().as_str_name(), "AGENT_STATE_").to_lowercase(),
                    "reason": a.reason,
                    "started_at": time(a.started_at.as_ref()),
                    "heartbeat_at": time(a.heartbeat_at.as_ref()),
                    "leases": a.leases, "runs_in_flight": a.runs_in_flight,
                    "outcomes": a.outcomes.iter()
                        .map(|(o, n)| (short(o, "OUTCOME_"), *n))
                        .collect::<std::collections::BTreeMap<_, _>>(),
                    "second_opinions": {
                        "asked": a.second_opinions_asked,
                        "overruled": a.overruled,
                        "confirmed": a.confirmed,
                    },
                })
            })
            .collect();
        out!("{}", serde_json::to_string_pretty(&list).expect("JSON"))?;
        return Ok(Exit::Ok);
    }
    out!(
        "{:<36}  {:<11} {:<10} {:<8} {:<20}  {:>6} {:>9}  {:<14}  OUTCOMES",
        "AGENT",
        "STATE",
        "ZONE",
        "VERSION",
        "HEARTBEAT",
        "LEASES",
        "IN FLIGHT",
        "ASKED/OVR/CNF"
    )?;
    for a in &agents {
        let mut outcomes: Vec<(&String, &u64)> = a.outcomes.iter().collect();
        outcomes.sort_by(|x, y| y.1.cmp(x.1).then(x.0.cmp(y.0)));
        let outcomes: Vec<String> = outcomes
            .iter()
            .map(|(o, n)| format!("{} {n}", short(o, "OUTCOME_")))
            .collect();
        out!(
            "{:<36}  {:<11} {:<10} {:<8} {:<20}  {:>6} {:>9}  {:<14}  {}",
            printable(&a.id),
            short(a.state().as_str_name(), "AGENT_STATE_").to_lowercase(),
            if a.zone.is_empty() {
                "-"
            } else {
                a.zone.as_str()
            },
            printable(&a.version),
            time(a.heartbeat_at.as_ref()),
            a.leases,
            a.runs_in_flight,
            format!(
                "{}/{}/{}",
                a.second_opinions_asked, a.overruled, a.confirmed
            ),
            outcomes.join(", ")
        )?;
        if !a.reason.is_empty() {
            out!("    {}", printable(&a.reason))?;
        }
    }
    out!("{} agent(s)", agents.len())?;
    Ok(Exit::Ok)
}
