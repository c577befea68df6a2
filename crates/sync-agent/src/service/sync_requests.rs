//! The `SyncAgent` requests checked field by field and put in the store's terms: a start
//! request as a new job or a join, a list request as a filter and a page. Every error names its
//! field; nothing here touches the database.

use std::collections::BTreeSet;

use fleetsync_common::{
    JobId, RequestId, ServerId, ServiceError,
    proto::sync::v1::{self as pb, ListJobsRequest, StartSyncRequest},
};

use super::fields::{free_text, optional_enum, page_size};
use crate::{
    model::{JobOrigin, JobState, Scope, Scopes},
    store::{JobFilter, NewJob, Selection},
};

/// Most server ids in one request.
pub const MAX_SERVER_IDS: usize = 10_000;

/// What a start request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// A job (or the one already made under its request id, if it is the same request).
    New(NewJob),
    /// The job already made under this request id: nothing but the id was given.
    Join(RequestId),
}

/// Validates a start request; every error names its field.
pub fn validate_start(request: StartSyncRequest) -> Result<Start, ServiceError> {
    let join = !request.request_id.is_empty()
        && request.server_ids.is_empty()
        && !request.all_servers
        && request.scopes.is_empty()
        && !request.force
        && request.reason.is_empty();
    let request_id = match request.request_id.as_str() {
        "" => RequestId::new(format!("rpc-{}", crate::new_id())),
        id => RequestId::from_request(id, "request_id")?,
    };
    if join {
        return Ok(Start::Join(request_id));
    }
    let selection = match (request.all_servers, request.server_ids.is_empty()) {
        (true, false) => {
            return Err(ServiceError::invalid(
                "server_ids",
                "give either server_ids or all_servers, not both",
            ));
        }
        (false, true) => {
            return Err(ServiceError::invalid(
                "server_ids",
                "empty selection: give server_ids or set all_servers (or only a request_id, to join its job)",
            ));
        }
        (true, true) => Selection::All,
        (false, false) => {
            if request.server_ids.len() > MAX_SERVER_IDS {
                return Err(ServiceError::invalid(
                    "server_ids",
                    format!(
                        "{} ids; at most {MAX_SERVER_IDS} per request (use all_servers for the whole fleet)",
                        request.server_ids.len()
                    ),
                ));
            }
            let unique: BTreeSet<ServerId> = request
                .server_ids
                .iter()
                .map(|value| ServerId::from_request(*value, "server_ids"))
                .collect::<Result<_, _>>()?;
            Selection::Ids(unique.into_iter().collect())
        }
    };
    let mut scopes = Scopes::empty();
    for (i, value) in request.scopes.iter().enumerate() {
        let scope = pb::SyncScope::try_from(*value)
            .ok()
            .and_then(|s| Scope::try_from(s).ok())
            .ok_or_else(|| ServiceError::InvalidArgument {
                field: "scopes",
                reason: format!("scopes[{i}]: unknown value {value}"),
            })?;
        scopes.insert(scope);
    }
    if scopes.is_empty() {
        scopes = Scopes::ALL;
    }
    free_text(&request.reason, "reason", 1024)?;
    Ok(Start::New(NewJob {
        request_id,
        origin: JobOrigin::Rpc,
        selection,
        scopes,
        force: request.force,
        reason: request.reason,
    }))
}

/// Jobs per `ListJobs` page unless the caller says otherwise.
const DEFAULT_JOBS_PAGE: i64 = 100;
/// Most jobs per `ListJobs` page.
const MAX_JOBS_PAGE: i64 = 1000;

/// A `ListJobs` request in the store's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// Which jobs.
    pub filter: JobFilter,
    /// The keyset to continue after (created_at, id), from the page token.
    pub after: Option<(i64, JobId)>,
    /// Jobs per page.
    pub size: i64,
}

/// Validates a list request; every error names its field.
pub fn validate_list(request: &ListJobsRequest) -> Result<ListQuery, ServiceError> {
    let origin = optional_enum("origin", request.origin, |o| match o {
        pb::JobOrigin::Unspecified => None,
        pb::JobOrigin::Rpc => Some(JobOrigin::Rpc),
        pb::JobOrigin::Migration => Some(JobOrigin::Migration),
        pb::JobOrigin::Schedule => Some(JobOrigin::Schedule),
        pb::JobOrigin::Recovery => Some(JobOrigin::Recovery),
    })?;
    // CANCELLED is in the proto but no job ends so: refused as unknown.
    let state = optional_enum("state", request.state, |s| match s {
        pb::JobState::Unspecified | pb::JobState::Cancelled => None,
        pb::JobState::Pending => Some(JobState::Pending),
        pb::JobState::Running => Some(JobState::Running),
        pb::JobState::Done => Some(JobState::Done),
    })?;
    // ListJobs' server filter: 0 is none.
    let server_id = match request.server_id {
        0 => None,
        value => Some(ServerId::from_request(value, "server_id")?),
    };
    let millis = |field: &'static str, t: &Option<prost_types::Timestamp>| match t {
        None => Ok(None),
        Some(t) if t.seconds >= 0 && (0..1_000_000_000).contains(&t.nanos) => {
            Ok(Some(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000))
        }
        Some(_) => Err(ServiceError::invalid(field, "not a valid time after 1970")),
    };
    let filter = JobFilter {
        origin,
        state,
        server_id,
        created_after: millis("created_after", &request.created_after)?,
        created_before: millis("created_before", &request.created_before)?,
    };
    let size = page_size(request.page_size, DEFAULT_JOBS_PAGE, MAX_JOBS_PAGE)?;
    let after = match request.page_token.as_str() {
        "" => None,
        token => Some(
            token
                .split_once(':')
                .and_then(|(at, id)| {
                    let at = at.parse::<i64>().ok()?;
                    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
                        .then(|| (at, JobId::new(id)))
                })
                .ok_or_else(|| {
                    ServiceError::invalid("page_token", "not a token ListJobs returned")
                })?,
        ),
    };
    Ok(ListQuery {
        filter,
        after,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> StartSyncRequest {
        StartSyncRequest {
            request_id: "r1".into(),
            server_ids: vec![3, 1, 3],
            all_servers: false,
            scopes: vec![],
            force: false,
            reason: String::new(),
        }
    }

    fn new_job(request: StartSyncRequest) -> NewJob {
        match validate_start(request).unwrap() {
            Start::New(job) => job,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn validates_selection_scopes_and_sizes() {
        let job = new_job(request());
        assert_eq!(
            job.selection,
            Selection::Ids(vec![ServerId::stored(1), ServerId::stored(3)])
        );
        assert_eq!(job.scopes, Scopes::ALL);
        let generated = new_job(StartSyncRequest {
            request_id: String::new(),
            ..request()
        });
        assert!(generated.request_id.as_str().starts_with("rpc-"));

        let field = |r: StartSyncRequest| match validate_start(r).unwrap_err() {
            ServiceError::InvalidArgument { field, reason } => format!("{field}: {reason}"),
            other => panic!("{other:?}"),
        };
        assert!(
            field(StartSyncRequest {
                request_id: String::new(),
                server_ids: vec![],
                ..request()
            })
            .contains("empty selection")
        );
        // A request id alone joins the job made under it.
        assert_eq!(
            validate_start(StartSyncRequest {
                server_ids: vec![],
                ..request()
            })
            .unwrap(),
            Start::Join(RequestId::new("r1"))
        );
        assert!(
            field(StartSyncRequest {
                all_servers: true,
                ..request()
            })
            .contains("not both")
        );
        assert!(
            field(StartSyncRequest {
                server_ids: (1..=100_000).collect(),
                ..request()
            })
            .contains("at most 10000")
        );
        assert!(
            field(StartSyncRequest {
                server_ids: vec![0],
                ..request()
            })
            .contains("must be a positive server id, got 0")
        );
        assert!(
            field(StartSyncRequest {
                scopes: vec![1, 77],
                ..request()
            })
            .contains("scopes[1]: unknown value 77")
        );
        assert!(
            field(StartSyncRequest {
                scopes: vec![0],
                ..request()
            })
            .contains("scopes[0]")
        );
        assert!(
            field(StartSyncRequest {
                request_id: "x".repeat(129),
                ..request()
            })
            .starts_with("request_id")
        );
        assert!(
            field(StartSyncRequest {
                reason: "r".repeat(1025),
                ..request()
            })
            .starts_with("reason")
        );
        assert!(
            field(StartSyncRequest {
                reason: "a\0b".into(),
                ..request()
            })
            .contains("NUL")
        );
        // Newlines and tabs are free text, kept as written.
        let reason = "line one\n\tline two\r\n";
        let job = new_job(StartSyncRequest {
            reason: reason.into(),
            ..request()
        });
        assert_eq!(job.reason, reason);
    }
}
