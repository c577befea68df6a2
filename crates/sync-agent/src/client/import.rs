//! `sync-agent servers import FILE`: JSON lines or CSV read on a thread of its own, sent to
//! `Fleet/ImportServers` in batches with several calls in flight, each bad line reported with
//! its number, and a progress bar on a terminal.

use std::{
    collections::HashSet,
    fs::File,
    io::{self, BufRead, BufReader, Read},
    path::Path,
    time::Instant,
};

use anyhow::Context;
use fleetsync_common::proto::sync::v1 as pb;
use futures_util::{StreamExt, stream::FuturesUnordered};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{Agent, Exit, Failure, exit::out, render::printable};
use crate::config::{ImportArgs, ImportFormat, Output};

/// A line that is not a spec: its number, the field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// 1-based line number in the file.
    pub line: u64,
    /// The field at fault, empty when the line as a whole is.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

/// What the reader hands over: specs to send with their line numbers, and the bad lines among
/// them, up to the file position reached.
#[derive(Debug, Default)]
struct Batch {
    specs: Vec<pb::ServerSpec>,
    lines: Vec<u64>,
    bad: Vec<BadLine>,
    offset: u64,
}

/// A call stays below this size (the agent accepts 4 MiB messages).
const MAX_BATCH_BYTES: usize = 3 << 20;

/// `sync-agent servers import FILE`.
pub(super) async fn import(
    agent: &Agent,
    args: &ImportArgs,
    output: Output,
) -> Result<Exit, Failure> {
    let started = Instant::now();
    let (mut input, size) = open(&args.file)?;
    input
        .fill_buf()
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let format = format_of(&args.file, args.format, &input)?;
    let (batches, mut received) = mpsc::channel::<Result<Batch, String>>(4);
    let batch = args.batch as usize;
    let reader = std::thread::spawn(move || read(input, format, batch, &batches));

    let bar = match size {
        Some(bytes) => ProgressBar::new(bytes).with_style(
            ProgressStyle::with_template("{spinner} [{bar:30}] {percent}% {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner(),
    };
    if output == Output::Json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(120));

    let mut totals = Totals::default();
    let mut in_flight = FuturesUnordered::new();
    let mut names_in_flight: HashSet<String> = HashSet::new();
    let parallel = args.parallel as usize;
    let mut failure = None;
    while let Some(batch) = received.recv().await {
        let batch = match batch {
            Ok(batch) => batch,
            Err(message) => {
                failure = Some(Failure::new(Exit::Usage, message));
                break;
            }
        };
        for bad in &batch.bad {
            totals.reject(bad.clone(), output, &bar);
        }
        // A name already travelling waits for it: the later line must win.
        let names: Vec<String> = batch.specs.iter().map(|s| s.name.clone()).collect();
        let overlaps = names.iter().any(|n| names_in_flight.contains(n));
        while !in_flight.is_empty() && (overlaps || in_flight.len() >= parallel) {
            let done = in_flight.next().await.expect("not empty");
            if let Err(err) = finish(done, &mut totals, &mut names_in_flight, output, &bar) {
                failure = Some(err);
                break;
            }
        }
        if failure.is_some() {
            break;
        }
        if batch.specs.is_empty() {
            bar.set_position(batch.offset);
            continue;
        }
        names_in_flight.extend(names.iter().cloned());
        let mut fleet = agent.fleet.clone();
        let Batch {
            specs,
            lines,
            offset,
            ..
        } = batch;
        in_flight.push(async move {
            let answer = agent
                .answer(fleet.import_servers(pb::ImportServersRequest { servers: specs }))
                .await;
            Sent {
                answer,
                lines,
                names,
                offset,
            }
        });
    }
    while failure.is_none()
        && let Some(done) = in_flight.next().await
    {
        if let Err(err) = finish(done, &mut totals, &mut names_in_flight, output, &bar) {
            failure = Some(err);
        }
    }
    bar.finish_and_clear();
    if let Some(failure) = failure {
        drop(received);
        let _ = reader.join();
        return Err(Failure::new(
            failure.exit,
            format!(
                "{}; {} server(s) stored before that (running the import again is safe)",
                failure.message,
                totals.stored()
            ),
        ));
    }
    reader
        .join()
        .map_err(|_| Failure::new(Exit::Usage, "the file reader failed"))?;

    let elapsed = started.elapsed();
    let rate = totals.stored() as f64 / elapsed.as_secs_f64().max(1e-3);
    match output {
        Output::Json => out!(
            "{:#}",
            json!({
                "created": totals.created, "updated": totals.updated,
                "unchanged": totals.unchanged,
                "rejected": totals.sorted_rejections().iter().map(|b| json!({
                    "line": b.line, "field": b.field, "reason": b.reason,
                })).collect::<Vec<_>>(),
                "seconds": elapsed.as_secs_f64(),
            })
        )?,
        Output::Human => out!(
            "{} server(s) in {:.1}s ({rate:.0}/s): {} created, {} updated, {} unchanged, {} rejected",
            totals.stored() + totals.rejected.len() as u64,
            elapsed.as_secs_f64(),
            totals.created,
            totals.updated,
            totals.unchanged,
            totals.rejected.len()
        )?,
    }
    Ok(if totals.rejected.is_empty() {
        Exit::Ok
    } else {
        Exit::NotOk
    })
}

/// A call's answer with what it carried.
struct Sent {
    answer: Result<pb::ImportServersResponse, Failure>,
    lines: Vec<u64>,
    names: Vec<String>,
    offset: u64,
}

#[derive(Debug, Default)]
struct Totals {
    created: u64,
    updated: u64,
    unchanged: u64,
    rejected: Vec<BadLine>,
}

impl Totals {
    /// The bad lines in file order (calls answer in any order).
    fn sorted_rejections(&mut self) -> &[BadLine] {
        self.rejected.sort_by_key(|b| b.line);
        &self.rejected
    }

    fn stored(&self) -> u64 {
        self.created + self.updated + self.unchanged
    }

    /// Counts a bad line and says so at once on a terminal's stderr (JSON lists them at the end).
    fn reject(&mut self, bad: BadLine, output: Output, bar: &ProgressBar) {
        if output == Output::Human {
            bar.suspend(|| {
                let field = if bad.field.is_empty() {
                    String::new()
                } else {
                    format!("{}: ", bad.field)
                };
                eprintln!("line {}: {field}{}", bad.line, printable(&bad.reason));
            });
        }
        self.rejected.push(bad);
    }
}

fn finish(
    sent: Sent,
    totals: &mut Totals,
    names_in_flight: &mut HashSet<String>,
    output: Output,
    bar: &ProgressBar,
) -> Result<(), Failure> {
    for name in &sent.names {
        names_in_flight.remove(name);
    }
    let answer = sent.answer?;
    totals.created += u64::from(answer.created);
    totals.updated += u64::from(answer.updated);
    totals.unchanged += u64::from(answer.unchanged);
    for rejected in answer.rejected {
        let line = sent
            .lines
            .get(rejected.index as usize)
            .copied()
            .unwrap_or_default();
        totals.reject(
            BadLine {
                line,
                field: rejected.field,
                reason: rejected.reason,
            },
            output,
            bar,
        );
    }
    bar.set_position(bar.position().max(sent.offset));
    bar.set_message(format!("{} servers", totals.stored()));
    Ok(())
}

/// What an import reads: a file or stdin, buffered.
type Input = BufReader<Box<dyn Read + Send>>;

/// The file (or stdin) and its size when it is a regular file.
fn open(path: &Path) -> Result<(Input, Option<u64>), Failure> {
    if path == Path::new("-") {
        return Ok((BufReader::new(Box::new(io::stdin())), None));
    }
    let file = File::open(path)
        .with_context(|| format!("cannot open {}", path.display()))
        .map_err(Failure::from)?;
    let size = file
        .metadata()
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    Ok((BufReader::with_capacity(1 << 16, Box::new(file)), size))
}

/// The format asked for, or the one the name or the first character says.
fn format_of(path: &Path, asked: ImportFormat, input: &Input) -> Result<ImportFormat, Failure> {
    if asked != ImportFormat::Auto {
        return Ok(asked);
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => return Ok(ImportFormat::Csv),
        Some("jsonl" | "ndjson" | "json") => return Ok(ImportFormat::Jsonl),
        _ => {}
    }
    // What is buffered already; a file or pipe that starts with a JSON object is JSON lines.
    let first = input
        .buffer()
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .copied();
    Ok(if first == Some(b'{') {
        ImportFormat::Jsonl
    } else {
        ImportFormat::Csv
    })
}

/// Reads the input into batches of at most `batch` specs, until the end or until the receiver
/// goes away. A read error ends it with a message.
fn read(
    input: Input,
    format: ImportFormat,
    batch: usize,
    out: &mpsc::Sender<Result<Batch, String>>,
) {
    let mut current = Batch::default();
    let mut bytes = 0;
    let mut push = |item: Result<(u64, pb::ServerSpec), BadLine>, offset: u64| -> bool {
        match item {
            Ok((line, spec)) => {
                bytes += spec_size(&spec);
                current.specs.push(spec);
                current.lines.push(line);
            }
            Err(bad) => current.bad.push(bad),
        }
        current.offset = offset;
        if current.specs.len() >= batch || bytes >= MAX_BATCH_BYTES || current.bad.len() >= batch {
            bytes = 0;
            return out.blocking_send(Ok(std::mem::take(&mut current))).is_ok();
        }
        true
    };
    let ended = match format {
        ImportFormat::Csv => read_csv(input, &mut push),
        _ => read_jsonl(input, &mut push),
    };
    match ended {
        Ok(()) => {
            let _ = out.blocking_send(Ok(current));
        }
        Err(err) => {
            let _ = out.blocking_send(Err(err));
        }
    }
}

/// About what a spec weighs on the wire.
fn spec_size(spec: &pb::ServerSpec) -> usize {
    spec.name.len()
        + spec.ip.len()
        + spec.ssh_user.len()
        + spec.database_version.len()
        + spec.host_key.len()
        + spec.zone.len()
        + 24
}

type Push<'a> = dyn FnMut(Result<(u64, pb::ServerSpec), BadLine>, u64) -> bool + 'a;

fn read_jsonl(mut input: impl BufRead, push: &mut Push<'_>) -> Result<(), String> {
    let mut line = Vec::new();
    let mut number = 0;
    let mut offset = 0;
    loop {
        line.clear();
        let n = input
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("cannot read line {}: {e}", number + 1))?;
        if n == 0 {
            return Ok(());
        }
        number += 1;
        offset += n as u64;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let item = spec_from_json(line.trim_ascii_end())
            .map(|spec| (number, spec))
            .map_err(|(field, reason)| BadLine {
                line: number,
                field,
                reason,
            });
        if !push(item, offset) {
            return Ok(());
        }
    }
}

fn read_csv(input: impl Read, push: &mut Push<'_>) -> Result<(), String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(input);
    let header = reader
        .headers()
        .map_err(|e| format!("cannot read the CSV header: {e}"))?
        .clone();
    let mut fields = Vec::with_capacity(header.len());
    for column in &header {
        match Field::of(column) {
            Some(field) => fields.push(field),
            None => {
                return Err(format!(
                    "column {column:?} of the CSV header is not a ServerSpec field ({})",
                    Field::NAMES
                ));
            }
        }
    }
    let mut record = csv::StringRecord::new();
    loop {
        let read = reader.read_record(&mut record);
        let line = record.position().map_or(0, |p| p.line());
        let offset = reader.position().byte();
        let item = match read {
            Ok(false) => return Ok(()),
            Ok(true) => {
                let mut spec = pb::ServerSpec::default();
                fields
                    .iter()
                    .zip(record.iter())
                    .filter(|(_, cell)| !cell.is_empty())
                    .try_for_each(|(field, cell)| field.set(&mut spec, &Value::from(cell)))
                    .map(|()| (line, spec))
                    .map_err(|(field, reason)| BadLine {
                        line,
                        field,
                        reason,
                    })
            }
            Err(err) => match err.kind() {
                csv::ErrorKind::Io(e) => return Err(format!("cannot read the file: {e}")),
                _ => Err(BadLine {
                    line: err.position().map_or(line, |p| p.line()),
                    field: String::new(),
                    reason: err.to_string(),
                }),
            },
        };
        if !push(item, offset) {
            return Ok(());
        }
    }
}

/// A spec from one JSON object in the proto3 JSON mapping: field names in camelCase or as in the
/// proto, enums by name or number, `port` a number or a string of one, `null` the default.
/// Unknown fields are errors (as in grpcurl and protobuf's own parsers).
pub fn spec_from_json(line: &[u8]) -> Result<pb::ServerSpec, (String, String)> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        // serde's message ends with the position; the line is ours, the column its.
        let message = e.to_string();
        let message = message
            .rsplit_once(" at line ")
            .map_or(message.as_str(), |(m, _)| m);
        (
            String::new(),
            format!("not valid JSON: {message} (column {})", e.column()),
        )
    })?;
    let Value::Object(object) = value else {
        return Err((String::new(), "not a JSON object".into()));
    };
    let mut spec = pb::ServerSpec::default();
    for (key, value) in &object {
        let field = Field::of(key).ok_or_else(|| {
            (
                key.clone(),
                format!("not a ServerSpec field ({})", Field::NAMES),
            )
        })?;
        if !value.is_null() {
            field.set(&mut spec, value)?;
        }
    }
    Ok(spec)
}

/// A field of `ServerSpec`, as named in JSON (camelCase or the proto's name) or a CSV header.
#[derive(Debug, Clone, Copy)]
enum Field {
    Name,
    Ip,
    Port,
    SshUser,
    DatabaseService,
    DatabaseVersion,
    Status,
    HostKey,
    Zone,
}

impl Field {
    const NAMES: &'static str =
        "name, ip, port, ssh_user, database_service, database_version, status, host_key, zone";

    fn of(key: &str) -> Option<Self> {
        Some(match key {
            "name" => Self::Name,
            "ip" => Self::Ip,
            "port" => Self::Port,
            "sshUser" | "ssh_user" => Self::SshUser,
            "databaseService" | "database_service" => Self::DatabaseService,
            "databaseVersion" | "database_version" => Self::DatabaseVersion,
            "status" => Self::Status,
            "hostKey" | "host_key" => Self::HostKey,
            "zone" => Self::Zone,
            _ => return None,
        })
    }

    fn proto_name(self) -> &'static str {
        match self {
            Self::Name => "name",
            Self::Ip => "ip",
            Self::Port => "port",
            Self::SshUser => "ssh_user",
            Self::DatabaseService => "database_service",
            Self::DatabaseVersion => "database_version",
            Self::Status => "status",
            Self::HostKey => "host_key",
            Self::Zone => "zone",
        }
    }

    fn set(self, spec: &mut pb::ServerSpec, value: &Value) -> Result<(), (String, String)> {
        let wrong = |reason: String| (self.proto_name().to_owned(), reason);
        let text = || {
            value
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| wrong(format!("must be a string, got {value}")))
        };
        match self {
            Self::Name => spec.name = text()?,
            Self::Ip => spec.ip = text()?,
            Self::SshUser => spec.ssh_user = text()?,
            Self::DatabaseVersion => spec.database_version = text()?,
            Self::HostKey => spec.host_key = text()?,
            Self::Zone => spec.zone = text()?,
            Self::Port => {
                let port = match value {
                    Value::Number(n) => n.as_u64(),
                    Value::String(s) => s.parse::<u64>().ok(),
                    _ => None,
                };
                spec.port = port
                    .and_then(|p| u32::try_from(p).ok())
                    .ok_or_else(|| wrong(format!("must be a port number, got {value}")))?;
            }
            Self::DatabaseService => {
                spec.database_service = enum_value(value, "DATABASE_SERVICE_", |name| {
                    pb::DatabaseService::from_str_name(name).map(|v| v as i32)
                })
                .ok_or_else(|| {
                    wrong(format!(
                        "must be mysql, mariadb, postgresql or none (or DATABASE_SERVICE_...), \
                         got {value}"
                    ))
                })?;
            }
            Self::Status => {
                spec.status = enum_value(value, "SERVER_STATUS_", |name| {
                    pb::ServerStatus::from_str_name(name).map(|v| v as i32)
                })
                .ok_or_else(|| {
                    wrong(format!(
                        "must be ready, installing, installation_failed, disconnected or \
                         updating (or SERVER_STATUS_...), got {value}"
                    ))
                })?;
            }
        }
        Ok(())
    }
}

/// An enum given by its proto name (`DATABASE_SERVICE_MARIADB`), its short name in any case
/// (`mariadb`), or its number.
fn enum_value(value: &Value, prefix: &str, by_name: impl Fn(&str) -> Option<i32>) -> Option<i32> {
    match value {
        Value::Number(n) => n.as_i64().and_then(|n| i32::try_from(n).ok()),
        Value::String(s) => {
            let upper = s.trim().to_ascii_uppercase();
            by_name(&upper).or_else(|| by_name(&format!("{prefix}{upper}")))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_as_grpcurl_prints_it() {
        let spec = spec_from_json(
            br#"{"name": "db-1", "ip": "10.0.0.1", "port": 2222, "sshUser": "ops",
                "databaseService": "DATABASE_SERVICE_MARIADB", "databaseVersion": "10.11",
                "status": "SERVER_STATUS_READY", "hostKey": "ssh-ed25519 AAAA"}"#,
        )
        .unwrap();
        assert_eq!(spec.name, "db-1");
        assert_eq!(spec.port, 2222);
        assert_eq!(spec.ssh_user, "ops");
        assert_eq!(spec.database_service, pb::DatabaseService::Mariadb as i32);
        assert_eq!(spec.status, pb::ServerStatus::Ready as i32);
        assert_eq!(spec.host_key, "ssh-ed25519 AAAA");
        // Proto names, numbers, a port as a string, nulls.
        let spec = spec_from_json(
            br#"{"name": "db-2", "ip": "h", "port": "22", "ssh_user": null,
                "database_service": 4, "status": "installing"}"#,
        )
        .unwrap();
        assert_eq!(spec.port, 22);
        assert_eq!(
            spec.database_service,
            pb::DatabaseService::Postgresql as i32
        );
        assert_eq!(spec.status, pb::ServerStatus::Installing as i32);
    }

    #[test]
    fn what_is_wrong_is_named() {
        let field = |line: &str| spec_from_json(line.as_bytes()).unwrap_err();
        assert_eq!(field(r#"{"name": 1}"#).0, "name");
        assert_eq!(field(r#"{"port": -1}"#).0, "port");
        assert_eq!(field(r#"{"port": 70000000000}"#).0, "port");
        assert_eq!(
            field(r#"{"databaseService": "oracle"}"#).0,
            "database_service"
        );
        assert_eq!(field(r#"{"nmae": "x"}"#).0, "nmae");
        assert_eq!(field(r#"{"name": "x""#).0, "");
        assert_eq!(field(r#"["x"]"#).0, "");
    }

    #[test]
    fn csv_rows_and_their_line_numbers() {
        let input = "name,ip,port,database_service\n\
                     db-1,10.0.0.1,22,mariadb\n\
                     \"db,2\",10.0.0.2,,POSTGRESQL\n\
                     db-3,10.0.0.3,x,mysql\n\
                     db-4,10.0.0.4\n";
        let mut items = Vec::new();
        read_csv(input.as_bytes(), &mut |item, _| {
            items.push(item);
            true
        })
        .unwrap();
        assert_eq!(items.len(), 4);
        let (line, spec) = items[0].clone().unwrap();
        assert_eq!((line, spec.name.as_str(), spec.port), (2, "db-1", 22));
        let (line, spec) = items[1].clone().unwrap();
        assert_eq!((line, spec.name.as_str(), spec.port), (3, "db,2", 0));
        assert_eq!(
            spec.database_service,
            pb::DatabaseService::Postgresql as i32
        );
        let bad = items[2].clone().unwrap_err();
        assert_eq!((bad.line, bad.field.as_str()), (4, "port"));
        let bad = items[3].clone().unwrap_err();
        assert_eq!(bad.line, 5);
        assert!(read_csv("name,address\n".as_bytes(), &mut |_, _| true).is_err());
    }
}
