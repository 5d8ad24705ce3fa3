//! Where a commit's blocks go, and the buffer they are written from.
//!
//! A commit chains when its whole run fits at the block the current header
//! named; otherwise it anchors in the other slot, with its blobs and
//! directory in one run if one is free, else wherever first fit puts them.

use super::alloc::Allocator;
use super::recover::{Chain, Generation};
use super::StoreError;
use crate::format::{Extent, BLOCK, EMBEDDED_DIRECTORY_MAX, SLOT_BYTES};
use crate::image::PageBuf;

/// Bytes of the whole blocks `len` bytes take.
pub(super) fn blocks(len: u32) -> u64 {
    u64::from(len).div_ceil(BLOCK) * BLOCK
}

/// Where a commit's blocks go.
pub(super) struct Layout {
    /// Area offset of the header: the first block of a chained commit's run,
    /// or the slot an anchored commit writes.
    pub(super) header_at: u64,
    /// One extent per staged blob, in order.
    pub(super) blobs: Vec<Extent>,
    /// Area offset of the directory and the bytes reserved for it there.
    pub(super) dir_at: u64,
    pub(super) dir_room: u64,
    /// What is written, as (area offset, length): one contiguous run for a
    /// chained commit; for an anchored one its slot's block, plus one run or,
    /// when free space is too fragmented, one region per extent.
    pub(super) regions: Vec<(u64, u64)>,
}

/// How a commit may place its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Placement {
    /// Chained at this block if the whole run fits there, else anchored.
    Chain(u64),
    /// Anchored, with blobs and directory in one run where one is free.
    Anchor,
    /// Anchored, each blob in the lowest free run that takes it: a
    /// compacting commit moves blobs down into holes.
    Scatter,
}

/// Places the staged blobs and the directory (in the header's block when at
/// most `EMBEDDED_DIRECTORY_MAX` bytes) in blocks of `area` that neither the
/// current generation nor the chain uses, as `placement` says, anchored
/// with the header at `anchor_at`. `None` if they do not fit.
pub(super) fn layout(
    cur: &Generation,
    chain: &Chain,
    area: u64,
    lens: &[u32],
    dir_bound: u64,
    placement: Placement,
    anchor_at: u64,
) -> Option<Layout> {
    let embedded = dir_bound <= u64::from(EMBEDDED_DIRECTORY_MAX);
    let dir_blocks = if embedded {
        0
    } else {
        dir_bound.div_ceil(BLOCK) * BLOCK
    };
    let in_use = || cur.dir.extents(&cur.slot).chain(chain.pinned());
    let body = lens.iter().map(|&len| blocks(len)).sum::<u64>() + dir_blocks;
    // Blobs in sequence from `at`, then the directory if it is not embedded.
    let place = |mut at: u64, header_at: u64| {
        let blobs = lens
            .iter()
            .map(|&len| {
                let e = Extent {
                    offset: if len == 0 { 0 } else { at },
                    len,
                };
                at += blocks(len);
                e
            })
            .collect();
        let (dir_at, dir_room) = match embedded {
            true => (
                header_at + SLOT_BYTES as u64,
                u64::from(EMBEDDED_DIRECTORY_MAX),
            ),
            false => (at, dir_blocks),
        };
        (blobs, dir_at, dir_room)
    };
    if let Placement::Chain(at) = placement {
        if Allocator::new(area, in_use())
            .alloc_at(at, BLOCK + body)
            .is_some()
        {
            let (blobs, dir_at, dir_room) = place(at + BLOCK, at);
            return Some(Layout {
                header_at: at,
                blobs,
                dir_at,
                dir_room,
                regions: vec![(at, BLOCK + body)],
            });
        }
    }
    let header_block = (anchor_at, BLOCK);
    // Fewer separate dirty regions make the one fdatasync cheaper: try one run first.
    if body == 0 {
        let (blobs, dir_at, dir_room) = place(0, anchor_at);
        return Some(Layout {
            header_at: anchor_at,
            blobs,
            dir_at,
            dir_room,
            regions: vec![header_block],
        });
    }
    let one_run = (placement != Placement::Scatter).then_some(body);
    if let Some(run) = one_run
        .and_then(|body| u32::try_from(body).ok())
        .and_then(|len| Allocator::new(area, in_use()).alloc(len))
    {
        let (blobs, dir_at, dir_room) = place(run.offset, anchor_at);
        return Some(Layout {
            header_at: anchor_at,
            blobs,
            dir_at,
            dir_room,
            regions: vec![header_block, (run.offset, body)],
        });
    }
    // Free space in pieces: the directory first, in the smallest run that
    // holds it (it must be contiguous), then each blob in the lowest run
    // that takes it; failing that, the blobs first and the directory after.
    let scattered = |dir_first: bool| -> Option<(Vec<Extent>, u64)> {
        let mut alloc = Allocator::new(area, in_use());
        let dir_len = u32::try_from(dir_blocks).ok()?;
        let dir_at = match (embedded, dir_first) {
            (true, _) => Some(anchor_at + SLOT_BYTES as u64),
            (false, true) => Some(alloc.alloc_best(dir_len)?.offset),
            (false, false) => None,
        };
        let blobs = lens
            .iter()
            .map(|&len| alloc.alloc(len))
            .collect::<Option<Vec<_>>>()?;
        let dir_at = match dir_at {
            Some(at) => at,
            None => alloc.alloc(dir_len)?.offset,
        };
        Some((blobs, dir_at))
    };
    let (blobs, dir_at) = scattered(true).or_else(|| scattered(false))?;
    let dir_room = match embedded {
        true => u64::from(EMBEDDED_DIRECTORY_MAX),
        false => dir_blocks,
    };
    let mut regions: Vec<(u64, u64)> = blobs
        .iter()
        .filter(|e| e.len > 0)
        .map(|e| (e.offset, e.end() - e.offset))
        .collect();
    regions.push(header_block);
    if !embedded {
        regions.push((dir_at, dir_room));
    }
    Some(Layout {
        header_at: anchor_at,
        blobs,
        dir_at,
        dir_room,
        regions,
    })
}

/// The zero-filled, whole-block buffers a commit writes, by area offset.
/// Whole blocks are written so no block in use keeps stale bytes of an older
/// version (or old plaintext after a rekey).
/// They share one allocation, kept by the store from commit to commit: a
/// fresh one would be page-faulted in on every commit.
pub(super) struct Writes {
    /// (area offset, start in `buf`, length) of each region.
    regions: Vec<(u64, usize, usize)>,
    /// Page-aligned, so the disk can write it past the page cache.
    buf: PageBuf,
}

impl Writes {
    pub(super) fn new(regions: &[(u64, u64)], mut buf: PageBuf) -> Writes {
        let mut at = 0;
        let regions: Vec<(u64, usize, usize)> = regions
            .iter()
            .map(|&(offset, len)| {
                let r = (offset, at, len as usize);
                at += len as usize;
                r
            })
            .collect();
        buf.reset_zeroed(at);
        Writes { regions, buf }
    }

    /// The bytes at area `offset..offset+len`, which lie inside one region by
    /// construction of the layout; an internal error if they do not.
    pub(super) fn slice(&mut self, offset: u64, len: u32) -> Result<&mut [u8], StoreError> {
        let end = offset + u64::from(len);
        let Some(&(region, start, _)) = self
            .regions
            .iter()
            .find(|&&(region, _, size)| region <= offset && end <= region + size as u64)
        else {
            return Err(StoreError::Internal(format!(
                "area {offset}+{len} lies outside the commit's write regions"
            )));
        };
        let at = start + (offset - region) as usize;
        Ok(&mut self.buf.bytes_mut()[at..at + len as usize])
    }

    pub(super) fn regions(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.regions
            .iter()
            .map(|&(offset, start, len)| (offset, &self.buf.bytes()[start..start + len]))
    }

    /// The buffer, to keep for the next commit (unless it is unusually large).
    pub(super) fn into_buffer(self) -> PageBuf {
        match self.buf.capacity() > KEEP_BUFFER_BYTES {
            true => PageBuf::default(),
            false => self.buf,
        }
    }
}

/// Largest write buffer a store keeps between commits.
const KEEP_BUFFER_BYTES: usize = 1 << 20;
