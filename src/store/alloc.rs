//! Block allocation in the extent space: first fit between `DATA_START` and
//! the area's end, around the blocks already in use. Every extent it is
//! given has passed decoding (`format`), so its end does not wrap.

use crate::format::{Extent, BLOCK, DATA_START};

/// The blocks in use, sorted, and the area they lie in.
pub(super) struct Allocator {
    area: u64,
    used: Vec<(u64, u64)>,
}

impl Allocator {
    pub(super) fn new(area: u64, in_use: impl Iterator<Item = Extent>) -> Self {
        let mut used: Vec<(u64, u64)> = in_use
            .filter(|e| e.len > 0)
            .map(|e| (e.start(), e.end()))
            .collect();
        used.sort_unstable();
        Allocator { area, used }
    }

    fn mark(&mut self, start: u64, end: u64) {
        let at = self.used.partition_point(|&(s, _)| s < start);
        self.used.insert(at, (start, end));
    }

    /// Takes the first free run of `len` bytes (rounded up to blocks).
    pub(super) fn alloc(&mut self, len: u32) -> Option<Extent> {
        self.take(len, |runs| runs.min_by_key(|&(s, _)| s))
    }

    /// Takes the smallest free run that holds `len` bytes (rounded up to
    /// blocks), lowest of equals: for an extent that must be contiguous
    /// (a directory), leaving longer runs to what needs them.
    pub(super) fn alloc_best(&mut self, len: u32) -> Option<Extent> {
        self.take(len, |runs| runs.min_by_key(|&(s, e)| (e - s, s)))
    }

    /// Takes `len` bytes (rounded up to blocks) at the start of the free run
    /// `pick` chooses among those that hold them.
    fn take(
        &mut self,
        len: u32,
        pick: impl FnOnce(&mut dyn Iterator<Item = (u64, u64)>) -> Option<(u64, u64)>,
    ) -> Option<Extent> {
        if len == 0 {
            return Some(Extent::default());
        }
        let size = u64::from(len).div_ceil(BLOCK) * BLOCK;
        let runs = self.free_runs();
        let mut fitting = runs.into_iter().filter(|&(s, e)| e - s >= size);
        let (start, _) = pick(&mut fitting)?;
        self.mark(start, start + size);
        Some(Extent { offset: start, len })
    }

    /// Takes `len` bytes (rounded up to blocks) exactly at `offset`, if free.
    pub(super) fn alloc_at(&mut self, offset: u64, len: u64) -> Option<Extent> {
        let end = offset.checked_add(len.div_ceil(BLOCK) * BLOCK)?;
        let free = offset >= DATA_START
            && end <= self.area
            && self.used.iter().all(|&(s, e)| e <= offset || s >= end);
        let len = u32::try_from(len).ok().filter(|_| free)?;
        self.mark(offset, end);
        Some(Extent { offset, len })
    }

    /// Every free run as `(start, end)`, lowest first.
    pub(super) fn free_runs(&self) -> Vec<(u64, u64)> {
        let mut free = Vec::new();
        let mut at = DATA_START;
        for &(s, e) in self.used.iter().chain([&(self.area, self.area)]) {
            if s > at {
                free.push((at, s.min(self.area)));
            }
            at = at.max(e);
        }
        free.retain(|(s, e)| e > s);
        free
    }

    /// Start of the largest free run (the lowest of equals), if any block is free.
    pub(super) fn largest_free(&self) -> Option<u64> {
        let mut best: Option<(u64, u64)> = None;
        for (s, e) in self.free_runs() {
            if best.is_none_or(|(_, len)| e - s > len) {
                best = Some((s, e - s));
            }
        }
        best.map(|(start, _)| start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_fills_gaps_first_and_respects_the_area() {
        let used = [
            Extent {
                offset: DATA_START,
                len: 10,
            },
            Extent {
                offset: DATA_START + 2 * BLOCK,
                len: 1,
            },
        ];
        let mut a = Allocator::new(DATA_START + 4 * BLOCK, used.into_iter());
        assert_eq!(a.alloc(100).unwrap().offset, DATA_START + BLOCK);
        assert_eq!(
            a.alloc(BLOCK as u32).unwrap().offset,
            DATA_START + 3 * BLOCK
        );
        assert!(a.alloc(1).is_none());
        assert_eq!(a.alloc(0), Some(Extent::default()));
    }

    #[test]
    fn best_fit_takes_the_smallest_run_that_holds_it() {
        let used = [Extent {
            offset: DATA_START + 2 * BLOCK,
            len: 1,
        }];
        // Free: 2 blocks at DATA_START, then 5 blocks after the used one.
        let mut a = Allocator::new(DATA_START + 8 * BLOCK, used.into_iter());
        assert_eq!(a.alloc_best(2 * BLOCK as u32).unwrap().offset, DATA_START);
        assert_eq!(a.alloc_best(1).unwrap().offset, DATA_START + 3 * BLOCK);
        assert!(a.alloc_best(5 * BLOCK as u32).is_none());
    }

    #[test]
    fn free_runs_and_the_largest_one_lie_between_used_blocks_inside_the_area() {
        let used = [Extent {
            offset: DATA_START + BLOCK,
            len: 1,
        }];
        let a = Allocator::new(DATA_START + 4 * BLOCK, used.into_iter());
        assert_eq!(
            a.free_runs(),
            vec![
                (DATA_START, DATA_START + BLOCK),
                (DATA_START + 2 * BLOCK, DATA_START + 4 * BLOCK)
            ]
        );
        assert_eq!(a.largest_free(), Some(DATA_START + 2 * BLOCK));
    }
}
