//! What the driver sees of the balloon: feature bits, the configuration space, the queues
//! in the order the negotiated features give them, and the statistics tags.

/// The host must be told before the guest uses a deflated page (not offered).
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u32 = 0;
/// The statistics queue.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// The guest may deflate under memory pressure (out of memory) below the target.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// The free page hinting queue (not offered).
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u32 = 3;
/// Free page reporting: the reporting queue.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;

/// Size of the configuration space: `num_pages`, `actual`, `free_page_hint_cmd_id`,
/// `poison_val` (all little-endian `u32`).
pub const CONFIG_SIZE: usize = 16;
/// Offset of `num_pages` (the target, in 4 KiB pages; the device writes it).
pub const CONFIG_NUM_PAGES: u64 = 0;
/// Offset of `actual` (the balloon's size, in 4 KiB pages; the driver writes it).
pub const CONFIG_ACTUAL: u64 = 4;

/// The balloon's page unit (`VIRTIO_BALLOON_PFN_SHIFT`): PFNs on the inflate and deflate
/// queues are 4 KiB page numbers whatever the guest's page size.
pub const PFN_SHIFT: u32 = 12;
/// Bytes of one balloon page.
pub const BALLOON_PAGE: u64 = 1 << PFN_SHIFT;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// What a queue is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    /// PFNs the guest gives up.
    Inflate,
    /// PFNs the guest takes back.
    Deflate,
    /// The guest's memory statistics.
    Stats,
    /// Free page reporting: ranges the guest's allocator holds free.
    Reporting,
}

/// The role of queue `index` under the driver's `acked` features: inflate and deflate,
/// then the statistics queue if negotiated, then (no free page hinting) the reporting
/// queue if negotiated.
pub fn queue_role(index: u16, acked: u64) -> Option<QueueRole> {
    let mut roles = vec![QueueRole::Inflate, QueueRole::Deflate];
    if acked & (1 << VIRTIO_BALLOON_F_STATS_VQ) != 0 {
        roles.push(QueueRole::Stats);
    }
    if acked & (1 << VIRTIO_BALLOON_F_REPORTING) != 0 {
        roles.push(QueueRole::Reporting);
    }
    roles.get(usize::from(index)).copied()
}

/// One entry of the statistics buffer: `struct virtio_balloon_stat` (packed, 10 bytes).
pub const STAT_SIZE: usize = 10;

/// The statistics tags of the virtio specification, under Firecracker's field names.
pub const STAT_TAGS: [(u16, &str); 10] = [
    (0, "swap_in"),
    (1, "swap_out"),
    (2, "major_faults"),
    (3, "minor_faults"),
    (4, "free_memory"),
    (5, "total_memory"),
    (6, "available_memory"),
    (7, "disk_caches"),
    (8, "hugetlb_allocations"),
    (9, "hugetlb_failures"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reporting_queue_index_follows_the_negotiated_features() {
        let all = (1 << VIRTIO_BALLOON_F_STATS_VQ) | (1 << VIRTIO_BALLOON_F_REPORTING);
        assert_eq!(queue_role(2, all), Some(QueueRole::Stats));
        assert_eq!(queue_role(3, all), Some(QueueRole::Reporting));
        assert_eq!(
            queue_role(2, 1 << VIRTIO_BALLOON_F_REPORTING),
            Some(QueueRole::Reporting)
        );
        assert_eq!(queue_role(2, 0), None);
    }
}
