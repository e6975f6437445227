//! A guest VM as a child process.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// A running `tinyvmm run` whose console we read.
pub struct GuestProc {
    /// The process.
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Every console line read so far.
    pub log: Vec<String>,
    /// When it was spawned.
    pub started: Instant,
    /// When its first console line arrived.
    pub first_line: Option<Instant>,
}

impl std::fmt::Debug for GuestProc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestProc")
            .field("pid", &self.child.id())
            .finish()
    }
}

impl GuestProc {
    /// Starts `exe run <args>`, stderr to `stderr_log` (or discarded).
    pub fn spawn(exe: &Path, args: &[String], stderr_log: Option<&Path>) -> std::io::Result<Self> {
        let mut cmd = Command::new(exe);
        cmd.arg("run")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        match stderr_log {
            Some(p) => cmd.stderr(std::fs::File::create(p)?),
            None => cmd.stderr(Stdio::null()),
        };
        let started = Instant::now();
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            lines: rx,
            log: Vec::new(),
            started,
            first_line: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a console line starting with `prefix`; returns it. Fails on timeout, on a
    /// `VERIFY FAIL`/`GUEST PANIC` line, or when the console closes.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Result<String, GuestError> {
        let deadline = Instant::now() + timeout;
        loop {
            if super::terminating() {
                return Err(GuestError::Interrupted);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(GuestError::NoLine {
                    pid: self.pid(),
                    prefix: prefix.to_string(),
                    timeout,
                    last: self.last_lines(),
                });
            }
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(line) => {
                    if self.first_line.is_none() {
                        self.first_line = Some(Instant::now());
                    }
                    self.log.push(line.clone());
                    if line.starts_with(prefix) {
                        return Ok(line);
                    }
                    if line.starts_with("VERIFY FAIL") || line.starts_with("GUEST PANIC") {
                        return Err(GuestError::Failed {
                            pid: self.pid(),
                            line,
                        });
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(GuestError::ConsoleClosed {
                        pid: self.pid(),
                        prefix: prefix.to_string(),
                        last: self.last_lines(),
                    })
                }
            }
        }
    }

    /// The last five console lines, newest first.
    fn last_lines(&self) -> Vec<String> {
        self.log.iter().rev().take(5).cloned().collect()
    }

    /// Sends one `serve` command line.
    pub fn send(&mut self, cmd: &str) -> std::io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("stdin closed"))?;
        stdin.write_all(cmd.as_bytes())?;
        stdin.write_all(b"\n")?;
        stdin.flush()
    }

    /// Runs a verify pass in a `serve` guest; returns the pages verified.
    pub fn verify(&mut self, timeout: Duration) -> Result<u64, GuestError> {
        self.send("verify").map_err(|source| GuestError::Send {
            pid: self.pid(),
            source,
        })?;
        let line = self.wait_line("VERIFY ", timeout)?;
        if !line.starts_with("VERIFY OK") {
            return Err(GuestError::Failed {
                pid: self.pid(),
                line,
            });
        }
        field(&line, "pages").ok_or(GuestError::Malformed { line })
    }

    /// Asks a `serve` guest to exit and waits for the process.
    pub fn exit(mut self, timeout: Duration) -> Result<std::process::ExitStatus, GuestError> {
        let _ = self.send("exit");
        drop(self.stdin.take());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().map_err(|source| GuestError::Wait {
                pid: self.child.id(),
                source,
            })? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(GuestError::DidNotExit {
                    pid: self.child.id(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What went wrong with a guest process.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// SIGINT/SIGTERM arrived while waiting.
    #[error("interrupted")]
    Interrupted,
    /// The expected console line did not come in time.
    #[error("guest {pid}: no '{prefix}' line within {timeout:?}; last lines: {last:?}")]
    NoLine {
        /// The guest process.
        pid: u32,
        /// The line awaited.
        prefix: String,
        /// How long we waited.
        timeout: Duration,
        /// Its last console lines, newest first.
        last: Vec<String>,
    },
    /// The guest reported a failure (`VERIFY FAIL`, `GUEST PANIC`, a failed verify).
    #[error("guest {pid}: {line}")]
    Failed {
        /// The guest process.
        pid: u32,
        /// Its line.
        line: String,
    },
    /// The console closed (the process ended) before the expected line.
    #[error("guest {pid}: console closed before '{prefix}'; last lines: {last:?}")]
    ConsoleClosed {
        /// The guest process.
        pid: u32,
        /// The line awaited.
        prefix: String,
        /// Its last console lines, newest first.
        last: Vec<String>,
    },
    /// A command could not be written to the guest's stdin.
    #[error("guest {pid}: cannot send a command: {source}")]
    Send {
        /// The guest process.
        pid: u32,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line without the expected field.
    #[error("malformed line: {line}")]
    Malformed {
        /// The line.
        line: String,
    },
    /// Waiting for the process failed.
    #[error("guest {pid}: cannot wait for the process: {source}")]
    Wait {
        /// The guest process.
        pid: u32,
        /// The OS error.
        source: std::io::Error,
    },
    /// The process did not exit in time (it was killed).
    #[error("guest {pid} did not exit")]
    DidNotExit {
        /// The guest process.
        pid: u32,
    },
}

impl Drop for GuestProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The numeric `key=value` field of a console line (decimal or 0x-hex).
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| {
        let v = w.strip_prefix(key)?.strip_prefix('=')?;
        match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => v.parse().ok(),
        }
    })
}
