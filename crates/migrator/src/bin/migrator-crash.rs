//! `migrator-crash`: the migrator with the tests' fault injection (`migrate --crash-at POINT`
//! SIGKILLs the process there). Built only with the `crash-points` feature (`just build`);
//! `cargo build --release` and `cargo install` never make it, and `migrator` never has the flag.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    fleetsync_migrator::entry::main().await
}
