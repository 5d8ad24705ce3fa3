//! Reading a generation back and choosing the one to open: the newest slot
//! whose header, directory and every blob verify (`docs/format.md` argues why
//! that is always the last durable commit or the one being written).

use super::StoreError;
use crate::format::{Directory, DirectoryProblem, Slot, SlotProblem, SLOT_BYTES, SLOT_OFFSETS};
use crate::image::{Disk, ImageError};
use std::path::Path;

/// A fully verified generation.
#[derive(Debug, Clone)]
pub(crate) struct Generation {
    pub slot_index: usize,
    pub slot: Slot,
    pub dir: Directory,
    pub dir_bytes: Vec<u8>,
}

/// What one slot holds, for `check` and `dump-headers`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotReport {
    /// 0 or 1.
    pub index: usize,
    /// The generation in the header, when the header decodes.
    pub generation: Option<u64>,
    /// "ok", or why the slot is not usable.
    pub status: String,
    /// The slot verifies or was never written: nothing in it is damaged.
    pub sound: bool,
}

/// Why a generation failed to verify: its data, or the disk below.
pub(crate) enum LoadFailure {
    Bad(String),
    Newer(String),
    Disk(ImageError),
}

pub(crate) fn read_slot(
    disk: &dyn Disk,
    index: usize,
) -> Result<Result<Slot, SlotProblem>, ImageError> {
    let mut buf = [0u8; SLOT_BYTES];
    if disk.size() < SLOT_OFFSETS[index] + SLOT_BYTES as u64 {
        return Ok(Err(SlotProblem::NoMagic));
    }
    disk.read_at(SLOT_OFFSETS[index], &mut buf)?;
    Ok(Slot::decode(&buf))
}

/// Reads `len` stored bytes at `offset` and checks their CRC32C.
pub(crate) fn read_checked(
    disk: &dyn Disk,
    offset: u64,
    len: u32,
    crc: u32,
) -> Result<Result<Vec<u8>, String>, ImageError> {
    let mut buf = vec![0u8; len as usize];
    if len > 0 {
        disk.read_at(offset, &mut buf)?;
    }
    if crc32c::crc32c(&buf) != crc {
        return Ok(Err(format!(
            "checksum mismatch in {len} bytes at area offset {offset}"
        )));
    }
    Ok(Ok(buf))
}

/// Verifies the generation `slot` describes: directory and every blob.
pub(crate) fn load(disk: &dyn Disk, index: usize, slot: Slot) -> Result<Generation, LoadFailure> {
    if slot.area_len > disk.size() {
        return Err(LoadFailure::Bad(format!(
            "store area of {} bytes exceeds the {} allocated bytes of the image",
            slot.area_len,
            disk.size()
        )));
    }
    let d = slot.directory;
    let dir_bytes =
        match read_checked(disk, d.offset, d.len, slot.directory_crc).map_err(LoadFailure::Disk)? {
            Ok(b) => b,
            Err(why) => return Err(LoadFailure::Bad(format!("directory: {why}"))),
        };
    let dir = match Directory::decode(&dir_bytes, &slot) {
        Ok(dir) => dir,
        Err(DirectoryProblem::NewerVersion(v)) => {
            return Err(LoadFailure::Newer(format!("directory version {v}")))
        }
        Err(e) => return Err(LoadFailure::Bad(e.to_string())),
    };
    for (name, b) in &dir.blobs {
        if let Err(why) =
            read_checked(disk, b.extent.offset, b.extent.len, b.crc).map_err(LoadFailure::Disk)?
        {
            return Err(LoadFailure::Bad(format!("blob {name:?}: {why}")));
        }
    }
    Ok(Generation {
        slot_index: index,
        slot,
        dir,
        dir_bytes,
    })
}

/// Both slots' state plus the generation to open.
pub(crate) struct Recovery {
    pub chosen: Generation,
    pub reports: Vec<SlotReport>,
}

/// Opens at the newest generation that verifies.
pub(crate) fn recover(disk: &dyn Disk, path: &Path) -> Result<Recovery, StoreError> {
    let mut reports = Vec::new();
    let mut candidates = Vec::new();
    let mut any_magic = false;
    for index in 0..SLOT_OFFSETS.len() {
        match read_slot(disk, index)? {
            Ok(slot) => {
                any_magic = true;
                reports.push(SlotReport {
                    index,
                    generation: Some(slot.generation),
                    status: "header ok".into(),
                    sound: false,
                });
                candidates.push((index, slot));
            }
            Err(SlotProblem::NewerVersion(v)) => {
                return Err(StoreError::NewerFormat {
                    path: path.to_path_buf(),
                    what: format!(
                        "format version {v} (slot {index}) is newer than supported ({})",
                        crate::format::FORMAT_VERSION
                    ),
                })
            }
            Err(p) => {
                let empty = p == SlotProblem::NoMagic;
                any_magic |= !empty;
                reports.push(SlotReport {
                    index,
                    generation: None,
                    status: p.to_string(),
                    sound: empty,
                });
            }
        }
    }
    if !any_magic {
        return Err(StoreError::NotAStore {
            path: path.to_path_buf(),
        });
    }
    candidates.sort_by_key(|(_, s)| std::cmp::Reverse(s.generation));
    let mut chosen = None;
    for (index, slot) in candidates {
        let status = match load(disk, index, slot) {
            Ok(g) => {
                let status = if chosen.is_none() {
                    "ok (current)"
                } else {
                    "ok"
                };
                chosen.get_or_insert(g);
                reports[index].sound = true;
                status.to_string()
            }
            Err(LoadFailure::Disk(e)) => return Err(e.into()),
            Err(LoadFailure::Newer(what)) => {
                return Err(StoreError::NewerFormat {
                    path: path.to_path_buf(),
                    what: format!("{what} (slot {index}) is newer than supported"),
                })
            }
            Err(LoadFailure::Bad(why)) => format!("does not verify: {why}"),
        };
        reports[index].status = status;
    }
    match chosen {
        Some(chosen) => Ok(Recovery { chosen, reports }),
        None => {
            let why: Vec<String> = reports
                .iter()
                .map(|r| format!("slot {}: {}", r.index, r.status))
                .collect();
            Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("no header slot verifies ({})", why.join("; ")),
            })
        }
    }
}
