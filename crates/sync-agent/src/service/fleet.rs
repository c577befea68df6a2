//! `fleetsync.sync.v1.Fleet`: registering servers and reading back what the agent knows.

use std::net::IpAddr;

use fleetsync_common::{
    ServerId, ServiceError,
    proto::sync::v1::{
        self as pb, DeleteServerRequest, DeleteServerResponse, GetServerRequest, GetServerResponse,
        ImportServersRequest, ImportServersResponse, ListServersRequest, ListServersResponse,
        ResetHostKeyRequest, ResetHostKeyResponse, UpsertServerRequest, UpsertServerResponse,
        fleet_server::Fleet,
    },
};
use tonic::{Request, Response, Status};

use super::{
    AgentState, convert,
    fields::{optional_enum, page_size, text},
};
use crate::model::Reachability;
use crate::store::{DatabaseService, HostKeyReset, Registered, ServerSpec};

/// `fleetsync.sync.v1.Fleet`.
#[derive(Debug, Clone)]
pub struct FleetService {
    state: AgentState,
}

impl FleetService {
    /// The service over shared agent state.
    pub fn new(state: AgentState) -> Self {
        Self { state }
    }
}

/// Validates a registration; every error names its field.
pub fn validate_spec(spec: Option<pb::ServerSpec>) -> Result<ServerSpec, ServiceError> {
    let spec = spec.ok_or_else(|| ServiceError::invalid("spec", "required"))?;
    let name = spec.name.trim().to_owned();
    if name.is_empty() {
        return Err(ServiceError::invalid("spec.name", "required"));
    }
    text(&name, "spec.name", 255)?;
    let ip = spec.ip.trim().to_owned();
    if ip.is_empty() {
        return Err(ServiceError::invalid("spec.ip", "required"));
    }
    let is_host_name = ip.len() <= 253
        && ip.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    // A name whose last label is all digits is no host name (RFC 1123 §2.1): "999.1.1.1" is a
    // mistyped address, refused here rather than failing every sync with DNS.
    let numeric_tld = ip
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()));
    if ip.parse::<IpAddr>().is_err() {
        if ip.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(ServiceError::invalid(
                "spec.ip",
                format!("{ip:?} is not a valid IPv4 address"),
            ));
        }
        if !is_host_name || numeric_tld {
            return Err(ServiceError::invalid(
                "spec.ip",
                format!("{ip:?} is neither an IP address nor a host name"),
            ));
        }
    }
    let port = match spec.port {
        0 => 22,
        p @ 1..=65535 => p as u16,
        p => {
            return Err(ServiceError::invalid(
                "spec.port",
                format!("must be 1-65535, got {p}"),
            ));
        }
    };
    let ssh_user = match spec.ssh_user.trim() {
        "" => "vito".to_owned(),
        user => {
            let valid = user.len() <= 32
                && user
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
                && user.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !valid {
                return Err(ServiceError::invalid(
                    "spec.ssh_user",
                    format!("{user:?} is not a valid login name ([a-z_][a-z0-9_-]*, at most 32)"),
                ));
            }
            user.to_owned()
        }
    };
    let database_service = match pb::DatabaseService::try_from(spec.database_service) {
        Ok(pb::DatabaseService::Unspecified) => {
            return Err(ServiceError::invalid(
                "spec.database_service",
                "required: MYSQL, MARIADB, POSTGRESQL or NONE",
            ));
        }
        Ok(pb::DatabaseService::None) => None,
        Ok(pb::DatabaseService::Mysql) => Some(DatabaseService::Mysql),
        Ok(pb::DatabaseService::Mariadb) => Some(DatabaseService::Mariadb),
        Ok(pb::DatabaseService::Postgresql) => Some(DatabaseService::Postgresql),
        Err(_) => {
            return Err(ServiceError::invalid(
                "spec.database_service",
                format!("unknown value {}", spec.database_service),
            ));
        }
    };
    text(&spec.database_version, "spec.database_version", 64)?;
    let status = optional_enum("spec.status", spec.status, |status: pb::ServerStatus| {
        Some(
            status
                .as_str_name()
                .trim_start_matches("SERVER_STATUS_")
                .to_ascii_lowercase(),
        )
    })?;
    let host_key = match spec.host_key.trim() {
        "" => None,
        line => Some(
            russh::keys::PublicKey::from_openssh(line)
                .map(|key| crate::ssh::HostKey::of(&key))
                .map_err(|err| {
                    ServiceError::invalid(
                        "spec.host_key",
                        format!(
                            "not an OpenSSH public key (\"ssh-ed25519 AAAA...\", as in \
                             /etc/ssh/ssh_host_ed25519_key.pub): {err}"
                        ),
                    )
                })?,
        ),
    };
    let zone = spec.zone.trim();
    crate::model::check_zone(zone).map_err(|reason| ServiceError::invalid("spec.zone", reason))?;
    Ok(ServerSpec {
        name,
        ip,
        port,
        ssh_user,
        database_service,
        database_version: spec.database_version,
        status,
        host_key,
        zone: zone.to_owned(),
    })
}

/// Most specs one `ImportServers` call may carry.
pub const MAX_IMPORT: usize = 10_000;

/// A spec of an import refused by [`validate_spec`], by position, its field named as in the spec.
fn rejected(index: usize, err: ServiceError) -> pb::RejectedServer {
    let (field, reason) = match err {
        ServiceError::InvalidArgument { field, reason } => (
            field.strip_prefix("spec.").unwrap_or(field).to_owned(),
            reason,
        ),
        other => (String::new(), other.to_string()),
    };
    pb::RejectedServer {
        index: u32::try_from(index).unwrap_or(u32::MAX),
        field,
        reason,
    }
}

#[tonic::async_trait]
impl Fleet for FleetService {
    async fn upsert_server(
        &self,
        request: Request<UpsertServerRequest>,
    ) -> Result<Response<UpsertServerResponse>, Status> {
        let request = request.into_inner();
        let target = match request.id {
            0 => None,
            value => Some(ServerId::from_request(value, "id")?),
        };
        let spec = validate_spec(request.spec)?;
        let upserted = self.state.store.upsert_server(target, &spec).await?;
        Ok(Response::new(UpsertServerResponse {
            server: Some(convert::server(&upserted.server, None)),
            created: upserted.created,
        }))
    }

    async fn import_servers(
        &self,
        request: Request<ImportServersRequest>,
    ) -> Result<Response<ImportServersResponse>, Status> {
        let specs = request.into_inner().servers;
        if specs.len() > MAX_IMPORT {
            return Err(ServiceError::invalid(
                "servers",
                format!(
                    "at most {MAX_IMPORT} per call, got {}: send a larger fleet in several calls",
                    specs.len()
                ),
            )
            .into());
        }
        let mut response = ImportServersResponse {
            ids: vec![0; specs.len()],
            ..Default::default()
        };
        let mut valid = Vec::with_capacity(specs.len());
        let mut positions = Vec::with_capacity(specs.len());
        for (index, spec) in specs.into_iter().enumerate() {
            match validate_spec(Some(spec)) {
                Ok(spec) => {
                    valid.push(spec);
                    positions.push(index);
                }
                Err(err) => response.rejected.push(rejected(index, err)),
            }
        }
        let imported = self.state.store.import_servers(&valid).await?;
        for (index, imported) in positions.into_iter().zip(imported) {
            response.ids[index] = imported.id.get();
            match imported.action {
                Registered::Created => response.created += 1,
                Registered::Updated => response.updated += 1,
                Registered::Unchanged => response.unchanged += 1,
            }
        }
        tracing::debug!(
            created = response.created,
            updated = response.updated,
            unchanged = response.unchanged,
            rejected = response.rejected.len(),
            "servers imported"
        );
        Ok(Response::new(response))
    }

    async fn delete_server(
        &self,
        request: Request<DeleteServerRequest>,
    ) -> Result<Response<DeleteServerResponse>, Status> {
        let server = ServerId::from_request(request.into_inner().id, "id")?;
        if !self
            .state
            .store
            .delete_server(server)
            .await
            .map_err(ServiceError::from)?
        {
            return Err(ServiceError::not_found("server", server).into());
        }
        Ok(Response::new(DeleteServerResponse {}))
    }

    async fn list_servers(
        &self,
        request: Request<ListServersRequest>,
    ) -> Result<Response<ListServersResponse>, Status> {
        let request = request.into_inner();
        let reachability = optional_enum("reachability", request.reachability, |r| match r {
            pb::Reachability::Unspecified => None,
            pb::Reachability::Unknown => Some(Reachability::Unknown),
            pb::Reachability::Online => Some(Reachability::Online),
            pb::Reachability::Offline => Some(Reachability::Offline),
        })?;
        let page_size = page_size(request.page_size, 100, 1000)?;
        let after = match request.page_token.as_str() {
            "" => None,
            token => token
                .parse::<i64>()
                .ok()
                .filter(|t| *t > 0)
                .map(|t| Some(ServerId::stored(t)))
                .ok_or_else(|| {
                    ServiceError::invalid("page_token", "not a token from a previous page")
                })?,
        };
        let servers = self
            .state
            .store
            .servers(reachability, after, page_size as u32 + 1)
            .await
            .map_err(ServiceError::from)?;
        let more = servers.len() > page_size as usize;
        let servers = &servers[..servers.len().min(page_size as usize)];
        let ids: Vec<ServerId> = servers.iter().map(|s| s.id).collect();
        let last = self
            .state
            .store
            .last_runs(&ids)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(ListServersResponse {
            servers: servers
                .iter()
                .map(|s| convert::server(s, last.get(&s.id)))
                .collect(),
            next_page_token: if more {
                servers.last().map(|s| s.id.to_string()).unwrap_or_default()
            } else {
                String::new()
            },
        }))
    }

    async fn get_server(
        &self,
        request: Request<GetServerRequest>,
    ) -> Result<Response<GetServerResponse>, Status> {
        let server_id = ServerId::from_request(request.into_inner().id, "id")?;
        let store = &self.state.store;
        let server = store
            .server(server_id)
            .await
            .map_err(ServiceError::from)?
            .ok_or_else(|| ServiceError::not_found("server", server_id))?;
        let last = store
            .last_runs(&[server_id])
            .await
            .map_err(ServiceError::from)?;
        let inventory = store
            .inventory(server_id)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(GetServerResponse {
            inventory: convert::inventory(server.database_service, &inventory),
            server: Some(convert::server(&server, last.get(&server_id))),
        }))
    }

    async fn reset_host_key(
        &self,
        request: Request<ResetHostKeyRequest>,
    ) -> Result<Response<ResetHostKeyResponse>, Status> {
        let server_id = ServerId::from_request(request.into_inner().id, "id")?;
        let previous = match self
            .state
            .store
            .reset_host_key(server_id)
            .await
            .map_err(ServiceError::from)?
        {
            HostKeyReset::NoSuchServer => {
                return Err(ServiceError::not_found("server", server_id).into());
            }
            HostKeyReset::Forgotten { previous } => previous,
        };
        if let Some(key) = &previous {
            tracing::info!(server_id = server_id.get(), fingerprint = %key.key.fingerprint, "pinned host key forgotten");
        }
        Ok(Response::new(ResetHostKeyResponse {
            previous: convert::previous_key(previous.as_ref()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> pb::ServerSpec {
        pb::ServerSpec {
            name: "db-1".into(),
            ip: "10.0.0.1".into(),
            port: 0,
            ssh_user: String::new(),
            database_service: pb::DatabaseService::Mariadb as i32,
            database_version: "10.11".into(),
            status: 0,
            host_key: String::new(),
            zone: String::new(),
        }
    }

    fn field_of(spec: pb::ServerSpec) -> String {
        match validate_spec(Some(spec)).unwrap_err() {
            ServiceError::InvalidArgument { field, .. } => field.to_owned(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_and_field_names_in_errors() {
        let ok = validate_spec(Some(spec())).unwrap();
        assert_eq!((ok.port, ok.ssh_user.as_str()), (22, "vito"));
        assert_eq!(ok.database_service, Some(DatabaseService::Mariadb));
        assert!(
            validate_spec(Some(pb::ServerSpec {
                ip: "db.example.com".into(),
                ..spec()
            }))
            .is_ok()
        );
        assert!(
            validate_spec(Some(pb::ServerSpec {
                ip: "::1".into(),
                ..spec()
            }))
            .is_ok()
        );

        assert_eq!(
            field_of(pb::ServerSpec {
                name: " ".into(),
                ..spec()
            }),
            "spec.name"
        );
        for bad in [
            "not an ip!",
            "999.1.1.1",
            "1.2.3",
            "10.0.0.256",
            "db.123",
            "-db.example",
        ] {
            assert_eq!(
                field_of(pb::ServerSpec {
                    ip: bad.into(),
                    ..spec()
                }),
                "spec.ip",
                "{bad}"
            );
        }
        for good in ["10.0.0.255", "db-1", "db1.example.com", "2001:db8::1"] {
            assert!(
                validate_spec(Some(pb::ServerSpec {
                    ip: good.into(),
                    ..spec()
                }))
                .is_ok(),
                "{good}"
            );
        }
        assert_eq!(
            field_of(pb::ServerSpec {
                port: 65536,
                ..spec()
            }),
            "spec.port"
        );
        assert_eq!(
            field_of(pb::ServerSpec {
                ssh_user: "Root;rm".into(),
                ..spec()
            }),
            "spec.ssh_user"
        );
        assert_eq!(
            field_of(pb::ServerSpec {
                zone: "eu 1".into(),
                ..spec()
            }),
            "spec.zone"
        );
        assert_eq!(
            field_of(pb::ServerSpec {
                database_service: 0,
                ..spec()
            }),
            "spec.database_service"
        );
        assert_eq!(
            field_of(pb::ServerSpec {
                database_service: 42,
                ..spec()
            }),
            "spec.database_service"
        );
        assert_eq!(
            field_of(pb::ServerSpec {
                status: 99,
                ..spec()
            }),
            "spec.status"
        );
        assert_eq!(
            field_of(pb::ServerSpec {
                name: "a\nb".into(),
                ..spec()
            }),
            "spec.name"
        );
        assert!(matches!(
            validate_spec(None),
            Err(ServiceError::InvalidArgument { field: "spec", .. })
        ));
    }
}
