//! In-memory write-intent bitmap (DESIGN.md §6): one bit per region of `region_bytes`,
//! set for every region a Stale plex may hold differently. The engine sets bits and emits
//! `Command::MarkDirty` for the driver to persist *before* the data write; the resync issue
//! persists and clears it.

use std::collections::BTreeSet;

use super::msg::LbaRange;

/// Default region size (DESIGN.md §6: e.g. 1 MiB).
pub const REGION_BYTES_DEFAULT: u64 = 1 << 20;

/// Set of dirty regions, indexed by `lba * block_size / region_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMap {
    blocks_per_region: u64,
    regions: BTreeSet<u64>,
}

impl DirtyMap {
    /// `region_bytes` is rounded to a whole number of blocks (at least one).
    pub fn new(block_size: u32, region_bytes: u64) -> DirtyMap {
        let bs = u64::from(block_size.max(1));
        DirtyMap {
            blocks_per_region: (region_bytes / bs).max(1),
            regions: BTreeSet::new(),
        }
    }

    pub fn blocks_per_region(&self) -> u64 {
        self.blocks_per_region
    }

    /// Regions covering `r` (empty range: none).
    fn region_span(&self, r: &LbaRange) -> std::ops::RangeInclusive<u64> {
        let first = r.lba / self.blocks_per_region;
        let last = r.end().saturating_sub(1) / self.blocks_per_region;
        first..=last
    }

    /// Mark `r`; true if a region was newly set (the caller must persist it).
    pub fn mark(&mut self, r: &LbaRange) -> bool {
        if r.blocks == 0 {
            return false;
        }
        let mut new = false;
        for g in self.region_span(r) {
            new |= self.regions.insert(g);
        }
        new
    }

    /// Is every block of `r` inside a dirty region?
    pub fn covers(&self, r: &LbaRange) -> bool {
        r.blocks == 0 || self.region_span(r).all(|g| self.regions.contains(&g))
    }

    pub fn is_block_dirty(&self, lba: u64) -> bool {
        self.regions.contains(&(lba / self.blocks_per_region))
    }

    /// Dirty region indices, ascending.
    pub fn regions(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.iter().copied()
    }

    pub fn len(&self) -> usize {
        self.regions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Forget a region once resynced.
    pub fn clear_region(&mut self, region: u64) {
        self.regions.remove(&region);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_region_a_range_touches() {
        // 4 KiB regions of 512-byte blocks = 8 blocks per region.
        let mut d = DirtyMap::new(512, 4096);
        assert!(d.mark(&LbaRange { lba: 6, blocks: 4 })); // blocks 6..10: regions 0 and 1
        assert_eq!(d.regions().collect::<Vec<_>>(), vec![0, 1]);
        assert!(!d.mark(&LbaRange { lba: 0, blocks: 16 }), "nothing new");
        assert!(d.covers(&LbaRange { lba: 0, blocks: 16 }));
        assert!(!d.covers(&LbaRange { lba: 15, blocks: 2 }));
        assert!(!d.mark(&LbaRange { lba: 99, blocks: 0 }));
        d.clear_region(0);
        assert!(!d.is_block_dirty(3));
        assert!(d.is_block_dirty(8));
    }

    #[test]
    fn range_at_the_end_of_u64_does_not_overflow() {
        let mut d = DirtyMap::new(512, 1 << 20);
        assert!(d.mark(&LbaRange {
            lba: u64::MAX - 1,
            blocks: 10
        }));
        assert_eq!(d.len(), 1);
    }
}
