//! One virtio-blk request: its descriptor chain parsed into a header, data buffers and a
//! status byte, then executed against the disk image.
//!
//! The chain is walked with `virtio-queue` (which stops at loops and bad indices); the
//! framing is checked here: a device-readable header of at least 16 bytes first, a
//! device-writable status byte last (the last byte of the last descriptor), data buffers in
//! between, device-writable for reads and `GET_ID`, device-readable for writes. Every
//! buffer must lie in guest RAM before any byte moves, so a bad request writes nothing but
//! its status. A chain without a usable status byte is completed with nothing written.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::virtio::GuestWrites;

/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;
/// The request header: type, reserved, sector.
const HEADER_LEN: u32 = 16;

/// The kind of request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the data buffers.
    In,
    /// Write the data buffers to sectors.
    Out,
    /// Make written data durable.
    Flush,
    /// The device's ID string.
    GetId,
    /// Anything else.
    Unsupported(u32),
}

impl RequestType {
    fn from_raw(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            other => Self::Unsupported(other),
        }
    }

    /// Whether the data buffers are written by the device.
    fn device_writes_data(self) -> bool {
        matches!(self, Self::In | Self::GetId)
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestType,
    /// The first sector.
    pub sector: u64,
    /// Data buffers, in order.
    pub data: Vec<(GuestAddress, u32)>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// No device-writable status byte in guest RAM: the request cannot be answered.
    NoStatus,
    /// A status byte exists, but the rest is malformed: answer `IOERR`.
    Malformed(GuestAddress),
}

/// Splits a chain into header, data and status, checking every buffer against guest RAM.
pub fn parse<M>(chain: DescriptorChain<M>) -> Result<Request, ParseError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mem = chain.memory();
    let descs: Vec<_> = chain.clone().collect();
    let Some(last) = descs.last() else {
        return Err(ParseError::NoStatus);
    };
    // A chain virtio-queue cut short (a loop, an index past the table) ends in a
    // descriptor that still points on: it is not a request.
    if last.has_next() || !last.is_write_only() || last.len() == 0 {
        return Err(ParseError::NoStatus);
    }
    let status = match last.addr().checked_add(u64::from(last.len()) - 1) {
        Some(a) if mem.check_range(a, 1, Permissions::Write) => a,
        _ => return Err(ParseError::NoStatus),
    };
    let bad = Err(ParseError::Malformed(status));
    if descs.len() < 2 {
        return bad;
    }
    let head = &descs[0];
    if head.is_write_only() || head.len() < HEADER_LEN {
        return bad;
    }
    let Ok(raw_type) = mem.read_obj::<u32>(head.addr()) else {
        return bad;
    };
    let Some(Ok(sector)) = head.addr().checked_add(8).map(|a| mem.read_obj::<u64>(a)) else {
        return bad;
    };
    let kind = RequestType::from_raw(raw_type);
    let mut data = Vec::with_capacity(descs.len() - 2);
    for d in &descs[1..descs.len() - 1] {
        let access = if kind.device_writes_data() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if d.is_write_only() != kind.device_writes_data()
            || !mem.check_range(d.addr(), d.len() as usize, access)
        {
            return bad;
        }
        data.push((d.addr(), d.len()));
    }
    Ok(Request {
        kind,
        sector: u64::from_le(sector),
        data,
        status,
    })
}

/// The disk a request runs against.
#[derive(Debug)]
pub struct Disk {
    /// The image.
    pub file: File,
    /// Its size in sectors.
    pub sectors: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// The `GET_ID` string (at most 20 bytes, zero-padded).
    pub id: [u8; VIRTIO_BLK_ID_BYTES as usize],
}

/// What executing a request produced: its status and the bytes written into device-writable
/// buffers (data and status), for the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// `VIRTIO_BLK_S_*`.
    pub status: u8,
    /// Bytes written into the driver's buffers.
    pub written: u32,
}

impl Request {
    /// Answers a malformed request: `IOERR` at `status`; returns the bytes written.
    pub fn ioerr<M: GuestMemory>(mem: &M, status: GuestAddress, writes: &dyn GuestWrites) -> u32 {
        match mem.write_obj(VIRTIO_BLK_S_IOERR as u8, status) {
            Ok(()) => {
                writes.wrote(status.raw_value(), 1);
                1
            }
            Err(_) => 0,
        }
    }

    fn data_len(&self) -> u64 {
        self.data.iter().map(|(_, l)| u64::from(*l)).sum()
    }

    /// The byte range `[start, end)` of the disk the data covers, if it is whole sectors
    /// inside the disk.
    fn disk_range(&self, disk: &Disk) -> Option<u64> {
        let len = self.data_len();
        if !len.is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let end = self.sector.checked_add(len / SECTOR_SIZE)?;
        (end <= disk.sectors).then(|| self.sector * SECTOR_SIZE)
    }

    /// Runs the request, writes its status byte and reports every range written.
    pub fn execute<M: GuestMemory>(
        &self,
        mem: &M,
        disk: &mut Disk,
        writes: &dyn GuestWrites,
    ) -> Outcome {
        let (status, data_written) = match self.kind {
            RequestType::In => self.read(mem, disk, writes),
            RequestType::Out if disk.read_only => (VIRTIO_BLK_S_IOERR, 0),
            RequestType::Out => (self.write(mem, disk), 0),
            RequestType::Flush if disk.read_only => (VIRTIO_BLK_S_OK, 0),
            RequestType::Flush => match disk.file.sync_data() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    tracing::warn!("virtio-blk: flush failed: {e}");
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            RequestType::GetId => self.get_id(mem, disk, writes),
            RequestType::Unsupported(_) => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        let status = status as u8;
        let written = match mem.write_obj(status, self.status) {
            Ok(()) => {
                writes.wrote(self.status.raw_value(), 1);
                data_written + 1
            }
            Err(_) => data_written,
        };
        Outcome { status, written }
    }

    fn read<M: GuestMemory>(
        &self,
        mem: &M,
        disk: &mut Disk,
        writes: &dyn GuestWrites,
    ) -> (u32, u32) {
        let Some(mut offset) = self.disk_range(disk) else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let mut written = 0u32;
        for &(addr, len) in &self.data {
            let res = disk
                .file
                .seek(SeekFrom::Start(offset))
                .map_err(|e| e.to_string())
                .and_then(|_| {
                    mem.read_exact_volatile_from(addr, &mut disk.file, len as usize)
                        .map_err(|e| e.to_string())
                });
            // Whatever happened, the buffer may have been written.
            writes.wrote(addr.raw_value(), u64::from(len));
            if let Err(e) = res {
                tracing::warn!("virtio-blk: read at {offset} failed: {e}");
                return (VIRTIO_BLK_S_IOERR, written);
            }
            written = written.saturating_add(len);
            offset += u64::from(len);
        }
        (VIRTIO_BLK_S_OK, written)
    }

    fn write<M: GuestMemory>(&self, mem: &M, disk: &mut Disk) -> u32 {
        let Some(mut offset) = self.disk_range(disk) else {
            return VIRTIO_BLK_S_IOERR;
        };
        for &(addr, len) in &self.data {
            let res = disk
                .file
                .seek(SeekFrom::Start(offset))
                .map_err(|e| e.to_string())
                .and_then(|_| {
                    mem.write_all_volatile_to(addr, &mut disk.file, len as usize)
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = res {
                tracing::warn!("virtio-blk: write at {offset} failed: {e}");
                return VIRTIO_BLK_S_IOERR;
            }
            offset += u64::from(len);
        }
        VIRTIO_BLK_S_OK
    }

    fn get_id<M: GuestMemory>(&self, mem: &M, disk: &Disk, writes: &dyn GuestWrites) -> (u32, u32) {
        let mut id = &disk.id[..];
        let mut written = 0;
        for &(addr, len) in &self.data {
            let n = id.len().min(len as usize);
            if n == 0 {
                break;
            }
            if mem.write_slice(&id[..n], addr).is_err() {
                return (VIRTIO_BLK_S_IOERR, written);
            }
            writes.wrote(addr.raw_value(), n as u64);
            written += n as u32;
            id = &id[n..];
        }
        (VIRTIO_BLK_S_OK, written)
    }
}
