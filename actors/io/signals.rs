//! `shutdown_signal`: the one wait for a request to stop, shared by `serve`,
//! the `zlayer-tunnel` commands and the examples, so that all of them stop on
//! the same signals.

/// Waits until the process is asked to stop: SIGINT or SIGTERM on unix, Ctrl-C
/// elsewhere. Fails if the handlers cannot be installed. Once installed they
/// stay for the life of the process (tokio's rule), so the default action no
/// longer ends it: the caller stops, then returns from `main`.
pub async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut int, mut term) = (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        );
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
