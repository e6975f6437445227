//! Unit tests of the page mechanism on anonymous memory standing in for guest RAM.

use std::fs::File;
use std::os::fd::AsRawFd;

use tinyvmm_merge_protocol::{
    MergeOp, MergeOutcome, OpKind, PageRun, UnmergeOutcome, MAX_READ_PAGES, PAGE_SIZE,
};

use super::*;

/// Anonymous memory standing in for guest RAM; unmapped on drop.
struct TestRam {
    base: u64,
    len: usize,
}

// SAFETY: only an address and a length; the mapping is process-wide.
unsafe impl Send for TestRam {}

impl Drop for TestRam {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `ram`.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// `pages` of fresh RAM under a `SharedRam`, or `None` where userfaultfd write-protect
/// is not available to this process (the test is then skipped).
fn ram(pages: u64) -> Option<(SharedRam, u64)> {
    let len = (pages * PAGE) as usize;
    let base = mmap_anonymous(len);
    assert_ne!(base, libc::MAP_FAILED);
    let base = base as u64;
    let keep = TestRam { base, len };
    match SharedRam::new(
        vec![RamRange {
            hva: base,
            len: len as u64,
        }],
        Box::new(keep),
    ) {
        Ok(r) => Some((r, base)),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn fill(base: u64, page: u64, byte: u8) {
    // SAFETY: a page of the test's own RAM; no other thread touches it.
    unsafe { std::ptr::write_bytes((base + page * PAGE) as *mut u8, byte, PAGE_SIZE) };
}

/// Gives `ram` a pool of `frames` frames, read-only as the daemon sends it; returns the
/// daemon's writable handle.
fn with_pool(ram: &mut SharedRam, frames: u64) -> File {
    let f = tinyvmm_sys::memfd::create("pages-test-pool", 0).unwrap();
    f.set_len(frames * PAGE).unwrap();
    let ro = File::open(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
    ram.set_pool(OwnedFd::from(ro), frames * PAGE).unwrap();
    f
}

#[test]
fn unmerge_out_of_range_is_refused_not_a_panic() {
    let Some((mut ram, _)) = ram(8) else { return };
    let mut out = Vec::new();
    for bad in [vec![8], vec![0, 1, 1 << 40], vec![u64::MAX]] {
        assert!(
            matches!(ram.unmerge(&bad, &mut out), Err(PageError::Range(_))),
            "{bad:?}"
        );
    }
    // Pages that were never merged are private already.
    ram.unmerge(&[0, 7], &mut out).unwrap();
    assert_eq!(out, vec![UnmergeOutcome::Unmerged; 2]);
}

#[test]
fn digest_hashes_a_copy_of_each_page_and_keeps_dirty_bits_on_failure() {
    let Some((ram, base)) = ram(4) else { return };
    fill(base, 1, 0xab);
    let mut out = Vec::new();
    let mut dirty = Bitmap::new(4);
    dirty.set_all();
    ram.digest(&[PageRun { gfn: 0, len: 2 }], Some(&mut dirty), &mut out)
        .unwrap();
    assert_eq!(out.len(), 2);
    assert!(out[0].zero && out[0].hash == page_hash(&[0; PAGE_SIZE]));
    assert!(!out[1].zero && out[1].hash == page_hash(&[0xab; PAGE_SIZE]));
    assert_eq!(out[0].dirty, Some(true));
    assert!(!dirty.get(0) && !dirty.get(1) && dirty.get(2));
    // A request with a run outside RAM fails before it clears anything.
    let bad = [PageRun { gfn: 2, len: 1 }, PageRun { gfn: 3, len: 2 }];
    assert!(matches!(
        ram.digest(&bad, Some(&mut dirty), &mut out),
        Err(PageError::Range(_))
    ));
    assert!(dirty.get(2) && dirty.get(3));
}

#[test]
fn frames_written_by_the_daemon_from_read_pages_then_join_compares_in_place() {
    let Some((mut ram, base)) = ram(4) else {
        return;
    };
    let mut out = Vec::new();
    let populate = MergeOp {
        gfn: 0,
        len: 1,
        frame: 0,
        kind: OpKind::Populate,
    };
    assert!(matches!(
        ram.merge(&[populate], &mut out),
        Err(PageError::NoPool)
    ));
    let pool = with_pool(&mut ram, 16);
    // The agent never writes the pool: Populate is refused, and so is the fd's write.
    assert!(matches!(
        ram.merge(&[populate], &mut out),
        Err(PageError::Refused(_))
    ));
    for p in 0..3 {
        fill(base, p, 0x5a);
    }
    fill(base, 3, 0x5b);
    // The daemon's half of a populate: a copy of page 0, written into frame 3.
    let mut bytes = Vec::new();
    ram.read_pages(&[PageRun { gfn: 0, len: 1 }], &mut bytes)
        .unwrap();
    assert_eq!(bytes, vec![0x5a; PAGE_SIZE]);
    std::os::unix::fs::FileExt::write_all_at(&pool, &bytes, 3 * PAGE).unwrap();
    assert!(ram
        .read_pages(
            &[PageRun {
                gfn: 0,
                len: MAX_READ_PAGES as u32 + 1
            }],
            &mut bytes
        )
        .is_err());
    let join = |gfn| MergeOp {
        gfn,
        len: 1,
        frame: 3,
        kind: OpKind::Join,
    };
    ram.merge(&[join(0)], &mut out).unwrap();
    assert_eq!(out[0].outcome, MergeOutcome::Merged);
    let join = |gfn| MergeOp {
        gfn,
        len: 1,
        frame: 3,
        kind: OpKind::Join,
    };
    ram.merge(&[join(1), join(2), join(3)], &mut out).unwrap();
    let outcomes: Vec<_> = out.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [
            MergeOutcome::Merged,
            MergeOutcome::Merged,
            MergeOutcome::Mismatch
        ]
    );
    assert_eq!(ram.pool_mapped_pages(), 3);
    // Frames beyond the pool are refused before anything is remapped.
    let far = MergeOp {
        gfn: 3,
        len: 1,
        frame: 16,
        kind: OpKind::Join,
    };
    assert!(matches!(
        ram.merge(&[join(3), far], &mut out),
        Err(PageError::Range(_))
    ));
    // Merged pages unmerge with their content.
    let mut unmerged = Vec::new();
    ram.unmerge(&[0, 1, 2], &mut unmerged).unwrap();
    assert_eq!(unmerged, vec![UnmergeOutcome::Unmerged; 3]);
    assert_eq!(ram.pool_mapped_pages(), 0);
    // SAFETY: a page of the test's own RAM.
    let b = unsafe { *((base + PAGE + 17) as *const u8) };
    assert_eq!(b, 0x5a);
}

/// The digest's cost per page, copy included, against hashing in place (what it did
/// before it copied). `cargo test -p tinyvmm-vmm --release -- --ignored --nocapture
/// digest_cost`.
#[test]
#[ignore = "a measurement, not a check"]
fn digest_cost() {
    const PAGES: u64 = 16384;
    let Some((ram, base)) = ram(PAGES) else {
        return;
    };
    for p in 0..PAGES {
        fill(base, p, (p % 251) as u8 + 1);
    }
    let runs = [PageRun {
        gfn: 0,
        len: PAGES as u32,
    }];
    let mut out = Vec::new();
    let mut best_copy = f64::MAX;
    let mut best_in_place = f64::MAX;
    for _ in 0..20 {
        let t = std::time::Instant::now();
        ram.digest(&runs, None, &mut out).unwrap();
        best_copy = best_copy.min(t.elapsed().as_nanos() as f64 / PAGES as f64);
        let t = std::time::Instant::now();
        let mut x = 0u64;
        for p in 0..PAGES {
            // SAFETY: the test's own RAM, which nothing writes during the measurement.
            let page =
                unsafe { std::slice::from_raw_parts((base + p * PAGE) as *const u8, PAGE_SIZE) };
            x ^= page_hash(page);
        }
        std::hint::black_box(x);
        best_in_place = best_in_place.min(t.elapsed().as_nanos() as f64 / PAGES as f64);
    }
    eprintln!(
        "digest (copy + hash + zero check): {best_copy:.0} ns/page; hash in place: {best_in_place:.0} ns/page"
    );
}

/// A failed `mremap(MREMAP_FIXED)` may leave guest RAM unmapped: the copy is put back, in
/// a mapping of its own, with the guest's content.
#[test]
fn guest_ram_unmapped_by_a_failed_move_is_restored_with_its_content() {
    let Some((mut ram, base)) = ram(8) else {
        return;
    };
    for p in 0..8 {
        fill(base, p, 0x40 + p as u8);
    }
    let len = 4 * PAGE_SIZE;
    let hva = base + 2 * PAGE;
    let tmp = mmap_anonymous(len);
    assert_ne!(tmp, libc::MAP_FAILED);
    // SAFETY: test RAM and the test's own bounce buffer.
    unsafe { std::ptr::copy_nonoverlapping(hva as *const u8, tmp as *mut u8, len) };
    // What a late mremap failure leaves: part of the destination unmapped.
    // SAFETY: two pages of the test's own RAM.
    unsafe { libc::munmap((hva + PAGE) as *mut libc::c_void, 2 * PAGE_SIZE) };
    ram.put_back_after_failed_move(hva, tmp as u64, len)
        .unwrap();
    for p in 0..8u64 {
        // SAFETY: test RAM, mapped again.
        let b = unsafe { std::ptr::read_volatile((base + p * PAGE + 7) as *const u8) };
        assert_eq!(b, 0x40 + p as u8, "page {p}");
    }
    // A range still mapped is left alone.
    ram.put_back_after_failed_move(hva, tmp as u64, len)
        .unwrap();
    // SAFETY: the bounce buffer.
    unsafe { libc::munmap(tmp, len) };
}

/// Page `p`'s first byte, read through a raw pointer.
fn first_byte(base: u64, p: u64) -> u8 {
    // SAFETY: a page of the test's own RAM; no other thread touches it.
    unsafe { std::ptr::read_volatile((base + p * PAGE) as *const u8) }
}

#[test]
fn discarded_pages_read_zero_and_a_merged_one_reports_split_until_merged_again() {
    let Some((mut ram, base)) = ram(4) else {
        return;
    };
    let pool = with_pool(&mut ram, 4);
    for p in 0..4 {
        fill(base, p, 0x77);
    }
    // Frame 0 holds the content; pages 0 and 1 join it.
    std::os::unix::fs::FileExt::write_all_at(&pool, &[0x77; PAGE_SIZE], 0).unwrap();
    let join = |gfn| MergeOp {
        gfn,
        len: 1,
        frame: 0,
        kind: OpKind::Join,
    };
    let mut out = Vec::new();
    ram.merge(&[join(0), join(1)], &mut out).unwrap();
    assert_eq!(ram.pool_mapped_pages(), 2);

    // The guest gives up pages 1 (merged) and 2 (private) — one range.
    assert_eq!(ram.discard(base + PAGE, 2 * PAGE).unwrap(), 2);
    assert_eq!(ram.pages_reported(), 2);
    assert_eq!(
        first_byte(base, 0),
        0x77,
        "the other sharer keeps its content"
    );
    assert_eq!(first_byte(base, 1), 0, "not the frame's content");
    assert_eq!(first_byte(base, 2), 0);
    assert_eq!(first_byte(base, 3), 0x77);
    let mut given = Bitmap::new(4);
    ram.take_given_up(&mut given);
    assert_eq!(
        (0..4).map(|p| given.get(p)).collect::<Vec<_>>(),
        [false, true, true, false]
    );

    // The merged page now reads as a split (its frame reference goes), and zero.
    let mut d = Vec::new();
    ram.digest(&[PageRun { gfn: 0, len: 3 }], None, &mut d)
        .unwrap();
    assert!(!d[0].split && !d[0].zero);
    assert!(d[1].split && d[1].zero);
    assert!(!d[2].split && d[2].zero);

    // The zero reclaim the engine then asks for gives it plain anonymous memory again.
    let mut z = Vec::new();
    ram.reclaim_zero(&[1], &mut z).unwrap();
    ram.digest(&[PageRun { gfn: 1, len: 1 }], None, &mut d)
        .unwrap();
    assert!(!d[0].split && d[0].zero);
    assert_eq!(ram.pool_mapped_pages(), 1);

    // A write after the discard is the guest's own data.
    fill(base, 1, 0x42);
    assert_eq!(first_byte(base, 1), 0x42);
    // Outside RAM or unaligned: refused, nothing done.
    for (hva, len) in [
        (base + 4 * PAGE, PAGE),
        (base + 1, PAGE),
        (base, 0),
        (base, PAGE + 1),
    ] {
        assert!(
            matches!(ram.discard(hva, len), Err(PageError::Range(_))),
            "{hva:#x}+{len}"
        );
    }
    assert_eq!(first_byte(base, 0), 0x77);
}
