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

        let mut dir = cur.dir.clone();
        dir.generation = generation;
        if let Some((k, kdf)) = &rekey {
            dir.encryption = Some(Encryption {
                kdf: kdf.clone(),
                key_check: k.key_check(&id),
            });
        }
        // (1) Stage the new versions.
        let mut staged: Vec<(String, Vec<u8>, BlobEntry)> = Vec::new();
        for (name, change) in &changes {
            dir.blobs.remove(name);
            let Some(plain) = change else { continue };
            let (sealed, stored) = match key {
                Some(k) => {
                    let (s, ct) = k.seal(&id, name, generation, plain);
                    (Some(s), ct)
                }
                None => (None, plain.to_vec()),
            };
            let entry = BlobEntry {
                extent: Extent {
                    offset: 0,
                    len: stored.len() as u32,
                },
                plain_len: plain.len() as u32,
                crc: crc32c::crc32c(&stored),
                written_gen: generation,
                sealed,
            };
            staged.push((name.clone(), stored, entry));
        }

        // (2) Place them; grow the area once if they do not fit. Growing by the
        // full size of the new data means the new blocks alone hold it, so a
        // second failure cannot happen; it is reported rather than looped on.
        let mut area = cur.slot.area_len;
        let placement = loop {
            match place(cur, area, &mut staged, &mut dir) {
                Some(placed) => break placed,
                None if area == cur.slot.area_len => {
                    let extra: u64 = staged.iter().map(|(_, s, _)| s.len() as u64).sum::<u64>()
                        + dir.encode().len() as u64;
                    area = (area + extra.div_ceil(BLOCK) * BLOCK + BLOCK).div_ceil(BLOCK) * BLOCK;
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
        let slot = Slot {
            format_version: format::FORMAT_VERSION,
            encrypted: key.is_some(),
            generation,
            store_id: id,
            area_len: area,
            directory: placement.dir_extent,
            directory_crc: crc32c::crc32c(&placement.dir_bytes),
            directory_mac: key
                .map(|k| k.directory_mac(&id, &placement.dir_bytes))
                .unwrap_or([0; 32]),
        };
        let slot_index = 1 - cur.slot_index;

        // (3) + (4): write everything, then the one sync.
        let written = (|| {
            write_placed(&mut *store.disk, &staged, &placement)?;
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
        store.slots = vec![
            super::SlotReport {
                index: slot_index,
                generation: Some(generation),
                status: "ok (current)".into(),
                sound: true,
            },
            super::SlotReport {
                index: cur.slot_index,
                generation: Some(cur.slot.generation),
                status: "ok".into(),
                sound: true,
            },
        ];
        store.slots.sort_by_key(|r| r.index);
        store.current = Generation {
            slot_index,
            slot,
            dir,
            dir_bytes: placement.dir_bytes,
        };
        if let Some((k, _)) = rekey {
            store.key = Some(k);
        }
        Ok(generation)
    }
}

/// Where a commit's new blocks go.
struct Placement {
    dir_bytes: Vec<u8>,
    dir_extent: Extent,
    /// Start of one contiguous run holding every new blob and the directory,
    /// written with a single `pwrite`; `None` when free space was too
    /// fragmented and each extent is written on its own.
    run: Option<Extent>,
}

/// Places the staged blobs and the directory in free blocks of `area`, filling
/// their extents into `dir`; `None` if they do not fit.
fn place(
    cur: &Generation,
    area: u64,
    staged: &mut [(String, Vec<u8>, BlobEntry)],
    dir: &mut format::Directory,
) -> Option<Placement> {
    let blocks = |len: usize| (len as u64).div_ceil(BLOCK) * BLOCK;
    // Fewer separate dirty regions make the one fdatasync cheaper: try one
    // run first, sized with room for the directory to grow by its offsets.
    let data: u64 = staged.iter().map(|(_, s, _)| blocks(s.len())).sum();
    let dir_room = blocks(dir.encode().len() + 16 * staged.len() + 64);
    let mut alloc = Allocator::new(area, cur.dir.extents(&cur.slot));
    if let Some(run) = u32::try_from(data + dir_room)
        .ok()
        .and_then(|len| alloc.alloc(len))
    {
        let mut at = run.offset;
        for (name, stored, entry) in staged.iter_mut() {
            entry.extent = Extent {
                offset: if stored.is_empty() { 0 } else { at },
                len: stored.len() as u32,
            };
            at += blocks(stored.len());
            dir.blobs.insert(name.clone(), entry.clone());
        }
        let dir_bytes = dir.encode();
        if at + dir_bytes.len() as u64 <= run.end() {
            let dir_extent = Extent {
                offset: at,
                len: dir_bytes.len() as u32,
            };
            return Some(Placement {
                dir_bytes,
                dir_extent,
                run: Some(run),
            });
        }
    }
    let mut alloc = Allocator::new(area, cur.dir.extents(&cur.slot));
    for (name, stored, entry) in staged.iter_mut() {
        entry.extent = alloc.alloc(stored.len() as u32)?;
        dir.blobs.insert(name.clone(), entry.clone());
    }
    let dir_bytes = dir.encode();
    let dir_extent = alloc.alloc(dir_bytes.len() as u32)?;
    Some(Placement {
        dir_bytes,
        dir_extent,
        run: None,
    })
}

/// Writes the placed blobs and directory: one `pwrite` for a contiguous run.
fn write_placed(
    disk: &mut dyn crate::image::Disk,
    staged: &[(String, Vec<u8>, BlobEntry)],
    p: &Placement,
) -> Result<(), crate::image::ImageError> {
    // Whole blocks are written, zero-padded, so no block in use ever keeps
    // stale bytes of an older version (or of old plaintext after a rekey).
    match p.run {
        Some(run) => {
            let mut buf = vec![0u8; (run.end() - run.offset) as usize];
            for (_, stored, entry) in staged.iter().filter(|(_, s, _)| !s.is_empty()) {
                let at = (entry.extent.offset - run.offset) as usize;
                buf[at..at + stored.len()].copy_from_slice(stored);
            }
            let at = (p.dir_extent.offset - run.offset) as usize;
            buf[at..at + p.dir_bytes.len()].copy_from_slice(&p.dir_bytes);
            disk.write_at(run.offset, &buf)
        }
        None => {
            let padded = |bytes: &[u8]| {
                let mut v = bytes.to_vec();
                v.resize(
                    (bytes.len() as u64).div_ceil(BLOCK) as usize * BLOCK as usize,
                    0,
                );
                v
            };
            for (_, stored, entry) in staged.iter().filter(|(_, s, _)| !s.is_empty()) {
                disk.write_at(entry.extent.offset, &padded(stored))?;
            }
            disk.write_at(p.dir_extent.offset, &padded(&p.dir_bytes))
        }
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
