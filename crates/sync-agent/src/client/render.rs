//! How the operator commands print: human tables (server text escaped so that it cannot drive
//! the terminal) or JSON for scripts.

use std::collections::BTreeMap;

use fleetsync_common::proto::sync::v1 as pb;
use serde_json::{Value, json};

use super::exit::out;
use crate::config::Output;

pub(super) fn short(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_owned()
}

pub(super) fn outcome_name(o: &pb::ServerOutcome) -> String {
    let name = short(o.outcome().as_str_name(), "OUTCOME_");
    match o.cause() {
        pb::UnreachableCause::Unspecified => name,
        cause => format!(
            "{name} ({})",
            short(cause.as_str_name(), "UNREACHABLE_CAUSE_").to_lowercase()
        ),
    }
}

pub(super) fn millis(d: Option<&prost_types::Duration>) -> u64 {
    d.map_or(0, |d| {
        d.seconds.max(0) as u64 * 1000 + (d.nanos.max(0) as u64) / 1_000_000
    })
}

pub(super) fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.map(|t| crate::format_ms(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000))
        .unwrap_or_default()
}

pub(super) fn outcome_json(o: &pb::ServerOutcome) -> Value {
    json!({
        "server_id": o.server_id,
        "server": o.server_name,
        "outcome": short(o.outcome().as_str_name(), "OUTCOME_"),
        "cause": (o.cause() != pb::UnreachableCause::Unspecified)
            .then(|| short(o.cause().as_str_name(), "UNREACHABLE_CAUSE_")),
        "message": o.message,
        "exit_status": (o.outcome() == pb::Outcome::CommandFailed).then_some(o.exit_status),
        "duration_ms": millis(o.duration.as_ref()),
        "next_probe_at": o.next_probe_at.as_ref().map(|t| time(Some(t))),
        "counts": o.counts.map(|c| json!({
            "databases_added": c.databases_added, "databases_updated": c.databases_updated,
            "databases_gone": c.databases_gone, "users_added": c.users_added,
            "users_updated": c.users_updated, "users_gone": c.users_gone, "charsets": c.charsets,
        })),
    })
}

pub(super) fn summary_json(s: &pb::JobSummary) -> Value {
    json!({
        "job_id": s.job_id,
        "request_id": s.request_id,
        "origin": short(s.origin().as_str_name(), "JOB_ORIGIN_").to_lowercase(),
        "state": short(s.state().as_str_name(), "JOB_STATE_").to_lowercase(),
        "total": s.total,
        "finished": s.finished,
        "outcomes": s.outcome_counts.iter().map(|c| (short(c.outcome().as_str_name(), "OUTCOME_"), c.count)).collect::<BTreeMap<_, _>>(),
        "created_at": time(s.created_at.as_ref()),
        "finished_at": s.finished_at.as_ref().map(|t| time(Some(t))),
        "duration_ms": s.duration.as_ref().map(|d| millis(Some(d))),
    })
}

/// Text that came from a managed server (a message with its stderr, a banner) or from a caller
/// (a server name), made safe for a terminal: control characters (escape sequences, carriage
/// returns, newlines) are shown escaped, never interpreted. JSON output stays exact.
pub(super) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

pub(super) fn print_outcomes(outcomes: &[pb::ServerOutcome]) -> std::io::Result<()> {
    let width = outcomes
        .iter()
        .map(|o| o.server_name.chars().count())
        .max()
        .unwrap_or(6)
        .max(6);
    out!(
        "{:<width$}  {:<30} {:>8}  DETAIL",
        "SERVER",
        "OUTCOME",
        "TIME"
    )?;
    for o in outcomes {
        let detail = match o.outcome() {
            pb::Outcome::Ok => o
                .counts
                .map(|c| {
                    format!(
                        "{}; databases +{} ~{} -{}, users +{} ~{} -{}",
                        o.message,
                        c.databases_added,
                        c.databases_updated,
                        c.databases_gone,
                        c.users_added,
                        c.users_updated,
                        c.users_gone
                    )
                })
                .unwrap_or_else(|| o.message.clone()),
            _ => o.message.replace('\n', " "),
        };
        out!(
            "{:<width$}  {:<30} {:>6}ms  {}",
            printable(&o.server_name),
            outcome_name(o),
            millis(o.duration.as_ref()),
            printable(&detail)
        )?;
    }
    Ok(())
}

pub(super) fn print_summary(s: &pb::JobSummary) -> std::io::Result<()> {
    let counts: Vec<String> = s
        .outcome_counts
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c.count,
                short(c.outcome().as_str_name(), "OUTCOME_")
            )
        })
        .collect();
    out!(
        "job {}: {} of {} server(s) finished in {} ms: {}",
        s.job_id,
        s.finished,
        s.total,
        s.duration.as_ref().map_or(0, |d| millis(Some(d))),
        if counts.is_empty() {
            "nothing to do".into()
        } else {
            counts.join(", ")
        }
    )
}

pub(super) fn report(
    outcomes: &[pb::ServerOutcome],
    summary: Option<&pb::JobSummary>,
    output: Output,
) -> std::io::Result<()> {
    match output {
        Output::Json => out!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "job": summary.map(summary_json),
                "outcomes": outcomes.iter().map(outcome_json).collect::<Vec<_>>(),
            }))
            .expect("JSON")
        ),
        Output::Human => {
            print_outcomes(outcomes)?;
            match summary {
                Some(s) => print_summary(s),
                None => Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_text_cannot_drive_the_terminal() {
        assert_eq!(printable("db-1 ok ü"), "db-1 ok ü");
        assert_eq!(
            printable("\u{1b}]0;owned\u{7}\u{1b}[2Jx\r\n"),
            "\\u{1b}]0;owned\\u{7}\\u{1b}[2Jx\\r\\n"
        );
    }
}
