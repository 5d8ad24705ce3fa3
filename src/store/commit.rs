//! Transactions and the one-sync commit.
//!
//! Commit order: (1) build the next generation's directory on a copy, (2)
//! place the new blob versions and the directory in blocks the current
//! generation and the chain headers do not use: as one run starting with a
//! header block at the current header's `next` (a *chained* commit: one
//! contiguous write), or anywhere, growing the area first if needed, with the
//! header going to the slot that does not hold the current anchor (an
//! *anchored* commit), (3) encrypt each blob straight into the buffer that is
//! written, (4) write, then sync once, (5) switch the in-memory state. Until
//! (4) returns, nothing recovery needs to reach the current generation has
//! been touched, so a crash anywhere opens at it or at the new one.

use super::recover::{Chain, Generation, MAX_CHAIN};
use super::{Store, StoreError};
use crate::crypto::Key;
use crate::format::{
    self, BlobEntry, Encryption, Extent, Kdf, Slot, BLOCK, DATA_START, SLOT_OFFSETS,
};
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
            .map(|e| (e.offset, e.end()))
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
        if data.len() > (u32::MAX - format::TAG_BYTES) as usize {
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
        let tag = if key.is_some() { format::TAG_BYTES } else { 0 };

        // (1) The next generation's directory, built on a copy.
        let mut dir = cur.dir.clone();
        dir.generation = generation;
        if let Some((k, kdf)) = &rekey {
            dir.encryption = Some(Encryption {
                kdf: kdf.clone(),
                key_check: k.key_check(&id),
            });
        }
        let mut staged = Vec::new();
        for (name, change) in changes {
            dir.blobs.remove(&name);
            if let Some(data) = change {
                let stored_len = data.bytes().len() as u32 + tag;
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
        let layout = loop {
            let dir_bound = directory_bound(&dir, &staged, area, key.is_some());
            match layout(cur, &store.chain, area, &staged, dir_bound, chain_at) {
                Some(l) => break l,
                None if area == cur.slot.area_len => {
                    let extra = staged.iter().map(|s| blocks(s.stored_len)).sum::<u64>()
                        + blocks(dir_bound as u32);
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
        let mut writes = layout.buffers();
        for (s, extent) in staged.iter().zip(&layout.blobs) {
            // Only a plaintext store has empty stored bytes (a sealed blob has its tag).
            let (crc, sealed) = if s.stored_len == 0 {
                (crc32c::crc32c(&[]), None)
            } else {
                let buf = writes.slice(extent.offset, s.stored_len);
                let sealed = match key {
                    Some(k) => Some(k.seal_into(&id, &s.name, generation, s.data.bytes(), buf)),
                    None => {
                        buf.copy_from_slice(s.data.bytes());
                        None
                    }
                };
                (crc32c::crc32c(buf), sealed)
            };
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
            // directory_bound() is an upper bound by construction (CBOR integer
            // sizes grow with their values); report a broken bound, never write past it.
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
        let next = if settle {
            0
        } else {
            let pinned = layout.chained_at.iter().chain(match layout.chained_at {
                Some(_) => &store.chain.headers[..],
                None => &[],
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
        let header = slot.encode();
        let header_at = match layout.chained_at {
            Some(at) => {
                writes
                    .slice(at, header.len() as u32)
                    .copy_from_slice(&header);
                at
            }
            None => SLOT_OFFSETS[1 - store.chain.anchor_slot],
        };

        // (4) Write everything, then the one sync.
        let written = (|| {
            for (offset, buf) in &writes.0 {
                store.disk.write_at(*offset, buf)?;
            }
            if layout.chained_at.is_none() {
                store.disk.write_at(header_at, &header)?;
            }
            store.disk.sync()
        })();
        if let Err(e) = written {
            // After a failed write or sync the kernel may have dropped dirty
            // pages: the on-disk state is unknown until the store is reopened.
            store.poisoned = true;
            return Err(e.into());
        }

        // (5) The new generation is durable: switch to it.
        match layout.chained_at {
            Some(at) => {
                store.chain.headers.push(at);
                let anchor = &mut store.slots[store.chain.anchor_slot];
                anchor.status = format!(
                    "ok (anchor of the current generation {generation}, {} chained commits on)",
                    store.chain.headers.len()
                );
            }
            None => {
                let old = store.chain.anchor_slot;
                store.chain = Chain {
                    anchor_slot: 1 - old,
                    ..Chain::default()
                };
                store.leftover = None;
                store.slots[1 - old] = super::SlotReport {
                    index: 1 - old,
                    generation: Some(generation),
                    status: "ok (current)".into(),
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

/// An upper bound on the encoded size of `dir` once the staged entries are
/// added: they are encoded with the largest values they can take, and a CBOR
/// integer never gets shorter as its value grows.
fn directory_bound(dir: &format::Directory, staged: &[Staged], area: u64, encrypted: bool) -> u64 {
    let mut probe = dir.clone();
    for s in staged {
        let entry = BlobEntry {
            extent: Extent {
                offset: area,
                len: s.stored_len,
            },
            plain_len: s.data.bytes().len() as u32,
            crc: u32::MAX,
            written_gen: probe.generation,
            sealed: encrypted.then_some(format::Sealed {
                salt: [0xff; 32],
                nonce: [0xff; 12],
            }),
        };
        probe.blobs.insert(s.name.clone(), entry);
    }
    probe.encode().len() as u64
}

/// Where a commit's blocks go.
struct Layout {
    /// The header block of a chained commit (the run's first block); `None`
    /// for an anchored commit, whose header goes to a slot.
    chained_at: Option<u64>,
    /// One extent per staged blob, in order.
    blobs: Vec<Extent>,
    /// Area offset of the directory and the bytes reserved for it there.
    dir_at: u64,
    dir_room: u64,
    /// One contiguous run holding everything, written with a single `pwrite`;
    /// `None` when free space was too fragmented and each extent is written
    /// on its own (anchored commits only).
    run: Option<Extent>,
}

/// Places the staged blobs and the directory in blocks of `area` that neither
/// the current generation nor the chain uses: chained at `chain_at` if the
/// whole run fits there, else anchored. `None` if they do not fit.
fn layout(
    cur: &Generation,
    chain: &Chain,
    area: u64,
    staged: &[Staged],
    dir_bound: u64,
    chain_at: Option<u64>,
) -> Option<Layout> {
    let dir_len = u32::try_from(dir_bound).ok()?;
    let in_use = || cur.dir.extents(&cur.slot).chain(chain.pinned());
    let body = staged.iter().map(|s| blocks(s.stored_len)).sum::<u64>() + blocks(dir_len);
    // One run in sequence: [header block,] blobs, directory.
    let in_run = |run: Extent, header: bool| {
        let mut at = run.offset + if header { BLOCK } else { 0 };
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
        Layout {
            chained_at: header.then_some(run.offset),
            blobs,
            dir_at: at,
            dir_room: run.end() - at,
            run: Some(run),
        }
    };
    if let Some(at) = chain_at {
        if let Some(run) = Allocator::new(area, in_use()).alloc_at(at, BLOCK + body) {
            return Some(in_run(run, true));
        }
    }
    // Fewer separate dirty regions make the one fdatasync cheaper: try one run first.
    if let Some(run) = u32::try_from(body)
        .ok()
        .and_then(|len| Allocator::new(area, in_use()).alloc(len))
    {
        return Some(in_run(run, false));
    }
    let mut alloc = Allocator::new(area, in_use());
    let blobs = staged
        .iter()
        .map(|s| alloc.alloc(s.stored_len))
        .collect::<Option<Vec<_>>>()?;
    let dir = alloc.alloc(dir_len)?;
    Some(Layout {
        chained_at: None,
        blobs,
        dir_at: dir.offset,
        dir_room: blocks(dir_len),
        run: None,
    })
}

/// The zero-filled, whole-block buffers a commit writes, by area offset.
/// Whole blocks are written so no block in use keeps stale bytes of an older
/// version (or old plaintext after a rekey).
struct Writes(Vec<(u64, Vec<u8>)>);

impl Layout {
    fn buffers(&self) -> Writes {
        let zeroed = |offset: u64, len: u64| (offset, vec![0u8; len as usize]);
        match self.run {
            Some(run) => Writes(vec![zeroed(run.offset, run.end() - run.offset)]),
            None => Writes(
                self.blobs
                    .iter()
                    .filter(|e| e.len > 0)
                    .map(|e| zeroed(e.offset, e.end() - e.offset))
                    .chain([zeroed(self.dir_at, self.dir_room)])
                    .collect(),
            ),
        }
    }
}

impl Writes {
    /// The bytes at area `offset..offset+len`, which lie inside one buffer by
    /// construction of the layout.
    fn slice(&mut self, offset: u64, len: u32) -> &mut [u8] {
        let (start, buf) = self
            .0
            .iter_mut()
            .find(|(start, buf)| {
                *start <= offset && offset + u64::from(len) <= *start + buf.len() as u64
            })
            .expect("every placed extent lies inside one write buffer");
        let at = (offset - *start) as usize;
        &mut buf[at..at + len as usize]
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
}
