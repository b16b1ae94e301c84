//! The `zlayer-tunnel` binary as a child process whose log can be waited on.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::DEADLINE;

/// The token every `Proc` gets in `ZLAYER_TUNNEL_TOKEN`.
pub const TOKEN: &str = "test-token";

/// A process whose stderr lines arrive on a channel; killed on drop, so a
/// failed test leaves no process running.
pub struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    /// Runs the `zlayer-tunnel` binary with `args`.
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_with(args, |_| {})
    }

    /// A CLI server on 127.0.0.1: control on an OS-assigned port, public
    /// ports `low..=high` bound on 127.0.0.1, then `flags`.
    pub fn server(public: (u16, u16), flags: &[&str]) -> Self {
        Self::server_with(public, flags, |_| {})
    }

    /// [`Proc::server`], its command adjusted by `adjust` first.
    pub fn server_with(
        public: (u16, u16),
        flags: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        Self::server_bound_with("127.0.0.1", public, flags, adjust)
    }

    /// [`Proc::server_with`], its public ports bound on `bind_host`.
    pub fn server_bound_with(
        bind_host: &str,
        (low, high): (u16, u16),
        flags: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        let range = format!("{low}-{high}");
        let mut args = vec![
            "server",
            "--listen",
            "127.0.0.1:0",
            "--port-range",
            &range,
            "--bind-host",
            bind_host,
        ];
        args.extend_from_slice(flags);
        Self::spawn_with(&args, adjust)
    }

    /// Runs the `zlayer-tunnel` binary with `args`, its command adjusted by
    /// `adjust` first (another token in the environment, none, stdout piped).
    pub fn spawn_with(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Self {
        let exe = Path::new(env!("CARGO_BIN_EXE_zlayer-tunnel"));
        Self::spawn_exe_with(exe, args, adjust)
    }

    /// Runs the `zlayer-tunnel` binary with `args` (and the test's token)
    /// to its end, which must be a failure: its output, and its stderr as text.
    pub fn failed(args: &[&str]) -> (std::process::Output, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_zlayer-tunnel"))
            .args(args)
            .env("ZLAYER_TUNNEL_TOKEN", TOKEN)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{args:?} succeeded: {err}");
        (out, err)
    }

    /// Runs the program at `exe` with `args`.
    pub fn spawn_exe(exe: &Path, args: &[&str]) -> Self {
        Self::spawn_exe_with(exe, args, |_| {})
    }

    fn spawn_exe_with(exe: &Path, args: &[&str], adjust: impl FnOnce(&mut Command)) -> Self {
        let mut command = Command::new(exe);
        command
            .args(args)
            .env("ZLAYER_TUNNEL_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1") // plain log lines to match, whatever the program does
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        adjust(&mut command);
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `text`; panics with the log after `DEADLINE`.
    pub fn wait_for(&mut self, text: &str) -> String {
        let end = Instant::now() + DEADLINE;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no line with {text:?} in:\n{}", self.seen.join("\n"));
    }

    /// The address (`addr=` field) of the first line with `text`, seen
    /// already or awaited: where a listener it was told to bind on port 0
    /// took, logged once it listens ("control channel listening", "admin
    /// endpoints listening"), so that connections from then on are queued.
    pub fn listening_addr(&mut self, text: &str) -> SocketAddr {
        let seen = self.seen.iter().find(|l| l.contains(text)).cloned();
        let line = seen.unwrap_or_else(|| self.wait_for(text));
        let addr = line
            .split_whitespace()
            .find_map(|field| field.strip_prefix("addr="))
            .unwrap_or_else(|| panic!("no addr= in {line:?}"));
        addr.parse()
            .unwrap_or_else(|e| panic!("{addr:?} in {line:?}: {e}"))
    }

    /// The public port in an agent's next "service registered" line (logged
    /// once the server answered, which it does once it listens there).
    pub fn registered_port(&mut self) -> u16 {
        let line = self.wait_for("service registered");
        line.split_whitespace()
            .find_map(|field| field.strip_prefix("public_port="))
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("no public_port= in {line:?}"))
    }

    /// Sends the process `SIGHUP` (a reload).
    pub fn hangup(&self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
        assert!(sent.success(), "kill -HUP {pid}");
    }

    /// The lines read so far (by `wait_for` and the like).
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Its whole log, once its stderr has ended (it exited); panics after `DEADLINE`.
    pub fn log(&mut self) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return self.seen.join("\n"),
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("its stderr never ended"),
            }
        }
    }
}

impl Proc {
    /// Sends `signal` ("TERM", "INT", "KILL", "STOP", ...) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Sends `signal` and waits up to `DEADLINE` for the exit; the status
    /// and how long the exit took from the signal.
    pub fn stop_with(&mut self, signal: &str) -> (ExitStatus, Duration) {
        let start = Instant::now();
        self.signal(signal);
        let status = self.exited_within(DEADLINE);
        let status = status.unwrap_or_else(|| panic!("no exit after SIG{signal}"));
        (status, start.elapsed())
    }

    /// Its exit status, once it exits by itself within `within`.
    pub fn exited_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let mut status = None;
        super::poll_blocking(within, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
