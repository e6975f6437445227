//! The ioctl numbers each thread kind may use, computed as the kernel's `_IOC` macros do.

/// `_IOC(dir, type, nr, size)`.
const fn ioc(dir: u64, ty: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}

const NONE: u64 = 0;
const WRITE: u64 = 1;
const READ: u64 = 2;

/// KVM's ioctl type.
const KVMIO: u64 = 0xAE;
/// userfaultfd's ioctl type.
const UFFDIO: u64 = 0xAA;

/// `KVM_RUN`.
pub(super) const KVM_RUN: u64 = ioc(NONE, KVMIO, 0x80, 0);
/// `KVM_GET_REGS` (a fault report reads RIP).
pub(super) const KVM_GET_REGS: u64 = ioc(READ, KVMIO, 0x81, 144);
/// `KVM_GET_SREGS`.
pub(super) const KVM_GET_SREGS: u64 = ioc(READ, KVMIO, 0x83, 312);
/// `KVM_GET_DIRTY_LOG` (on the VM fd).
pub(super) const KVM_GET_DIRTY_LOG: u64 = ioc(WRITE, KVMIO, 0x42, 16);
/// `UFFDIO_REGISTER`.
pub(super) const UFFDIO_REGISTER: u64 = ioc(READ | WRITE, UFFDIO, 0x00, 32);
/// `UFFDIO_UNREGISTER`.
pub(super) const UFFDIO_UNREGISTER: u64 = ioc(READ, UFFDIO, 0x01, 16);
/// `UFFDIO_WAKE`.
pub(super) const UFFDIO_WAKE: u64 = ioc(READ, UFFDIO, 0x02, 16);
/// `UFFDIO_WRITEPROTECT`.
pub(super) const UFFDIO_WRITEPROTECT: u64 = ioc(READ | WRITE, UFFDIO, 0x06, 24);
/// `FIONBIO` (set non-blocking).
pub(super) const FIONBIO: u64 = 0x5421;
/// `FIOCLEX` (set close-on-exec).
pub(super) const FIOCLEX: u64 = 0x5451;

/// vCPU threads: running the vCPU, reading its registers for a fault report.
pub(super) const VCPU: &[u64] = &[KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS];
/// The merge agent: the dirty log and userfaultfd write protection.
pub(super) const AGENT: &[u64] = &[
    KVM_GET_DIRTY_LOG,
    UFFDIO_REGISTER,
    UFFDIO_UNREGISTER,
    UFFDIO_WAKE,
    UFFDIO_WRITEPROTECT,
    FIONBIO,
];
/// The API threads: non-blocking and close-on-exec sockets.
pub(super) const API: &[u64] = &[FIONBIO, FIOCLEX];
/// The virtio-vsock thread: non-blocking and close-on-exec sockets.
pub(super) const VSOCK: &[u64] = &[FIONBIO, FIOCLEX];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_GET_DIRTY_LOG, 0x4010_ae42);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(FIONBIO, libc::FIONBIO);
        assert_eq!(FIOCLEX, libc::FIOCLEX);
    }
}
