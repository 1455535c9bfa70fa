//! The real `wsotel` binary as a child process, its ports read from its startup log line.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
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
#[allow(clippy::zombie_processes)] // `Running`'s Drop kills and waits
pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Running {
    let mut child = wsotel()
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(extra)
        .envs(env.iter().copied())
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
                panic!("no startup line from wsotel ({e}); lines so far: {startup:#?}");
            }
        };
        startup.push(line.clone());
        if line.contains("wsotel started") {
            let field = |name: &str| -> std::net::SocketAddr {
                let plain = format!("{name}=");
                let json = format!("\"{name}\":\"");
                let at = line
                    .find(&json)
                    .map(|i| i + json.len())
                    .or_else(|| line.find(&plain).map(|i| i + plain.len()))
                    .unwrap_or_else(|| panic!("{name} in {line}"));
                line[at..]
                    .split([' ', '"'])
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            return Running {
                ws: field("listen"),
                admin: field("admin_listen"),
                startup,
                child,
                lines: rx,
            };
        }
    }
}

impl Running {
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
