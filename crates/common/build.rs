//! Compiles `proto/` with the pure-Rust `protox` (no system `protoc`), generates the tonic
//! clients and servers, and writes the file descriptor set that server reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message;

/// Each service's protos, compiled into its own descriptor set so that reflection on one
/// service does not advertise the other.
const PACKAGES: &[(&str, &[&str])] = &[
    (
        "sync_descriptor",
        &[
            "fleetsync/sync/v1/outcome.proto",
            "fleetsync/sync/v1/fleet.proto",
            "fleetsync/sync/v1/sync_agent.proto",
        ],
    ),
    (
        "migrator_descriptor",
        &["fleetsync/migrator/v1/migrator.proto"],
    ),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", proto_root.display());

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    for (name, files) in PACKAGES {
        let fds = protox::compile(*files, [&proto_root])?;
        fs::write(out_dir.join(format!("{name}.bin")), fds.encode_to_vec())?;
        tonic_prost_build::configure()
            .build_server(true)
            .build_client(true)
            .compile_fds(fds)?;
    }
    Ok(())
}
