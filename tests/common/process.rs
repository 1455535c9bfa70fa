//! The real `wsotel` binary as a child process, its ports read from its startup log line.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

/// The binary with a clean environment: no `WSOTEL_*`, `OTEL_*` or `RUST_LOG` from the caller.
pub fn wsotel() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wsotel"));
    c.env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("WSOTEL_") || k.starts_with("OTEL_") {
            c.env_remove(k);
        }
    }
    c
}

/// [`wsotel`] listening on loopback ports of its own choosing (both 0).
pub fn wsotel_on_loopback() -> Command {
    let mut c = wsotel();
    c.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]);
    c
}

/// Runs `cmd` to its end; returns its exit code (-1 when killed by a signal), stdout and stderr.
pub fn run_to_end(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tool` from the first directory of `PATH` that has it.
pub fn on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Reads stdout lines until one satisfies `done` (at most `within`); returns every line read.
pub fn lines_until(
    rx: &Receiver<String>,
    within: Duration,
    mut done: impl FnMut(&str) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let stop = done(&line);
                seen.push(line);
                if stop {
                    return seen;
                }
            }
            Err(e) => panic!("no such line within {within:?} ({e}); lines: {seen:#?}"),
        }
    }
}

/// A running binary, its ports read from its startup log line.
pub struct Running {
    pub child: Child,
    pub ws: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    /// Every stdout line up to and including the startup line.
    pub startup: Vec<String>,
    pub lines: std::sync::mpsc::Receiver<String>,
}

pub fn start(extra: &[&str]) -> Running {
    start_with_env(extra, &[])
}

/// Starts the binary with extra flags and environment.
pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Running {
    let mut cmd = wsotel_on_loopback();
    cmd.args(extra).envs(env.iter().copied());
    start_command(cmd)
}

/// Starts `cmd` (a [`wsotel_on_loopback`] with whatever else the test needs), its stdout read
/// line by line, and waits for its startup line (at most 20 s).
#[allow(clippy::zombie_processes)] // `Running`'s Drop kills and waits
pub fn start_command(cmd: Command) -> Running {
    start_command_until(cmd, "wsotel started")
}

/// Spawns `cmd` and reads its stdout until the line containing `marker`, which carries
/// `listen=` (and `admin_listen=`; without it, the admin address is the listen address).
pub fn start_command_until(mut cmd: Command, marker: &str) -> Running {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut startup = Vec::new();
    loop {
        let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => line,
            Err(e) => {
                // Never leave an orphan behind holding the test's pipes.
                let _ = child.kill();
                let _ = child.wait();
                panic!("no {marker:?} line ({e}); lines so far: {startup:#?}");
            }
        };
        startup.push(line.clone());
        if line.contains(marker) {
            let field = |name: &str| -> Option<std::net::SocketAddr> {
                let plain = format!("{name}=");
                let json = format!("\"{name}\":\"");
                let at = line.find(&json).map(|i| i + json.len()).or_else(|| {
                    line.match_indices(&plain)
                        .find(|(i, _)| *i == 0 || !line[..*i].ends_with('_'))
                        .map(|(i, _)| i + plain.len())
                })?;
                Some(line[at..].split([' ', '"']).next()?.parse().unwrap())
            };
            let ws = field("listen").unwrap_or_else(|| panic!("listen in {line}"));
            return Running {
                ws,
                admin: field("admin_listen").unwrap_or(ws),
                startup,
                child,
                lines: rx,
            };
        }
    }
}

impl Running {
    /// `ws://` URL of `path` on its WebSocket listener.
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.ws, path)
    }

    pub fn sigterm(&self) {
        // SAFETY: kill with a valid pid of our own child.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) },
            0
        );
    }

    /// Waits for exit (at most 15 s) and returns the code with the rest of stdout.
    pub fn wait(mut self) -> (i32, Vec<String>) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let rest: Vec<String> = self.lines.try_iter().collect();
                return (status.code().unwrap_or(-1), rest);
            }
            assert!(Instant::now() < deadline, "the server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
