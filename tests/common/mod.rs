//! Helpers shared by the integration tests: run the real `tinyvmm` binary against real
//! KVM guests, with a timeout, and capture what the guest printed.

#![allow(dead_code)]

pub mod merge;
pub mod tenant;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `tinyvmm` binary under test.
pub fn tinyvmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tinyvmm"))
}

/// Whether this host can run KVM guests; prints why not.
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP: /dev/kvm is not usable here ({e}); this test boots real KVM guests");
            false
        }
    }
}

/// Skips the calling test (returns) when KVM is not available.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !common::kvm_available() {
            return;
        }
    };
}

/// The result of one VMM run.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The first stdout line starting with `prefix`.
    pub fn line(&self, prefix: &str) -> Option<&str> {
        self.stdout.lines().find(|l| l.starts_with(prefix))
    }

    /// A `key=value` field of the first line starting with `prefix`.
    pub fn field(&self, prefix: &str, key: &str) -> Option<String> {
        let line = self.line(prefix)?;
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_string))
    }

    pub fn assert_ok(&self) {
        assert_eq!(
            self.code(),
            Some(0),
            "tinyvmm failed\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
    }
}

/// Waits for `child` at most `timeout`, then kills it; collects its output.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> Outcome {
    let start = Instant::now();
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let s = child.wait().expect("wait after kill");
            let stdout = t_out.join().unwrap();
            let stderr = t_err.join().unwrap();
            panic!("tinyvmm did not finish within {timeout:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n(status after kill: {s})");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
        elapsed: start.elapsed(),
    }
}

/// Runs `tinyvmm run` with `args` and waits at most `timeout`.
pub fn run_vm(args: &[&str], timeout: Duration) -> Outcome {
    let child = tinyvmm()
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tinyvmm");
    wait_with_timeout(child, timeout)
}

/// A fresh scratch directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tinyvmm-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}
