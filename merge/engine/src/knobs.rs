//! Scanner knobs, with the kernel's names and semantics (`/sys/kernel/mm/ksm/*`).

use serde::{Deserialize, Serialize};

/// Largest accepted `pages_to_scan`.
pub const MAX_PAGES_TO_SCAN: u32 = 1 << 24;
/// Largest accepted `sleep_millisecs` (one hour).
pub const MAX_SLEEP_MILLISECS: u32 = 3_600_000;
/// The kernel's default `max_page_sharing`.
pub const DEFAULT_MAX_PAGE_SHARING: u32 = 256;

/// `run`: 0 stops the scanner, 1 runs it, 2 stops it and unmerges everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum RunMode {
    /// 0: stop scanning; merged pages stay merged.
    Stop,
    /// 1: scan.
    Run,
    /// 2: stop scanning and give every merged page a private copy again.
    Unmerge,
}

impl TryFrom<u8> for RunMode {
    type Error = KnobError;
    fn try_from(v: u8) -> Result<Self, KnobError> {
        match v {
            0 => Ok(RunMode::Stop),
            1 => Ok(RunMode::Run),
            2 => Ok(RunMode::Unmerge),
            _ => Err(KnobError::Run(v)),
        }
    }
}

impl From<RunMode> for u8 {
    fn from(r: RunMode) -> u8 {
        match r {
            RunMode::Stop => 0,
            RunMode::Run => 1,
            RunMode::Unmerge => 2,
        }
    }
}

/// The advisor (like the kernel's `advisor_mode`): when on, it owns `pages_to_scan`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "mode", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Advisor {
    /// `pages_to_scan` is set by hand.
    #[default]
    None,
    /// Sets `pages_to_scan` so that a full scan takes `target_scan_secs`, using at most
    /// `max_cpu_pct` percent of one CPU.
    ScanTime {
        /// Target duration of one full scan, seconds (>= 1).
        target_scan_secs: u32,
        /// CPU cap for the scanner, percent of one CPU (1..=100).
        max_cpu_pct: u8,
    },
}

/// The scanner's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Knobs {
    /// 0 stop, 1 run, 2 stop and unmerge everything.
    pub run: RunMode,
    /// Sleep between wake-ups (the daemon's business; the engine only reports it).
    pub sleep_millisecs: u32,
    /// Pages visited per wake-up, across all guests (1..=[`MAX_PAGES_TO_SCAN`]).
    pub pages_to_scan: u32,
    /// Most guest pages mapped onto one frame (>= 2).
    pub max_page_sharing: u32,
    /// Optional advisor that owns `pages_to_scan`.
    pub advisor: Advisor,
    /// Skip pages that keep failing to merge for a growing number of full scans.
    pub smart_scan: bool,
}

impl Default for Knobs {
    /// `run = 1` (registering a guest with the merge daemon is the opt-in), sleep 20 ms,
    /// 4096 pages per wake-up (batched host work makes that cheap), the kernel's
    /// `max_page_sharing`, smart scan on, no advisor.
    fn default() -> Self {
        Knobs {
            run: RunMode::Run,
            sleep_millisecs: 20,
            pages_to_scan: 4096,
            max_page_sharing: DEFAULT_MAX_PAGE_SHARING,
            advisor: Advisor::None,
            smart_scan: true,
        }
    }
}

/// A partial update of [`Knobs`] (the body of a REST `PATCH /ksm`); absent fields stay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnobsUpdate {
    /// See [`Knobs::run`].
    pub run: Option<RunMode>,
    /// See [`Knobs::sleep_millisecs`].
    pub sleep_millisecs: Option<u32>,
    /// See [`Knobs::pages_to_scan`]; refused while an advisor is on.
    pub pages_to_scan: Option<u32>,
    /// See [`Knobs::max_page_sharing`].
    pub max_page_sharing: Option<u32>,
    /// See [`Knobs::advisor`].
    pub advisor: Option<Advisor>,
    /// See [`Knobs::smart_scan`].
    pub smart_scan: Option<bool>,
}

/// A knob value was refused; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KnobError {
    /// `run` not 0, 1 or 2.
    #[error("run must be 0, 1 or 2, not {0}")]
    Run(u8),
    /// `pages_to_scan` out of range.
    #[error("pages_to_scan must be 1..={MAX_PAGES_TO_SCAN}, not {0}")]
    PagesToScan(u32),
    /// `sleep_millisecs` out of range.
    #[error("sleep_millisecs must be at most {MAX_SLEEP_MILLISECS}, not {0}")]
    Sleep(u32),
    /// `max_page_sharing` below 2.
    #[error("max_page_sharing must be at least 2, not {0}")]
    MaxPageSharing(u32),
    /// Advisor parameters out of range.
    #[error("advisor scan-time needs target_scan_secs >= 1 and max_cpu_pct in 1..=100")]
    Advisor,
    /// `pages_to_scan` set by hand while the advisor owns it.
    #[error("pages_to_scan is set by the advisor; turn the advisor off first")]
    AdvisorOwnsPagesToScan,
}

impl Knobs {
    /// Checks every value.
    pub fn validate(&self) -> Result<(), KnobError> {
        if self.pages_to_scan == 0 || self.pages_to_scan > MAX_PAGES_TO_SCAN {
            return Err(KnobError::PagesToScan(self.pages_to_scan));
        }
        if self.sleep_millisecs > MAX_SLEEP_MILLISECS {
            return Err(KnobError::Sleep(self.sleep_millisecs));
        }
        if self.max_page_sharing < 2 {
            return Err(KnobError::MaxPageSharing(self.max_page_sharing));
        }
        if let Advisor::ScanTime {
            target_scan_secs,
            max_cpu_pct,
        } = self.advisor
        {
            if target_scan_secs == 0 || max_cpu_pct == 0 || max_cpu_pct > 100 {
                return Err(KnobError::Advisor);
            }
        }
        Ok(())
    }

    /// The knobs after `upd`, validated; `self` is unchanged.
    pub fn updated(&self, upd: &KnobsUpdate) -> Result<Knobs, KnobError> {
        let mut k = *self;
        if let Some(a) = upd.advisor {
            k.advisor = a;
        }
        if let Some(p) = upd.pages_to_scan {
            if k.advisor != Advisor::None {
                return Err(KnobError::AdvisorOwnsPagesToScan);
            }
            k.pages_to_scan = p;
        }
        if let Some(r) = upd.run {
            k.run = r;
        }
        if let Some(s) = upd.sleep_millisecs {
            k.sleep_millisecs = s;
        }
        if let Some(m) = upd.max_page_sharing {
            k.max_page_sharing = m;
        }
        if let Some(s) = upd.smart_scan {
            k.smart_scan = s;
        }
        k.validate()?;
        Ok(k)
    }
}
