//! Transactions and the one-sync commit.
//!
//! Commit order: (1) stage every new blob version (encrypted under a fresh
//! per-version key), (2) place it and the new directory in blocks the current
//! generation does not use, growing the area first if needed, (3) write blobs,
//! directory, then the *other* header slot, (4) sync once, (5) switch the
//! in-memory state. Until (4) returns, the current generation's slot and blocks
//! are untouched, so a crash anywhere opens at it or at the new one.

use super::recover::Generation;
use super::{Store, StoreError};
use crate::crypto::Key;
use crate::format::{
    self, BlobEntry, Encryption, Extent, Kdf, Slot, BLOCK, DATA_START, SLOT_OFFSETS,
};
use std::collections::BTreeMap;
use zeroize::Zeroizing;

/// A set of puts and deletes applied all together by [`Transaction::commit`],
/// or not at all. Dropping it without committing changes nothing.
pub struct Transaction<'s> {
    store: &'s mut Store,
    changes: BTreeMap<String, Option<Zeroizing<Vec<u8>>>>,
    rekey: Option<(Key, Kdf)>,
    force: bool,
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

    fn alloc(&mut self, len: u32) -> Option<Extent> {
        if len == 0 {
            return Some(Extent::default());
        }
        let size = u64::from(len).div_ceil(BLOCK) * BLOCK;
        let mut start = DATA_START;
        let mut at = self.used.len();
        for (i, (s, e)) in self.used.iter().enumerate() {
            if start + size <= *s {
                at = i;
                break;
            }
            start = start.max(*e);
        }
        if start + size > self.area {
            return None;
        }
        self.used.insert(at, (start, start + size));
        Some(Extent { offset: start, len })
    }
}

impl<'s> Transaction<'s> {
    pub(super) fn new(store: &'s mut Store) -> Self {
        Transaction {
            store,
            changes: BTreeMap::new(),
            rekey: None,
            force: false,
        }
    }

    /// Sets blob `name` to `data` (creating or replacing it).
    pub fn put(&mut self, name: &str, data: &[u8]) -> Result<(), StoreError> {
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
            .insert(name.to_string(), Some(Zeroizing::new(data.to_vec())));
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

    /// Commits a new generation even with no changes.
    pub(super) fn force(&mut self) {
        self.force = true;
    }

    /// Re-encrypts every blob under `key` in this commit.
    pub(super) fn rekey_to(&mut self, key: Key, kdf: Kdf) -> Result<(), StoreError> {
        let names: Vec<String> = self.store.names().map(str::to_string).collect();
        for name in names {
            if !self.changes.contains_key(&name) {
                let data = self.store.get_required(&name)?;
                self.changes.insert(name, Some(data));
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
            force,
        } = self;
        store.writable()?;
        let cur = &store.current;
        if changes.is_empty() && rekey.is_none() && !force {
            return Ok(cur.slot.generation);
        }
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
            if let Some(plain) = change {
                let stored_len = plain.len() as u32 + tag;
                staged.push(Staged {
                    name,
                    plain,
                    stored_len,
                });
            }
        }

        // (2) Place them; grow the area once if they do not fit. Growing by the
        // full size of the new data means the new blocks alone hold it, so a
        // second failure cannot happen; it is reported rather than looped on.
        let mut area = cur.slot.area_len;
        let layout = loop {
            let dir_bound = directory_bound(&dir, &staged, area, key.is_some());
            match layout(cur, area, &staged, dir_bound) {
                Some(l) => break l,
                None if area == cur.slot.area_len => {
                    let extra = staged.iter().map(|s| blocks(s.stored_len)).sum::<u64>()
                        + blocks(dir_bound as u32);
                    area += extra + BLOCK;
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

        // (3) Fill the blocks: each new version is copied once into the buffer
        // that is written, and encrypted there in place.
        let mut writes = layout.buffers();
        for (s, extent) in staged.iter().zip(&layout.blobs) {
            // Only a plaintext store has empty stored bytes (a sealed blob has its tag).
            let (crc, sealed) = if s.stored_len == 0 {
                (crc32c::crc32c(&[]), None)
            } else {
                let buf = writes.slice(extent.offset, s.stored_len);
                buf[..s.plain.len()].copy_from_slice(&s.plain);
                let sealed = key.map(|k| k.seal_in_place(&id, &s.name, generation, buf));
                (crc32c::crc32c(buf), sealed)
            };
            let entry = BlobEntry {
                extent: *extent,
                plain_len: s.plain.len() as u32,
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
        };
        let slot_index = 1 - cur.slot_index;

        // (4) Write everything, then the one sync.
        let written = (|| {
            for (offset, buf) in &writes.0 {
                store.disk.write_at(*offset, buf)?;
            }
            store
                .disk
                .write_at(SLOT_OFFSETS[slot_index], &slot.encode())?;
            store.disk.sync()
        })();
        if let Err(e) = written {
            // After a failed write or sync the kernel may have dropped dirty
            // pages: the on-disk state is unknown until the store is reopened.
            store.poisoned = true;
            return Err(e.into());
        }

        // (5) The new generation is durable: switch to it.
        let report = |index, generation, status: &str| super::SlotReport {
            index,
            generation: Some(generation),
            status: status.into(),
            sound: true,
        };
        let mut slots = vec![
            report(slot_index, generation, "ok (current)"),
            report(cur.slot_index, cur.slot.generation, "ok"),
        ];
        slots.sort_by_key(|r| r.index);
        store.slots = slots;
        store.current = Generation {
            slot_index,
            slot,
            dir,
            dir_bytes,
        };
        if let Some((k, _)) = rekey {
            store.key = Some(k);
        }
        Ok(generation)
    }
}

/// A new blob version on its way to disk.
struct Staged {
    name: String,
    plain: Zeroizing<Vec<u8>>,
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
            plain_len: s.plain.len() as u32,
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
    /// One extent per staged blob, in order.
    blobs: Vec<Extent>,
    /// Area offset of the directory and the bytes reserved for it there.
    dir_at: u64,
    dir_room: u64,
    /// One contiguous run holding every new blob and the directory, written
    /// with a single `pwrite`; `None` when free space was too fragmented and
    /// each extent is written on its own.
    run: Option<Extent>,
}

/// Places the staged blobs and the directory in blocks of `area` the current
/// generation does not use; `None` if they do not fit.
fn layout(cur: &Generation, area: u64, staged: &[Staged], dir_bound: u64) -> Option<Layout> {
    let dir_len = u32::try_from(dir_bound).ok()?;
    // Fewer separate dirty regions make the one fdatasync cheaper: try one run first.
    let total = staged.iter().map(|s| blocks(s.stored_len)).sum::<u64>() + blocks(dir_len);
    let mut alloc = Allocator::new(area, cur.dir.extents(&cur.slot));
    if let Some(run) = u32::try_from(total).ok().and_then(|len| alloc.alloc(len)) {
        let mut at = run.offset;
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
        return Some(Layout {
            blobs,
            dir_at: at,
            dir_room: run.end() - at,
            run: Some(run),
        });
    }
    let mut alloc = Allocator::new(area, cur.dir.extents(&cur.slot));
    let blobs = staged
        .iter()
        .map(|s| alloc.alloc(s.stored_len))
        .collect::<Option<Vec<_>>>()?;
    let dir = alloc.alloc(dir_len)?;
    Some(Layout {
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
