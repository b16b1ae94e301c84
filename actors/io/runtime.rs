//! The library's own actix `System`, on a dedicated thread, so that the
//! registry and raw-socket sessions work from any host: an actix-web app or a
//! plain `#[tokio::main]` program (where starting an actor the naive way
//! panics). It hands out an `ArbiterHandle`, which is `Send`.

use std::sync::OnceLock;

use actix::ArbiterHandle;

static RUNTIME: OnceLock<ArbiterHandle> = OnceLock::new();

/// The runtime's arbiter, starting its thread on first use.
pub(crate) fn arbiter() -> &'static ArbiterHandle {
    RUNTIME.get_or_init(start)
}

fn start() -> ArbiterHandle {
    match thread("zlayer-tunnel") {
        Ok(handle) => handle,
        // invariant: without its runtime thread the library can serve nothing
        Err(e) => panic!("zlayer-tunnel: cannot start the runtime thread: {e}"),
    }
}

/// A thread of its own with an actix `System` (for an agent's extra link);
/// [`stop_thread`] ends it. Fails when the OS refuses a thread (limits).
pub(crate) fn thread(name: &str) -> std::io::Result<ArbiterHandle> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let system = actix::System::new();
            let _ = tx.send(actix::Arbiter::current());
            let _ = system.run();
        })?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the thread ended before its runtime started"))
}

/// Ends a thread started by [`thread`] once what is queued on it has run.
pub(crate) fn stop_thread(thread: &ArbiterHandle) {
    thread.spawn_fn(|| actix::System::current().stop());
}
