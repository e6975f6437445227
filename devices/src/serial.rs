//! The 16550 UART at COM1: guest output to a writer, host input to the guest.
//!
//! The register model is vm-superio's. Interrupts go to the guest through an eventfd that
//! the VMM registers as an irqfd on the UART's GSI. Host input is read from a file
//! descriptor (stdin) by [`SerialInput`], an event-manager subscriber that stops polling
//! its input while the UART's receive FIFO is full and resumes when the guest drains it,
//! so nothing typed is dropped.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::{lock, BusDevice};

/// Base port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's legacy IRQ line.
pub const COM1_IRQ: u32 = 4;
/// Ports claimed by a UART.
pub const UART_LEN: u16 = 8;

/// Raises the UART interrupt by writing an eventfd (an irqfd in KVM).
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the input side when the guest has drained the receive FIFO.
#[derive(Debug)]
pub struct InputEvents {
    buffer_empty: EventFd,
}

impl SerialEvents for InputEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // Only fails on counter overflow: the reader drains it on every wake-up.
        let _ = self.buffer_empty.write(1);
    }
}

/// A writer that hands every byte straight to stdout, so partial lines (prompts) show.
#[derive(Debug, Default)]
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stdout().lock().flush()
    }
}

/// The UART as a bus device.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, InputEvents, Box<dyn Write + Send>>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialDevice")
    }
}

impl SerialDevice {
    /// A UART raising `irq` and writing guest output to `out`. Returns the device and the
    /// eventfd that becomes readable when the receive FIFO empties.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> io::Result<(Self, EventFd)> {
        let buffer_empty = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let events = InputEvents {
            buffer_empty: buffer_empty.try_clone()?,
        };
        Ok((
            Self {
                uart: Serial::with_events(IrqTrigger(irq), events, out),
            },
            buffer_empty,
        ))
    }

    /// Free room in the receive FIFO.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.uart
            .enqueue_raw_bytes(bytes)
            .map_err(|e| io::Error::other(format!("{e:?}")))
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = self.uart.read(offset as u8);
        data.fill(v);
    }
    fn write(&mut self, offset: u16, data: &[u8]) {
        if let Some(v) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, *v) {
                tracing::warn!("serial write failed: {e:?}");
            }
        }
    }
}

const INPUT: u32 = 1;
const BUFFER_EMPTY: u32 = 2;

/// Feeds host input (a non-blocking-readable fd such as stdin) into the UART.
#[derive(Debug)]
pub struct SerialInput {
    serial: Arc<Mutex<SerialDevice>>,
    input: RawFd,
    buffer_empty: EventFd,
    input_registered: bool,
    eof: bool,
}

impl SerialInput {
    /// Reads `input` into `serial`; `buffer_empty` comes from [`SerialDevice::new`].
    pub fn new(serial: Arc<Mutex<SerialDevice>>, input: RawFd, buffer_empty: EventFd) -> Self {
        Self {
            serial,
            input,
            buffer_empty,
            input_registered: false,
            eof: false,
        }
    }

    fn register_input(&mut self, ops: &mut EventOps) {
        if self.input_registered || self.eof {
            return;
        }
        match ops.add(Events::with_data_raw(self.input, INPUT, EventSet::IN)) {
            Ok(()) => self.input_registered = true,
            Err(e) => {
                // A regular file or /dev/null cannot be polled: treat it as no input.
                tracing::debug!("serial input fd {} not pollable: {e:?}", self.input);
                self.eof = true;
            }
        }
    }

    fn unregister_input(&mut self, ops: &mut EventOps) {
        if self.input_registered {
            let _ = ops.remove(Events::with_data_raw(self.input, INPUT, EventSet::IN));
            self.input_registered = false;
        }
    }

    fn pump(&mut self, ops: &mut EventOps) {
        let mut serial = lock(&self.serial);
        let room = serial.fifo_capacity();
        if room == 0 {
            drop(serial);
            self.unregister_input(ops);
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        // SAFETY: `buf` is valid for `want` bytes; `input` is an open fd owned by the caller.
        let n = unsafe { libc::read(self.input, buf.as_mut_ptr().cast(), want) };
        match n {
            0 => {
                drop(serial);
                self.eof = true;
                self.unregister_input(ops);
            }
            n if n > 0 => {
                if let Err(e) = serial.enqueue(&buf[..n as usize]) {
                    tracing::warn!("serial input dropped: {e}");
                }
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!("serial input read failed: {e}");
                    drop(serial);
                    self.eof = true;
                    self.unregister_input(ops);
                }
            }
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            INPUT => {
                if events
                    .event_set()
                    .intersects(EventSet::HANG_UP | EventSet::ERROR)
                    && !events.event_set().contains(EventSet::IN)
                {
                    self.eof = true;
                    self.unregister_input(ops);
                    return;
                }
                self.pump(ops);
            }
            BUFFER_EMPTY => {
                let _ = self.buffer_empty.read();
                self.register_input(ops);
            }
            _ => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.buffer_empty,
            BUFFER_EMPTY,
            EventSet::IN,
        )) {
            tracing::warn!("cannot watch the serial FIFO: {e:?}");
        }
        self.register_input(ops);
    }
}

impl AsRawFd for SerialInput {
    fn as_raw_fd(&self) -> RawFd {
        self.input
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Capture(mpsc::Sender<u8>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            for b in buf {
                self.0.send(*b).unwrap();
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_output_reaches_writer_and_input_reaches_guest() {
        let (tx, rx) = mpsc::channel();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let (mut dev, _empty) =
            SerialDevice::new(irq.try_clone().unwrap(), Box::new(Capture(tx))).unwrap();
        dev.write(0, b"A");
        assert_eq!(rx.try_recv().unwrap(), b'A');
        // Enable the "received data available" interrupt, then queue input.
        dev.write(1, &[0x01]);
        assert_eq!(dev.enqueue(b"hi").unwrap(), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut b = [0u8];
        dev.read(5, &mut b);
        assert_eq!(b[0] & 1, 1, "LSR data ready");
        dev.read(0, &mut b);
        assert_eq!(b[0], b'h');
    }
}
