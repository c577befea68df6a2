//! Code generated from `proto/` by `build.rs`, and the file descriptor set served by reflection.

/// `fleetsync.sync.v1`: the sync-agent's `SyncAgent` and `Fleet` services.
pub mod sync {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("fleetsync.sync.v1");
    }
}

/// `fleetsync.migrator.v1`: the migrator's `Migrator` service.
pub mod migrator {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("fleetsync.migrator.v1");
    }
}

/// Encoded `FileDescriptorSet` of `fleetsync.sync.v1`, for the sync-agent's reflection.
pub const SYNC_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sync_descriptor");

/// Encoded `FileDescriptorSet` of `fleetsync.migrator.v1`, for the migrator's reflection.
pub const MIGRATOR_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("migrator_descriptor");
