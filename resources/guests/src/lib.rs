//! tinyvmm's test guest kernel, built from `src-guest/` by `build.rs`.
//!
//! A small freestanding kernel that boots through the Linux 64-bit boot protocol
//! (as an ELF vmlinux or as a bzImage), drops to CPL3 and runs memory workloads
//! chosen on its command line (`workload=fill,verify ...`), reporting on the
//! serial console. See `README.md` in this crate for the boot contract, the
//! parameters, the exact serial lines and the exit codes.
//!
//! [`content`] is a host-side copy of the guest's page-content functions, so
//! tests can compute what a guest must have written (for example the `FILL`
//! checksum).

/// The test guest as an ELF vmlinux (PT_LOAD at physical 0x100000, entry 0x100200).
pub static TEST_GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

/// The test guest as a bzImage (payload loaded at `code32_start` 0x100000, 64-bit entry at +0x200).
pub static TEST_GUEST_BZIMAGE: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/testguest.bzImage"));

/// Physical address the guest is linked and loaded at.
pub const LOAD_ADDRESS: u64 = 0x10_0000;

/// The 64-bit entry point (load address + 0x200, as for a Linux bzImage).
pub const ENTRY_64: u64 = LOAD_ADDRESS + 0x200;

/// VMM exit status when the guest reports a failed check (debug-exit value 1).
pub const EXIT_STATUS_TEST_FAILED: i32 = 3;

/// VMM exit status on a guest exception or internal error (debug-exit value 2).
pub const EXIT_STATUS_GUEST_PANIC: i32 = 5;

/// The first serial line the guest prints, before any check.
pub const READY_LINE: &str = "TINYVMM TESTGUEST READY";

/// The guest's page classes and page contents, exactly as `src-guest/content.c`
/// computes them.
///
/// ```
/// use tinyvmm_guests::content::{page_class, page_contents, PageClass};
/// // Page 0 of seed 1 with the default mix (60 % shared, 20 % zero).
/// let class = page_class(1, 0, 60, 20);
/// let words = page_contents(1, 2, class, 0, 0);
/// assert_eq!(words.iter().all(|&w| w == 0), class == PageClass::Zero);
/// ```
pub mod content {
    /// Words of 8 bytes in a 4 KiB page.
    pub const WORDS_PER_PAGE: usize = 512;

    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    const CLASS_TAG: u64 = 0xc1a5_5c1a_55c1_a55c;

    /// What a page holds at version 0.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum PageClass {
        /// Same contents in every guest with the same `seed`.
        Shared,
        /// All zero bytes (at version 0).
        Zero,
        /// Contents derived from the guest's own `guest_seed`.
        Unique,
    }

    /// splitmix64's finalizer.
    pub fn mix64(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The class of page `index` (depends only on `seed`, so it is the same in all guests).
    pub fn page_class(seed: u64, index: u64, shared_pct: u64, zero_pct: u64) -> PageClass {
        let r = mix64(mix64(seed ^ CLASS_TAG) ^ index) % 100;
        if r < shared_pct {
            PageClass::Shared
        } else if r < shared_pct + zero_pct {
            PageClass::Zero
        } else {
            PageClass::Unique
        }
    }

    /// The key of (class, index, version): `guest_seed` for unique pages, `seed` otherwise.
    pub fn page_key(seed: u64, guest_seed: u64, class: PageClass, index: u64, version: u32) -> u64 {
        let k = if class == PageClass::Unique {
            guest_seed
        } else {
            seed
        };
        mix64(mix64(mix64(k) ^ index) ^ u64::from(version))
    }

    /// Word `j` of the page with key `key`.
    pub fn page_word(key: u64, j: usize) -> u64 {
        mix64(key.wrapping_add((j as u64 + 1).wrapping_mul(GOLDEN)))
    }

    /// The 512 words of page `index` at `version`.
    pub fn page_contents(
        seed: u64,
        guest_seed: u64,
        class: PageClass,
        index: u64,
        version: u32,
    ) -> [u64; WORDS_PER_PAGE] {
        let mut words = [0u64; WORDS_PER_PAGE];
        if class == PageClass::Zero && version == 0 {
            return words;
        }
        let key = page_key(seed, guest_seed, class, index, version);
        for (j, w) in words.iter_mut().enumerate() {
            *w = page_word(key, j);
        }
        words
    }

    /// Where content sits in guest-physical memory (`layout=` and `run=` on the guest's
    /// command line): fill page `i` holds the content of logical page [`Layout::logical`]`(i)`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub enum Layout {
        /// Logical page `i` at fill page `i` in every guest (the kindest layout).
        #[default]
        Same,
        /// A per-guest permutation (keyed by `guest_seed`) of all fill pages.
        Shuffled,
        /// Blocks of `run` pages, each block's class chosen per block, the whole blocks
        /// permuted per guest: shared content in runs of `run` pages.
        Clustered {
            /// Pages per block.
            run: u64,
        },
    }

    const PERM_TAG: u64 = 0x7065_726d_7574_6531;

    /// A keyed bijection on `[0, n)`: a 4-round Feistel network on the smallest even power
    /// of two ≥ `n`, cycle-walked into `[0, n)`.
    pub fn permute(key: u64, n: u64, mut x: u64) -> u64 {
        if n <= 1 {
            return x;
        }
        let mut bits = 64 - (n - 1).leading_zeros();
        if bits & 1 == 1 {
            bits += 1;
        }
        let half = bits / 2;
        let mask = (1u64 << half) - 1;
        loop {
            let (mut l, mut r) = (x >> half, x & mask);
            for round in 0..4u64 {
                let f = mix64(key ^ (round << 56) ^ r) & mask;
                let t = l ^ f;
                l = r;
                r = t;
            }
            x = (l << half) | r;
            if x < n {
                return x;
            }
        }
    }

    impl Layout {
        /// The `layout=` and `run=` words of the guest's command line.
        pub fn cmdline(&self) -> String {
            match self {
                Layout::Same => "layout=same".into(),
                Layout::Shuffled => "layout=shuffled".into(),
                Layout::Clustered { run } => format!("layout=clustered run={run}"),
            }
        }

        /// The logical page held by fill page `i` of a guest with `pages` fill pages and
        /// `guest_seed`.
        pub fn logical(&self, guest_seed: u64, pages: u64, i: u64) -> u64 {
            match *self {
                Layout::Same => i,
                Layout::Shuffled => permute(guest_seed ^ PERM_TAG, pages, i),
                Layout::Clustered { run } => {
                    let blocks = pages / run;
                    let b = i / run;
                    if b >= blocks {
                        i
                    } else {
                        permute(guest_seed ^ PERM_TAG, blocks, b) * run + i % run
                    }
                }
            }
        }

        /// The class of logical page `lp`.
        pub fn class(&self, p: &FillParams, lp: u64) -> PageClass {
            let index = match *self {
                Layout::Clustered { run } => lp / run,
                _ => lp,
            };
            page_class(p.seed, index, p.shared_pct, p.zero_pct)
        }
    }

    /// The parameters of a `fill` (the guest's defaults in [`FillParams::default`]).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct FillParams {
        /// `seed=`: shared content and page classes.
        pub seed: u64,
        /// `guest_seed=`: unique content.
        pub guest_seed: u64,
        /// `shared_pct=`.
        pub shared_pct: u64,
        /// `zero_pct=`.
        pub zero_pct: u64,
        /// `layout=` and `run=`.
        pub layout: Layout,
    }

    impl Default for FillParams {
        fn default() -> Self {
            FillParams {
                seed: 1,
                guest_seed: 2,
                shared_pct: 60,
                zero_pct: 20,
                layout: Layout::Same,
            }
        }
    }

    /// Whether the guest's `free` with `free_pct` releases fill page `i` of a guest with
    /// `guest_seed` (the pattern `verify` knows).
    pub fn freed(guest_seed: u64, i: u64, free_pct: u64) -> bool {
        mix64(guest_seed ^ 0x6672_6565_7061_6765 ^ i) % 100 < free_pct
    }

    /// The pages a fleet of guests (`guest_seeds`, `pages` fill pages each, all with
    /// `p`'s other parameters) needs at the least after each released `free_pct` % of its
    /// fill with `free`: one copy of each shared content some guest still holds, plus
    /// every unique page not released (zero pages need none).
    pub fn pages_needed_after_free(
        p: &FillParams,
        guest_seeds: &[u64],
        pages: u64,
        free_pct: u64,
    ) -> u64 {
        let mut shared = std::collections::HashSet::new();
        let mut unique = 0;
        for &g in guest_seeds {
            let q = FillParams {
                guest_seed: g,
                ..*p
            };
            for i in 0..pages {
                if freed(g, i, free_pct) {
                    continue;
                }
                let lp = q.layout.logical(g, pages, i);
                match q.layout.class(&q, lp) {
                    PageClass::Shared => {
                        shared.insert(lp);
                    }
                    PageClass::Unique => unique += 1,
                    PageClass::Zero => {}
                }
            }
        }
        shared.len() as u64 + unique
    }

    /// What a guest's `FILL done` line reports for `pages` pages:
    /// `(shared, zero, unique, checksum)`, the checksum being the wrapping sum of all words.
    pub fn fill_summary(p: &FillParams, pages: u64) -> (u64, u64, u64, u64) {
        let (mut shared, mut zero, mut unique, mut sum) = (0, 0, 0, 0u64);
        for i in 0..pages {
            let lp = p.layout.logical(p.guest_seed, pages, i);
            let class = p.layout.class(p, lp);
            match class {
                PageClass::Shared => shared += 1,
                PageClass::Zero => zero += 1,
                PageClass::Unique => unique += 1,
            }
            for w in page_contents(p.seed, p.guest_seed, class, lp, 0) {
                sum = sum.wrapping_add(w);
            }
        }
        (shared, zero, unique, sum)
    }
}

#[cfg(test)]
mod tests {
    use super::content::*;
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// (p_offset, p_paddr, p_vaddr, p_filesz, p_memsz) of every PT_LOAD.
    fn elf_loads(elf: &[u8]) -> Vec<(usize, u64, u64, usize, u64)> {
        let (phoff, phentsize, phnum) = (
            u64_at(elf, 32) as usize,
            u16_at(elf, 54) as usize,
            u16_at(elf, 56) as usize,
        );
        (0..phnum)
            .map(|i| &elf[phoff + i * phentsize..])
            .filter(|ph| u32_at(ph, 0) == 1)
            .map(|ph| {
                (
                    u64_at(ph, 8) as usize,
                    u64_at(ph, 24),
                    u64_at(ph, 16),
                    u64_at(ph, 32) as usize,
                    u64_at(ph, 40),
                )
            })
            .collect()
    }

    #[test]
    fn elf_header_is_x86_64_executable_entering_at_0x100200() {
        let e = TEST_GUEST_ELF;
        assert_eq!(&e[..4], b"\x7fELF");
        assert_eq!(e[4], 2, "ELFCLASS64");
        assert_eq!(e[5], 1, "little endian");
        assert_eq!(u16_at(e, 16), 2, "ET_EXEC");
        assert_eq!(u16_at(e, 18), 62, "EM_X86_64");
        assert_eq!(u64_at(e, 24), ENTRY_64);
    }

    #[test]
    fn elf_has_one_pt_load_at_physical_1mib() {
        let loads = elf_loads(TEST_GUEST_ELF);
        assert_eq!(loads.len(), 1, "{loads:?}");
        let (_, paddr, vaddr, filesz, memsz) = loads[0];
        assert_eq!(paddr, LOAD_ADDRESS);
        assert_eq!(vaddr, LOAD_ADDRESS);
        assert!(filesz > 0x200 && memsz >= filesz as u64);
    }

    #[test]
    fn bzimage_setup_header_follows_boot_protocol_2_15() {
        let b = TEST_GUEST_BZIMAGE;
        assert_eq!(u16_at(b, 0x1fe), 0xaa55, "boot_flag");
        assert_eq!(u32_at(b, 0x202), 0x5372_6448, "HdrS");
        assert_eq!(u16_at(b, 0x206), 0x020f, "version");
        assert_eq!(b[0x211] & 0x01, 0x01, "loadflags LOADED_HIGH");
        assert_eq!(u32_at(b, 0x214), 0x10_0000, "code32_start");
        assert_eq!(
            u16_at(b, 0x236) & 0x3,
            0x3,
            "xloadflags KERNEL_64 | CAN_BE_LOADED_ABOVE_4G"
        );
        assert_eq!(u32_at(b, 0x238), 2047, "cmdline_size");
        let align = u32_at(b, 0x230);
        assert!(align.is_power_of_two(), "kernel_alignment {align:#x}");
        let setup_sects = b[0x1f1] as usize;
        assert!(setup_sects >= 1);
        let payload_len = b.len() - (setup_sects + 1) * 512;
        assert_eq!(
            u32_at(b, 0x1f4) as usize,
            payload_len.div_ceil(16),
            "syssize"
        );
        let init_size = u32_at(b, 0x260) as usize;
        assert!(
            init_size >= payload_len,
            "init_size {init_size:#x} < payload {payload_len:#x}"
        );
        let (_, _, _, _, memsz) = elf_loads(TEST_GUEST_ELF)[0];
        assert!(
            init_size as u64 >= memsz,
            "init_size covers .bss and stacks"
        );
        let kv = u16_at(b, 0x20e) as usize + 0x200;
        assert!(
            b[kv..].starts_with(b"tinyvmm-testguest"),
            "kernel_version string"
        );
    }

    #[test]
    fn bzimage_payload_is_the_elf_segment_with_entry_at_0x200() {
        let b = TEST_GUEST_BZIMAGE;
        let payload = &b[(b[0x1f1] as usize + 1) * 512..];
        let (off, _, _, filesz, _) = elf_loads(TEST_GUEST_ELF)[0];
        assert_eq!(payload, &TEST_GUEST_ELF[off..off + filesz]);
        // startup_64 begins with `cli` (0xfa), the 32-bit entry at 0 with `ud2` (0f 0b).
        assert_eq!(payload[0x200], 0xfa);
        assert_eq!(&payload[..2], &[0x0f, 0x0b]);
    }

    #[test]
    fn page_classes_follow_the_requested_percentages() {
        let n = 100_000;
        let mut counts = [0u64; 3];
        for i in 0..n {
            counts[page_class(1, i, 60, 20) as usize] += 1;
        }
        assert!((59_000..61_000).contains(&counts[0]), "{counts:?}");
        assert!((19_000..21_000).contains(&counts[1]), "{counts:?}");
        assert!((19_000..21_000).contains(&counts[2]), "{counts:?}");
        // The class depends on seed only, never on guest_seed.
        assert_eq!(page_class(7, 123, 100, 0), PageClass::Shared);
        assert_eq!(page_class(7, 123, 0, 100), PageClass::Zero);
        assert_eq!(page_class(7, 123, 0, 0), PageClass::Unique);
    }

    #[test]
    fn shared_pages_match_across_guest_seeds_and_unique_pages_do_not() {
        let a = page_contents(1, 2, PageClass::Shared, 5, 0);
        let b = page_contents(1, 3, PageClass::Shared, 5, 0);
        assert_eq!(a, b);
        let c = page_contents(1, 2, PageClass::Unique, 5, 0);
        let d = page_contents(1, 3, PageClass::Unique, 5, 0);
        assert_ne!(c, d);
        assert_ne!(
            page_contents(1, 2, PageClass::Shared, 5, 1),
            a,
            "a new version differs"
        );
        // Rewritten zero pages use the shared seed: still identical across guests.
        assert_eq!(
            page_contents(1, 2, PageClass::Zero, 9, 3),
            page_contents(1, 4, PageClass::Zero, 9, 3)
        );
    }

    #[test]
    fn mix64_matches_splitmix64_reference_values() {
        // splitmix64 with state 0: first output is mix64(0x9e3779b97f4a7c15).
        assert_eq!(mix64(0x9e37_79b9_7f4a_7c15), 0xe220_a839_7b1d_cdaf);
        assert_eq!(mix64(0), 0);
    }

    /// Known answer from a real guest run (`tinyvmm run --mem 256M --cmdline workload=fill`):
    /// `FILL done pages=65178 shared=38875 zero=13287 unique=13016 checksum=0x1569119889d193e7`.
    /// Ties the Rust copy of the content functions to the C one.
    #[test]
    fn fill_summary_matches_the_guest_fill_line() {
        assert_eq!(
            fill_summary(&FillParams::default(), 65178),
            (38875, 13287, 13016, 0x1569_1198_89d1_93e7)
        );
        // `workload=fill mib=64 seed=7 guest_seed=9 shared_pct=30 zero_pct=50`.
        let p = FillParams {
            seed: 7,
            guest_seed: 9,
            shared_pct: 30,
            zero_pct: 50,
            layout: Layout::Same,
        };
        assert_eq!(
            fill_summary(&p, 16384),
            (4973, 8168, 3243, 0xddc9_4b5f_250c_fc21)
        );
    }

    #[test]
    fn layouts_are_bijections_onto_the_fill_pages() {
        for pages in [1u64, 2, 3, 1000, 4096, 65178] {
            for layout in [
                Layout::Same,
                Layout::Shuffled,
                Layout::Clustered { run: 16 },
                Layout::Clustered { run: 7 },
            ] {
                let mut seen = vec![false; pages as usize];
                for i in 0..pages {
                    let lp = layout.logical(5, pages, i);
                    assert!(lp < pages && !seen[lp as usize], "{layout:?} {pages} {i}");
                    seen[lp as usize] = true;
                }
            }
        }
    }

    #[test]
    fn shuffled_guests_hold_the_same_content_at_different_addresses() {
        let pages = 4096;
        let (a, b) = (Layout::Shuffled, Layout::Shuffled);
        let moved = (0..pages)
            .filter(|&i| a.logical(2, pages, i) != b.logical(3, pages, i))
            .count();
        assert!(
            moved > pages as usize * 9 / 10,
            "{moved} of {pages} pages moved"
        );
        // A permutation: the same pages and content as `same`, so the same summary.
        let same = FillParams::default();
        let shuffled = FillParams {
            layout: Layout::Shuffled,
            ..same
        };
        assert_eq!(fill_summary(&same, pages), fill_summary(&shuffled, pages));
    }

    #[test]
    fn clustered_layout_keeps_shared_content_in_runs() {
        let p = FillParams {
            layout: Layout::Clustered { run: 16 },
            ..FillParams::default()
        };
        let pages = 16 * 256;
        let classes: Vec<PageClass> = (0..pages)
            .map(|i| p.layout.class(&p, p.layout.logical(p.guest_seed, pages, i)))
            .collect();
        for block in classes.chunks(16) {
            assert!(block.iter().all(|c| *c == block[0]));
        }
        let (s, z, u, _) = fill_summary(&p, pages);
        assert_eq!(s + z + u, pages);
        assert!(s > pages / 2 && s < pages * 7 / 10, "{s} shared of {pages}");
    }

    #[test]
    fn fill_summary_counts_every_page() {
        let (s, z, u, _) = fill_summary(&FillParams::default(), 1000);
        assert_eq!(s + z + u, 1000);
    }
}
