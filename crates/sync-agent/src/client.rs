//! Operator commands of the agent binary that talk to a running agent over gRPC.

use anyhow::Context;
use fleetsync_common::proto::sync::v1::{ResetHostKeyRequest, fleet_client::FleetClient};

use crate::config::ResetHostKeyArgs;

/// `sync-agent reset-host-key ID`.
pub async fn reset_host_key(args: &ResetHostKeyArgs) -> anyhow::Result<()> {
    let mut client = FleetClient::connect(args.agent_url.clone())
        .await
        .with_context(|| format!("cannot reach the sync-agent at {}", args.agent_url))?;
    let response = client
        .reset_host_key(ResetHostKeyRequest { id: args.server_id })
        .await
        .map_err(|status| anyhow::anyhow!("{:?}: {}", status.code(), status.message()))?
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
