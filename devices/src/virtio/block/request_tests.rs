//! Requests one by one: what each kind does to the image and to guest RAM, and what each
//! kind of malformed chain is answered with.

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::config::DiskConfig;
use super::worker::process_queue;
use crate::virtio::{GuestWrites, VirtioInterrupt};

const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0x1100;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

struct Nothing;
impl GuestWrites for Nothing {
    fn wrote(&self, _: u64, _: u64) {}
}
impl VirtioInterrupt for Nothing {
    fn signal_used_queue(&self, _: u16) -> std::io::Result<()> {
        Ok(())
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        Ok(())
    }
}

static CASE: AtomicU32 = AtomicU32::new(0);

struct Outcome {
    status: u8,
    used_len: u32,
    served: u16,
    mem: GuestMemoryMmap,
    image: Vec<u8>,
}

/// Serves one chain (`descs` from index 0) with header (`kind`, `sector`) on a 4-sector
/// image whose byte i is i % 251.
fn serve(descs: &[(u64, u32, u16, u16)], kind: u32, sector: u64, read_only: bool) -> Outcome {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    mem.write_slice(&[0xaa; 0x1_0000], GuestAddress(0)).unwrap();
    mem.write_obj(kind, GuestAddress(HDR)).unwrap();
    mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    for (i, &(a, l, f, n)) in descs.iter().enumerate() {
        mock.desc_table()
            .store(i as u16, RawDescriptor::from(Descriptor::new(a, l, f, n)))
            .unwrap();
    }
    mock.avail().ring().ref_at(0).unwrap().store(0);
    mock.avail().idx().store(1);
    let mut queue: Queue = mock.create_queue().unwrap();
    let path = std::env::temp_dir().join(format!(
        "tinyvmm-blk-req-{}-{}.img",
        std::process::id(),
        CASE.fetch_add(1, Ordering::Relaxed)
    ));
    let image: Vec<u8> = (0..2048).map(|i| (i % 251) as u8).collect();
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&image)
        .unwrap();
    let mut disk = DiskConfig {
        path: path.clone(),
        read_only,
    }
    .open()
    .unwrap();
    let mut broken = false;
    process_queue(&mem, &mut queue, &mut disk, &Nothing, &Nothing, &mut broken);
    drop(disk);
    let image = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let used_len = mem
        .read_obj::<u32>(GuestAddress(mock.used_addr().0 + 8))
        .unwrap();
    Outcome {
        status: mem.read_obj(GuestAddress(STATUS)).unwrap(),
        used_len,
        served: queue.next_used(),
        mem,
        image,
    }
}

fn chain(data_len: u32, data_flags: u16) -> Vec<(u64, u32, u16, u16)> {
    vec![
        (HDR, 16, NEXT, 1),
        (DATA, data_len, NEXT | data_flags, 2),
        (STATUS, 1, WRITE, 0),
    ]
}

#[test]
fn reads_writes_flushes_and_identifies() {
    let o = serve(&chain(1024, WRITE), VIRTIO_BLK_T_IN, 1, false);
    assert_eq!((o.status, o.used_len), (VIRTIO_BLK_S_OK as u8, 1025));
    let mut got = vec![0u8; 1024];
    o.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, o.image[512..1536]);

    let o = serve(&chain(512, 0), VIRTIO_BLK_T_OUT, 3, false);
    assert_eq!((o.status, o.used_len), (VIRTIO_BLK_S_OK as u8, 1));
    assert_eq!(o.image[1536..], [0xaa; 512]);

    let flush = [(HDR, 16, NEXT, 1), (STATUS, 1, WRITE, 0)];
    let o = serve(&flush, VIRTIO_BLK_T_FLUSH, 0, false);
    assert_eq!(o.status, VIRTIO_BLK_S_OK as u8);

    let o = serve(&chain(20, WRITE), VIRTIO_BLK_T_GET_ID, 0, true);
    assert_eq!(o.status, VIRTIO_BLK_S_OK as u8);
    let mut id = [0u8; 4];
    o.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"tvmm");
}

#[test]
fn a_read_only_disk_refuses_writes_with_ioerr() {
    let o = serve(&chain(512, 0), VIRTIO_BLK_T_OUT, 0, true);
    assert_eq!(o.status, VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(
        o.image[..512],
        (0..512).map(|i| (i % 251) as u8).collect::<Vec<_>>()[..]
    );
}

#[test]
fn out_of_range_or_malformed_requests_fail_without_touching_data() {
    let untouched = |o: &Outcome| {
        let mut got = vec![0u8; 512];
        o.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        got == [0xaa; 512]
    };
    // Past the end, at the last u64 sector, a partial sector.
    for (sector, len) in [(4, 512), (3, 1024), (u64::MAX, 512), (0, 100)] {
        let o = serve(&chain(len, WRITE), VIRTIO_BLK_T_IN, sector, false);
        assert_eq!(
            o.status, VIRTIO_BLK_S_IOERR as u8,
            "sector {sector} len {len}"
        );
        assert!(untouched(&o));
    }
    // An unknown type.
    let o = serve(&chain(512, WRITE), 77, 0, false);
    assert_eq!(o.status, VIRTIO_BLK_S_UNSUPP as u8);
    // A header too short, a device-writable header, data the wrong way round, a buffer
    // outside RAM: IOERR and nothing else written.
    let mut short = chain(512, WRITE);
    short[0].1 = 8;
    let mut writable_header = chain(512, WRITE);
    writable_header[0].2 |= WRITE;
    let mut outside = chain(512, WRITE);
    outside[1].0 = 0xffff_f000;
    for (what, c) in [
        ("short header", short),
        ("writable header", writable_header),
        ("read with a read-only buffer", chain(512, 0)),
        ("buffer outside RAM", outside),
    ] {
        let o = serve(&c, VIRTIO_BLK_T_IN, 0, false);
        assert_eq!(o.status, VIRTIO_BLK_S_IOERR as u8, "{what}");
        assert_eq!(o.used_len, 1, "{what}");
        assert!(untouched(&o), "{what}");
    }
}

#[test]
fn chains_without_a_status_byte_complete_with_nothing_written() {
    // A loop (descriptor 1 points back at 0), a read-only last descriptor, a status
    // outside RAM, a next index past the table.
    let looped = vec![(HDR, 16, NEXT, 1), (DATA, 512, NEXT | WRITE, 0)];
    let ro_status = vec![(HDR, 16, NEXT, 1), (STATUS, 1, 0, 0)];
    let outside = vec![(HDR, 16, NEXT, 1), (0x2_0000, 1, WRITE, 0)];
    let past = vec![(HDR, 16, NEXT, 40)];
    for (what, c) in [
        ("loop", looped),
        ("read-only status", ro_status),
        ("status outside RAM", outside),
        ("next past the table", past),
    ] {
        let o = serve(&c, VIRTIO_BLK_T_IN, 0, false);
        assert_eq!(o.served, 1, "{what}: the chain is completed");
        assert_eq!(o.used_len, 0, "{what}");
        assert_eq!(o.status, 0xaa, "{what}");
        let mut got = vec![0u8; 512];
        o.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [0xaa; 512], "{what}");
    }
}
