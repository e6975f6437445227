//! The device's side of the rings: TX chains become packets for the connection table, RX
//! chains receive the packets the table chooses. Chains are parsed by `virtio-vsock`'s
//! [`VsockPacket`]; a chain it refuses is returned to the guest unused and logged once.

use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{GuestMemory, VolatileSlice};

use super::header::Header;
use super::host::HostSide;
use super::muxer::Muxer;
use super::problems::Problem;
use crate::virtio::GuestWrites;

/// The largest payload of one packet, either way (Linux's RX buffers are 4 KiB; its TX
/// packets at most 64 KiB).
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// The RX and TX queues with the memory they live in.
pub struct VsockQueues<M> {
    /// Guest memory.
    pub mem: M,
    /// Queue 0: packets to the guest.
    pub rx: Queue,
    /// Queue 1: packets from the guest.
    pub tx: Queue,
    /// Where RX writes are reported.
    pub writes: Arc<dyn GuestWrites>,
}

impl<M: GuestMemory> VsockQueues<M> {
    /// Handles every chain on the TX queue; `true` if any went to the used ring.
    pub fn process_tx(&mut self, mux: &mut Muxer, host: &HostSide) -> bool {
        let mem = &self.mem;
        let mut used = false;
        while let Some(mut chain) = self.tx.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => {
                    let hdr = Header::of(&pkt);
                    mux.on_guest_packet(host, &hdr, pkt.data_slice());
                }
                Err(e) => mux.problems.note_error(Problem::BadTxChain, &e),
            }
            if let Err(e) = self.tx.add_used(mem, head, 0) {
                mux.problems.note_error(Problem::BadQueue, &e);
            }
            used = true;
        }
        if used {
            report_used_ring(&self.tx, &*self.writes);
        }
        used
    }

    /// Fills RX chains while the table has packets for the guest; `true` if any went to the
    /// used ring.
    pub fn process_rx(&mut self, mux: &mut Muxer) -> bool {
        let mem = &self.mem;
        let mut used = false;
        while mux.has_rx() {
            let Some(mut chain) = self.rx.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let ranges: Vec<(u64, u32)> = chain
                .clone()
                .filter(|d| d.is_write_only())
                .take(2)
                .map(|d| (d.addr().0, d.len()))
                .collect();
            let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => {
                    let buf: Option<VolatileSlice<'_, _>> = pkt
                        .data_slice()
                        .map(|d| d.subslice(0, d.len().min(MAX_PKT_DATA as usize)))
                        .and_then(Result::ok);
                    match mux.next_rx(buf.as_ref()) {
                        Some(hdr) => {
                            // Zero first: fields a header does not set read as zero.
                            let _ = pkt.set_header_from_raw(&[0u8; PKT_HEADER_SIZE]);
                            hdr.write_to(&mut pkt);
                            PKT_HEADER_SIZE as u32 + hdr.len
                        }
                        None => {
                            // Nothing owed after all: the chain stays for the next packet.
                            self.rx.go_to_previous_position();
                            break;
                        }
                    }
                }
                Err(e) => {
                    mux.problems.note_error(Problem::BadRxChain, &e);
                    0
                }
            };
            if len > 0 {
                self.report_writes(&ranges, len);
            }
            if let Err(e) = self.rx.add_used(mem, head, len) {
                mux.problems.note_error(Problem::BadQueue, &e);
            }
            used = true;
        }
        if used {
            report_used_ring(&self.rx, &*self.writes);
        }
        used
    }

    /// Reports where a packet of `len` bytes went: as `VsockPacket` lays it out, the header
    /// and the payload share a lone descriptor, or the payload fills the second one.
    fn report_writes(&self, ranges: &[(u64, u32)], len: u32) {
        let header = PKT_HEADER_SIZE as u32;
        match ranges {
            [(gpa, _)] => self.writes.wrote(*gpa, u64::from(len)),
            [(hdr_gpa, _), (data_gpa, _), ..] => {
                self.writes.wrote(*hdr_gpa, u64::from(header));
                if len > header {
                    self.writes.wrote(*data_gpa, u64::from(len - header));
                }
            }
            [] => {}
        }
    }
}

/// The used ring is guest RAM the device writes too (through virtio-queue's `add_used`).
fn report_used_ring(queue: &Queue, writes: &dyn GuestWrites) {
    // flags, idx, ring[size], avail_event.
    let len = 4 + 8 * u64::from(queue.size()) + 2;
    writes.wrote(queue.used_ring(), len);
}
