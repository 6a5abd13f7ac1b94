//! Write-intent bitmap (DESIGN.md §6, RESYNC.md): one bit per region of `region_bytes`, set for
//! every region a non-InSync plex may hold differently. Every in-sync node keeps one per stale
//! plex; the engine sets bits and emits `Command::MarkDirtyRegions` for the driver to persist
//! *before* the data write, and clears them (`ClearDirtyRegions`) as resync copies land.
//!
//! A bitset (`Vec<u64>` plus a count): a full resync of 1 TiB in 1 MiB regions is 1 M bits
//! (128 KiB), and finding the next dirty region skips empty words.

use super::msg::LbaRange;

/// Default region size (DESIGN.md §6: e.g. 1 MiB).
pub const REGION_BYTES_DEFAULT: u64 = 1 << 20;
/// Most regions a bitmap tracks (1 TiB in 1 MiB regions times 64): a range beyond is clipped
/// so a garbage LBA cannot make the map allocate without bound.
pub const REGIONS_MAX: u64 = 1 << 26;

/// Set of dirty regions, indexed by `lba * block_size / region_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMap {
    blocks_per_region: u64,
    words: Vec<u64>,
    count: u64,
}

impl DirtyMap {
    /// `region_bytes` is rounded to a whole number of blocks (at least one).
    pub fn new(block_size: u32, region_bytes: u64) -> DirtyMap {
        let bs = u64::from(block_size.max(1));
        DirtyMap {
            blocks_per_region: (region_bytes / bs).max(1),
            words: Vec::new(),
            count: 0,
        }
    }

    pub fn blocks_per_region(&self) -> u64 {
        self.blocks_per_region
    }

    /// Regions of a volume of `blocks` blocks.
    pub fn regions_of_volume(&self, blocks: u64) -> u64 {
        blocks.div_ceil(self.blocks_per_region).min(REGIONS_MAX)
    }

    /// The blocks of `region`, clipped to a volume of `volume_blocks` (0: unclipped).
    pub fn region_range(&self, region: u64, volume_blocks: u64) -> LbaRange {
        let lba = region.saturating_mul(self.blocks_per_region);
        let mut end = lba.saturating_add(self.blocks_per_region);
        if volume_blocks > 0 {
            end = end.min(volume_blocks.max(lba));
        }
        LbaRange {
            lba,
            blocks: u32::try_from(end - lba).unwrap_or(u32::MAX),
        }
    }

    /// Regions covering `r` (empty range: none), clipped to [`REGIONS_MAX`].
    fn region_span(&self, r: &LbaRange) -> std::ops::Range<u64> {
        if r.blocks == 0 {
            return 0..0;
        }
        // Beyond the limit: the last region (conservative; the LU refuses such LBAs anyway).
        let first = (r.lba / self.blocks_per_region).min(REGIONS_MAX - 1);
        let last = (r.end().saturating_sub(1) / self.blocks_per_region).min(REGIONS_MAX - 1);
        first..last.saturating_add(1).max(first)
    }

    /// Regions of `r` (ascending).
    pub fn regions_of(&self, r: &LbaRange) -> std::ops::Range<u64> {
        self.region_span(r)
    }

    /// Set one region; true if it was clear.
    pub fn set(&mut self, region: u64) -> bool {
        if region >= REGIONS_MAX {
            return false;
        }
        let (w, b) = ((region / 64) as usize, region % 64);
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        let was = self.words[w] & (1 << b) != 0;
        self.words[w] |= 1 << b;
        if !was {
            self.count += 1;
        }
        !was
    }

    /// Clear one region; true if it was set.
    pub fn clear(&mut self, region: u64) -> bool {
        let (w, b) = ((region / 64) as usize, region % 64);
        match self.words.get_mut(w) {
            Some(word) if *word & (1 << b) != 0 => {
                *word &= !(1 << b);
                self.count -= 1;
                true
            }
            _ => false,
        }
    }

    pub fn contains(&self, region: u64) -> bool {
        let (w, b) = ((region / 64) as usize, region % 64);
        self.words.get(w).is_some_and(|word| word & (1 << b) != 0)
    }

    /// Mark `r`; true if a region was newly set (the caller must persist it).
    pub fn mark(&mut self, r: &LbaRange) -> bool {
        !self.mark_new(r).is_empty()
    }

    /// Mark `r`; the regions newly set (the caller must persist them).
    pub fn mark_new(&mut self, r: &LbaRange) -> Vec<u64> {
        self.region_span(r).filter(|&g| self.set(g)).collect()
    }

    /// Set regions `0..n` (a full resync); the regions newly set.
    pub fn fill(&mut self, n: u64) -> Vec<u64> {
        (0..n.min(REGIONS_MAX)).filter(|&g| self.set(g)).collect()
    }

    /// Is every block of `r` inside a dirty region?
    pub fn covers(&self, r: &LbaRange) -> bool {
        self.region_span(r).all(|g| self.contains(g))
    }

    pub fn is_block_dirty(&self, lba: u64) -> bool {
        self.contains(lba / self.blocks_per_region)
    }

    /// First dirty region `>= from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut w = (from / 64) as usize;
        let mut mask = u64::MAX.checked_shl((from % 64) as u32).unwrap_or(0);
        while let Some(word) = self.words.get(w) {
            let m = word & mask;
            if m != 0 {
                return Some(w as u64 * 64 + u64::from(m.trailing_zeros()));
            }
            w += 1;
            mask = u64::MAX;
        }
        None
    }

    /// Dirty region indices, ascending.
    pub fn regions(&self) -> impl Iterator<Item = u64> + '_ {
        let mut next = self.next_set(0);
        std::iter::from_fn(move || {
            let r = next?;
            next = self.next_set(r + 1);
            Some(r)
        })
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Forget a region once resynced.
    pub fn clear_region(&mut self, region: u64) {
        self.clear(region);
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
        assert_eq!(d.len(), 1);
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

    #[test]
    fn bitset_finds_next_across_words_and_counts() {
        let mut d = DirtyMap::new(512, 4096);
        assert_eq!(d.fill(200).len(), 200);
        assert_eq!(d.len(), 200);
        for r in 0..200 {
            if r != 63 && r != 64 && r != 190 {
                assert!(d.clear(r));
            }
        }
        assert!(!d.clear(0), "already clear");
        assert_eq!(d.regions().collect::<Vec<_>>(), vec![63, 64, 190]);
        assert_eq!(d.next_set(65), Some(190));
        assert_eq!(d.next_set(191), None);
        assert_eq!(d.len(), 3);
        assert_eq!(
            d.mark_new(&LbaRange {
                lba: 63 * 8,
                blocks: 24
            }),
            vec![65]
        );
    }

    #[test]
    fn region_range_is_clipped_to_the_volume() {
        let d = DirtyMap::new(512, 4096);
        assert_eq!(d.region_range(2, 0), LbaRange { lba: 16, blocks: 8 });
        assert_eq!(d.region_range(2, 20), LbaRange { lba: 16, blocks: 4 });
        assert_eq!(d.regions_of_volume(20), 3);
    }
}
