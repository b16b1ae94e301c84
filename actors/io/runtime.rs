//! The library's own actix `System`, on a dedicated thread, so that the
//! registry and raw-socket sessions work from any host: an actix-web app or a
//! plain `#[tokio::main]` program (where starting an actor the naive way
//! panics). It hands out an `ArbiterHandle`, which is `Send`. Also the
//! threads of an agent's extra links ([`thread`]), and the move of a socket
//! accepted on one thread onto another's reactor ([`onto_this_thread`]).

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

/// `socket`, its readiness watched by this thread's reactor.
///
/// A tokio socket stays registered with the reactor of the thread that
/// accepted it: a service listener runs on the thread of the link that
/// registered the service first, so a visitor it gives to another link (a
/// replica, an agent's second link) would be woken through that thread, and
/// wait whenever that thread is busy with its own streams. Costs two system
/// calls (`epoll_ctl` out and in).
pub(crate) fn onto_this_thread(
    socket: tokio::net::TcpStream,
) -> std::io::Result<tokio::net::TcpStream> {
    tokio::net::TcpStream::from_std(socket.into_std()?)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use tokio::io::AsyncReadExt;

    use super::*;

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A socket accepted on a thread that then stops turning (blocked) is
    /// read on another thread once moved onto it: without the move, its
    /// readiness would wait for the blocked thread's reactor.
    #[test]
    fn a_socket_moved_onto_this_thread_is_read_while_its_first_thread_is_blocked() {
        let (to_reader, accepted) = std::sync::mpsc::channel();
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (waiting_tx, waiting) = std::sync::mpsc::channel();
        let acceptor = std::thread::spawn(move || {
            let runtime = current_thread();
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let (socket, _) = listener.accept().await.unwrap();
                to_reader.send(socket).unwrap();
            });
            // this thread's reactor turns no more until the test ends
            let _ = blocked.recv();
        });
        let mut visitor = std::net::TcpStream::connect(addr_rx.recv().unwrap()).unwrap();
        let socket = accepted.recv().unwrap();
        let reader = std::thread::spawn(move || {
            current_thread().block_on(async move {
                let mut socket = onto_this_thread(socket).unwrap();
                let mut got = [0u8; 4];
                // nothing sent yet: from here on, only a reactor says when to read
                let nothing = socket.try_read(&mut got);
                assert_eq!(nothing.unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
                waiting_tx.send(()).unwrap();
                let read = socket.read_exact(&mut got);
                tokio::time::timeout(Duration::from_secs(10), read)
                    .await
                    .map(|r| r.map(|_| got))
            })
        });
        waiting.recv().unwrap();
        visitor.write_all(b"ping").unwrap();
        let read = reader.join().unwrap();
        let _ = release.send(());
        acceptor.join().unwrap();
        assert_eq!(read.expect("read in time").unwrap(), *b"ping");
    }
}
