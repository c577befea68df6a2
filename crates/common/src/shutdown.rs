//! Shutdown: ctrl-c and SIGTERM cancel one `CancellationToken` that every task watches.

use tokio_util::sync::CancellationToken;

/// Returns a token that is cancelled on the first ctrl-c (SIGINT) or SIGTERM.
///
/// Must be called inside a tokio runtime. If a signal handler cannot be installed, the error is
/// returned rather than running without a way to stop cleanly.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};

    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            () = cancel.cancelled() => return,
        };
        tracing::info!(signal = name, "shutting down");
        cancel.cancel();
    });
    Ok(token)
}
