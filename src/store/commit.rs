//! Transactions and the one-sync commit.
//!
//! Commit order: (1) build the next generation's directory on a copy, (2)
//! place the new blob versions and the directory in blocks the current
//! generation and the chain headers do not use: as one run starting with a
//! header block at the current header's `next` (a *chained* commit: one
//! contiguous write), or anywhere, growing the area first if needed, with the
//! header going to the slot that does not hold the current anchor (an
//! *anchored* commit); a small directory goes into the header's block, (3)
//! encrypt each blob straight into the buffer that is written, (4) write,
//! then sync once, (5) switch the in-memory state. Until (4) returns, nothing
//! recovery needs to reach the current generation has been touched, so a
//! crash anywhere opens at it or at the new one.

use super::recover::{Chain, Generation, MAX_CHAIN};
use super::{Store, StoreError};
use crate::crypto::Key;
use crate::format::{
    self, BlobEntry, Directory, Encryption, Extent, Kdf, Slot, BLOCK, DATA_START,
    EMBEDDED_DIRECTORY_MAX, SLOT_BYTES, SLOT_OFFSETS,
};
use crate::image::PageBuf;
use std::collections::BTreeMap;
use zeroize::Zeroizing;

/// A set of puts and deletes applied all together by [`Transaction::commit`],
/// or not at all. Dropping it without committing changes nothing. It borrows
/// the data it is given (`'d`) rather than copying it: the bytes are read
/// once, when they are encrypted or copied into the buffer that is written.
pub struct Transaction<'s, 'd> {
    store: &'s mut Store,
    changes: BTreeMap<String, Option<Data<'d>>>,
    rekey: Option<(Key, Kdf)>,
    settle: bool,
}

/// A new blob version: the caller's bytes, or bytes read back for a rekey.
enum Data<'d> {
    Borrowed(&'d [u8]),
    Owned(Zeroizing<Vec<u8>>),
}

impl Data<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Data::Borrowed(b) => b,
            Data::Owned(v) => v,
        }
    }
}

/// First-fit allocation of blocks between `DATA_START` and the area's end,
/// around the blocks already in use.
struct Allocator {
    area: u64,
    used: Vec<(u64, u64)>,
}

impl Allocator {
    fn new(area: u64, in_use: impl Iterator<Item = Extent>) -> Self {
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

    fn alloc(&mut self, len: u32) -> Option<Extent> {
        if len == 0 {
            return Some(Extent::default());
        }
        let size = u64::from(len).div_ceil(BLOCK) * BLOCK;
        let mut start = DATA_START;
        for (s, e) in &self.used {
            if start + size <= *s {
                break;
            }
            start = start.max(*e);
        }
        if start + size > self.area {
            return None;
        }
        self.mark(start, start + size);
        Some(Extent { offset: start, len })
    }

    /// Takes `len` bytes (rounded up to blocks) exactly at `offset`, if free.
    fn alloc_at(&mut self, offset: u64, len: u64) -> Option<Extent> {
        let end = offset + len.div_ceil(BLOCK) * BLOCK;
        let free = offset >= DATA_START
            && end <= self.area
            && self.used.iter().all(|&(s, e)| e <= offset || s >= end);
        let len = u32::try_from(len).ok().filter(|_| free)?;
        self.mark(offset, end);
        Some(Extent { offset, len })
    }

    /// Start of the largest free run (the lowest of equals), if any block is free.
    fn largest_free(&self) -> Option<u64> {
        let mut best: Option<(u64, u64)> = None;
        let mut at = DATA_START;
        for &(s, e) in self.used.iter().chain([&(self.area, self.area)]) {
            if s > at && best.is_none_or(|(_, len)| s - at > len) {
                best = Some((at, s - at));
            }
            at = at.max(e);
        }
        best.map(|(start, _)| start)
    }
}

impl<'s, 'd> Transaction<'s, 'd> {
    pub(super) fn new(store: &'s mut Store) -> Self {
        Transaction {
            store,
            changes: BTreeMap::new(),
            rekey: None,
            settle: false,
        }
    }

    /// Sets blob `name` to `data` (creating or replacing it).
    pub fn put(&mut self, name: &str, data: &'d [u8]) -> Result<(), StoreError> {
        format::check_name(name).map_err(|reason| StoreError::InvalidName {
            name: name.to_string(),
            reason,
        })?;
        if u32::try_from(data.len()).is_err() {
            return Err(StoreError::Usage(format!(
                "blob {name:?} of {} bytes is too large",
                data.len()
            )));
        }
        self.changes
            .insert(name.to_string(), Some(Data::Borrowed(data)));
        Ok(())
    }

    /// Removes blob `name` (nothing happens if it does not exist).
    pub fn delete(&mut self, name: &str) -> Result<(), StoreError> {
        format::check_name(name).map_err(|reason| StoreError::InvalidName {
            name: name.to_string(),
            reason,
        })?;
        self.changes.insert(name.to_string(), None);
        Ok(())
    }

    /// Commits a new generation even with no changes, anchored in a slot and
    /// naming no successor block (see [`Store::prepare_handover`]).
    pub(super) fn settle(&mut self) {
        self.settle = true;
    }

    /// Re-encrypts every blob under `key` in this commit.
    pub(super) fn rekey_to(&mut self, key: Key, kdf: Kdf) -> Result<(), StoreError> {
        let names: Vec<String> = self.store.names().map(str::to_string).collect();
        for name in names {
            if !self.changes.contains_key(&name) {
                let data = self.store.get_required(&name)?;
                self.changes.insert(name, Some(Data::Owned(data)));
            }
        }
        self.rekey = Some((key, kdf));
        Ok(())
    }

    /// Commits: all changes become durable together with one sync, or none do.
    /// Returns the new generation (the current one if there was nothing to do).
    pub fn commit(self) -> Result<u64, StoreError> {
        let Transaction {
            store,
            changes,
            rekey,
            settle,
        } = self;
        store.writable()?;
        let cur = &store.current;
        if changes.is_empty() && rekey.is_none() && !settle {
            return Ok(cur.slot.generation);
        }
        let settle = settle || store.settle_next;
        let generation = cur.slot.generation + 1;
        let id = cur.slot.store_id;
        let key = match &rekey {
            Some((k, _)) => Some(k),
            None if cur.slot.encrypted => {
                Some(store.key.as_ref().ok_or_else(|| StoreError::KeyMissing {
                    path: store.path.clone(),
                })?)
            }
            None => None,
        };

        // (1) The next generation's directory, built on a copy.
        let mut dir = cur.dir.clone();
        dir.generation = generation;
        dir.version = format::DIRECTORY_VERSION;
        // What the encoding can grow by: see Directory::entry_bound.
        let mut dir_bound = cur.dir_bytes.len() as u64 + Directory::GENERATION_GROWTH_BOUND;
        if let Some((k, kdf)) = &rekey {
            let encryption = Encryption {
                kdf: kdf.clone(),
                key_check: k.key_check(&id),
            };
            dir_bound += format::encoded_len(&Some(&encryption));
            dir.encryption = Some(encryption);
        }
        let mut staged = Vec::new();
        for (name, change) in changes {
            dir.blobs.remove(&name);
            if let Some(data) = change {
                dir_bound += Directory::entry_bound(&name);
                // The tag of a sealed blob is kept in the directory.
                let stored_len = data.bytes().len() as u32;
                staged.push(Staged {
                    name,
                    data,
                    stored_len,
                });
            }
        }

        // (2) Place them. A commit chains when it can: at the block the
        // current header named, behind a chain not yet at its limit, with no
        // torn commit left to keep in quarantine. Rekeys and settling commits
        // anchor. Growing by the full size of the new data means the new
        // blocks alone hold it, so a second failure cannot happen; it is
        // reported rather than looped on.
        let chain_at = (rekey.is_none()
            && !settle
            && cur.slot.next != 0
            && store.chain.headers.len() < MAX_CHAIN
            && store.chain.quarantine.is_empty())
        .then_some(cur.slot.next);
        let mut area = cur.slot.area_len;
        let anchor_at = SLOT_OFFSETS[1 - store.chain.anchor_slot];
        let layout = loop {
            match layout(
                cur,
                &store.chain,
                area,
                &staged,
                dir_bound,
                chain_at,
                anchor_at,
            ) {
                Some(l) => break l,
                None if area == cur.slot.area_len => {
                    let extra = staged.iter().map(|s| blocks(s.stored_len)).sum::<u64>()
                        + dir_bound.div_ceil(BLOCK) * BLOCK;
                    // Quarantined blocks of a torn commit that grew the area may
                    // lie past this generation's end: grow beyond them.
                    let top = store.chain.pinned().map(|e| e.end()).fold(area, u64::max);
                    area = top + extra + BLOCK;
                    if let Err(e) = store.disk.grow(area) {
                        return Err(match e {
                            crate::image::ImageError::CapacityLimit { max, .. } => {
                                StoreError::CapacityExceeded {
                                    path: store.path.clone(),
                                    needed: area,
                                    capacity: max,
                                }
                            }
                            other => other.into(),
                        });
                    }
                }
                None => {
                    return Err(StoreError::CapacityExceeded {
                        path: store.path.clone(),
                        needed: area,
                        capacity: area,
                    })
                }
            }
        };

        // (3) Fill the blocks: each new version is encrypted (or copied)
        // straight from the caller's bytes into the buffer that is written.
        let mut writes = Writes::new(&layout.regions, std::mem::take(&mut store.write_buf));
        for (s, extent) in staged.iter().zip(&layout.blobs) {
            let buf = match s.stored_len {
                0 => &mut [][..],
                len => writes.slice(extent.offset, len),
            };
            let sealed = match key {
                Some(k) => Some(
                    k.seal_into(&id, &s.name, generation, s.data.bytes(), buf)
                        .map_err(|source| StoreError::Crypto {
                            path: store.path.clone(),
                            source,
                        })?,
                ),
                None => {
                    buf.copy_from_slice(s.data.bytes());
                    None
                }
            };
            let crc = crc32c::crc32c(buf);
            let entry = BlobEntry {
                extent: *extent,
                plain_len: s.data.bytes().len() as u32,
                crc,
                written_gen: generation,
                sealed,
            };
            dir.blobs.insert(s.name.clone(), entry);
        }
        let dir_bytes = dir.encode();
        if dir_bytes.len() as u64 > layout.dir_room {
            // dir_bound is an upper bound by construction (Directory::entry_bound);
            // report a broken bound, never write past it.
            return Err(StoreError::Usage(format!(
                "internal error: directory of {} bytes exceeds its bound",
                dir_bytes.len()
            )));
        }
        writes
            .slice(layout.dir_at, dir_bytes.len() as u32)
            .copy_from_slice(&dir_bytes);
        let dir_extent = Extent {
            offset: layout.dir_at,
            len: dir_bytes.len() as u32,
        };

        // The successor's header block: the largest run free once this
        // generation is durable (its blocks, plus the chain headers if it is
        // chained; an anchored commit frees the old chain).
        // Slots lie below DATA_START; a chained header is in a block above it.
        let chained = layout.header_at >= DATA_START;
        let next = if settle {
            0
        } else {
            let pinned = chained
                .then_some(&layout.header_at)
                .into_iter()
                .chain(match chained {
                    true => &store.chain.headers[..],
                    false => &[],
                });
            Allocator::new(
                area,
                dir.blobs
                    .values()
                    .map(|b| b.extent)
                    .chain([dir_extent])
                    .chain(pinned.map(|&offset| Extent {
                        offset,
                        len: BLOCK as u32,
                    })),
            )
            .largest_free()
            .unwrap_or(0)
        };
        let slot = Slot {
            format_version: format::FORMAT_VERSION,
            encrypted: key.is_some(),
            generation,
            store_id: id,
            area_len: area,
            directory: dir_extent,
            directory_crc: crc32c::crc32c(&dir_bytes),
            directory_mac: key
                .map(|k| k.directory_mac(&id, &dir_bytes))
                .unwrap_or([0; 32]),
            commit_id: rand::random(),
            prev_id: cur.slot.commit_id,
            next,
        };
        let header_at = layout.header_at;
        writes
            .slice(header_at, SLOT_BYTES as u32)
            .copy_from_slice(&slot.encode());

        // (4) Write everything, then the one sync.
        let written = (|| {
            store
                .disk
                .write_parts(&writes.regions().collect::<Vec<_>>())?;
            store.disk.sync()
        })();
        store.write_buf = writes.into_buffer();
        if let Err(e) = written {
            // After a failed write or sync the kernel may have dropped dirty
            // pages: the on-disk state is unknown until the store is reopened.
            store.poisoned = true;
            return Err(e.into());
        }

        // (5) The new generation is durable: switch to it.
        match chained {
            // The anchor's status follows from the chain: see Store::slot_reports.
            true => store.chain.headers.push(header_at),
            false => {
                let old = store.chain.anchor_slot;
                store.chain = Chain {
                    anchor_slot: 1 - old,
                    ..Chain::default()
                };
                store.leftover = None;
                store.slots[1 - old] = super::SlotReport {
                    index: 1 - old,
                    generation: Some(generation),
                    status: super::recover::anchor_status(generation, 0),
                    sound: true,
                };
                store.slots[old].status = "ok (older anchor, not needed)".into();
            }
        }
        store.current = Generation {
            header_at,
            slot,
            dir,
            dir_bytes,
        };
        if let Some((k, _)) = rekey {
            store.key = Some(k);
        }
        store.settle_next = false;
        Ok(generation)
    }
}

/// A new blob version on its way to disk.
struct Staged<'d> {
    name: String,
    data: Data<'d>,
    stored_len: u32,
}

fn blocks(len: u32) -> u64 {
    u64::from(len).div_ceil(BLOCK) * BLOCK
}

/// Where a commit's blocks go.
struct Layout {
    /// Area offset of the header: the first block of a chained commit's run,
    /// or the slot an anchored commit writes.
    header_at: u64,
    /// One extent per staged blob, in order.
    blobs: Vec<Extent>,
    /// Area offset of the directory and the bytes reserved for it there.
    dir_at: u64,
    dir_room: u64,
    /// What is written, as (area offset, length): one contiguous run for a
    /// chained commit; for an anchored one its slot's block, plus one run or,
    /// when free space is too fragmented, one region per extent.
    regions: Vec<(u64, u64)>,
}

/// Places the staged blobs and the directory (in the header's block when at
/// most `EMBEDDED_DIRECTORY_MAX` bytes) in blocks of `area` that neither the
/// current generation nor the chain uses: chained at `chain_at` if the whole
/// run fits there, else anchored with the header at `anchor_at`. `None` if
/// they do not fit.
fn layout(
    cur: &Generation,
    chain: &Chain,
    area: u64,
    staged: &[Staged],
    dir_bound: u64,
    chain_at: Option<u64>,
    anchor_at: u64,
) -> Option<Layout> {
    let embedded = dir_bound <= u64::from(EMBEDDED_DIRECTORY_MAX);
    let dir_blocks = if embedded {
        0
    } else {
        dir_bound.div_ceil(BLOCK) * BLOCK
    };
    let in_use = || cur.dir.extents(&cur.slot).chain(chain.pinned());
    let body = staged.iter().map(|s| blocks(s.stored_len)).sum::<u64>() + dir_blocks;
    // Blobs in sequence from `at`, then the directory if it is not embedded.
    let place = |mut at: u64, header_at: u64| {
        let blobs = staged
            .iter()
            .map(|s| {
                let e = Extent {
                    offset: if s.stored_len == 0 { 0 } else { at },
                    len: s.stored_len,
                };
                at += blocks(s.stored_len);
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
    if let Some(at) = chain_at {
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
    if let Some(run) = u32::try_from(body)
        .ok()
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
    let mut alloc = Allocator::new(area, in_use());
    let blobs = staged
        .iter()
        .map(|s| alloc.alloc(s.stored_len))
        .collect::<Option<Vec<_>>>()?;
    let (dir_at, dir_room) = match embedded {
        true => (
            anchor_at + SLOT_BYTES as u64,
            u64::from(EMBEDDED_DIRECTORY_MAX),
        ),
        false => (
            alloc.alloc(u32::try_from(dir_blocks).ok()?)?.offset,
            dir_blocks,
        ),
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
struct Writes {
    /// (area offset, start in `buf`, length) of each region.
    regions: Vec<(u64, usize, usize)>,
    /// Page-aligned, so the disk can write it past the page cache.
    buf: PageBuf,
}

impl Writes {
    fn new(regions: &[(u64, u64)], mut buf: PageBuf) -> Writes {
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
    /// construction of the layout.
    fn slice(&mut self, offset: u64, len: u32) -> &mut [u8] {
        let (region, start, _) = *self
            .regions
            .iter()
            .find(|&&(region, _, size)| {
                region <= offset && offset + u64::from(len) <= region + size as u64
            })
            .expect("every placed extent lies inside one write region");
        let at = start + (offset - region) as usize;
        &mut self.buf.bytes_mut()[at..at + len as usize]
    }

    fn regions(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.regions
            .iter()
            .map(|&(offset, start, len)| (offset, &self.buf.bytes()[start..start + len]))
    }

    /// The buffer, to keep for the next commit (unless it is unusually large).
    fn into_buffer(self) -> PageBuf {
        match self.buf.capacity() > KEEP_BUFFER_BYTES {
            true => PageBuf::default(),
            false => self.buf,
        }
    }
}

/// Largest write buffer a store keeps between commits.
const KEEP_BUFFER_BYTES: usize = 1 << 20;

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
}
