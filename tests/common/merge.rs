//! A real merge daemon and real guests enrolled with it, for the tests of merging
//! (`share.rs`) and of isolation (`isolation.rs`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tinyvmm::fleet::guest::GuestProc;

pub const BIN: &str = env!("CARGO_BIN_EXE_tinyvmm");
pub const LONG: Duration = Duration::from_secs(120);

/// A merge daemon in its own run directory, killed on drop.
pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
}

impl Daemon {
    pub fn start(name: &str, extra: &[&str]) -> Self {
        let dir = super::scratch_dir(name);
        let mut d = Daemon { child: None, dir };
        d.spawn(extra);
        d
    }

    pub fn spawn(&mut self, extra: &[&str]) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("merged.log"))
            .unwrap();
        let child = Command::new(BIN)
            .env("TINYVMM_RUN_DIR", &self.dir)
            .env("RUST_LOG", "info")
            .arg("merged")
            .arg("--socket")
            .arg(self.socket())
            .arg("--api-sock")
            .arg(self.api())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        // Ready when both sockets accept connections (files left by a killed daemon don't).
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err()
            || std::os::unix::net::UnixStream::connect(self.api()).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "daemon did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A daemon that scans fast (20000 pages every 5 ms), for tests that want convergence.
    pub fn fast(name: &str) -> Self {
        Self::start(name, &["--pages-to-scan", "20000", "--sleep-ms", "5"])
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("merged.sock")
    }

    pub fn api(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("merged.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
        let _ = c.wait();
    }

    /// `tinyvmm ksm <args> --api-sock <sock>`, which must succeed.
    pub fn ksm(&self, args: &[&str]) -> std::process::Output {
        let out = Command::new(BIN)
            .arg("ksm")
            .args(args)
            .arg("--api-sock")
            .arg(self.api())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tinyvmm ksm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `tinyvmm ksm <args>`; stdout parsed as JSON.
    pub fn ksm_json(&self, args: &[&str]) -> Value {
        let out = self.ksm(args);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "bad JSON from ksm {args:?}: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn status(&self) -> Value {
        self.ksm_json(&["status", "--json"])
    }

    pub fn set(&self, args: &[&str]) {
        let mut all = vec!["set"];
        all.extend_from_slice(args);
        self.ksm(&all);
    }

    /// Waits until `done(status)` holds; returns that status.
    pub fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if done(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status {s:#}\n--- daemon log\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("no counter {k} in {v:#}"))
}

pub struct Profile {
    pub mib: u64,
    pub extra: String,
}

impl Profile {
    /// `mib` MiB of the guest's default content mix.
    pub fn plain(mib: u64) -> Self {
        Profile {
            mib,
            extra: String::new(),
        }
    }
}

/// Starts a `fill,serve` guest enrolled with `daemon`; returns it and its FILL line.
pub fn guest(daemon: &Daemon, seed: u32, p: &Profile, flags: &[&str]) -> (GuestProc, String) {
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 workload=fill,serve mib={} seed=1 guest_seed={seed} {}",
        p.mib, p.extra
    );
    let mut args: Vec<String> = vec![
        "--mem".into(),
        format!("{}M", p.mib + 16),
        "--cmdline".into(),
        cmdline,
        "--share-memory".into(),
        "--merge-socket".into(),
        daemon.socket().display().to_string(),
        "--no-daemon-autostart".into(),
    ];
    args.extend(flags.iter().map(|s| s.to_string()));
    let log = daemon.dir.join(format!("guest-{seed}.log"));
    let mut g = GuestProc::spawn(Path::new(BIN), &args, Some(&log)).unwrap();
    let fill = g.wait_line("FILL done", LONG).unwrap();
    g.wait_line("SERVE ready", LONG).unwrap();
    (g, fill)
}

pub fn verify_all(guests: &mut [GuestProc], pages: u64) {
    for g in guests.iter_mut() {
        assert_eq!(g.verify(LONG).unwrap(), pages, "every page verified");
    }
}

pub fn exit_all(guests: Vec<GuestProc>) {
    for g in guests {
        let st = g.exit(Duration::from_secs(30)).unwrap();
        assert!(st.success(), "guest exit status {st}");
    }
}
