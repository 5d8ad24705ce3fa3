//! Reading a generation back and choosing the one to open: from the newest
//! header slot, follow the chain of headers each commit names in `next`, and
//! take the newest generation whose header, directory and every blob verify
//! (`docs/format.md` argues why that is always the last durable commit or the
//! one being written).

use super::StoreError;
use crate::format::{
    Directory, DirectoryProblem, Extent, Slot, SlotProblem, BLOCK, SLOT_BYTES, SLOT_OFFSETS,
};
use crate::image::{Disk, ImageError};
use std::path::Path;

/// Most chained commits after an anchor. A commit past it anchors, which
/// bounds both the blocks pinned by chain headers and the reads at open.
pub(crate) const MAX_CHAIN: usize = 32;

/// A fully verified generation.
#[derive(Debug, Clone)]
pub(crate) struct Generation {
    /// Area offset its header was read from (a slot, or a chained block).
    pub header_at: u64,
    pub slot: Slot,
    pub dir: Directory,
    pub dir_bytes: Vec<u8>,
}

/// The headers recovery depends on besides the current generation's blocks:
/// nothing may overwrite them until a newer anchor is durable.
#[derive(Debug, Clone, Default)]
pub(crate) struct Chain {
    /// Slot holding the anchor the current generation is reached from.
    pub anchor_slot: usize,
    /// Area offsets of the chained headers after the anchor, oldest first.
    pub headers: Vec<u64>,
    /// Blocks of a newer, unverifiable generation left by a crash (a torn
    /// commit). Kept unused, and the next commit anchors, so that no later
    /// write can complete it into a generation that verifies.
    pub quarantine: Vec<Extent>,
}

impl Chain {
    /// Every block recovery needs besides the current generation's own.
    pub fn pinned(&self) -> impl Iterator<Item = Extent> + '_ {
        self.headers
            .iter()
            .map(|&offset| Extent {
                offset,
                len: BLOCK as u32,
            })
            .chain(self.quarantine.iter().copied())
    }
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

/// The status of the slot holding the current generation's anchor, when
/// `chained` commits follow it in its chain.
pub(super) fn anchor_status(generation: u64, chained: usize) -> String {
    match chained {
        0 => "ok (current)".into(),
        n => format!("ok (anchor of the current generation {generation}, {n} chained commits on)"),
    }
}

/// Why a generation failed to verify: its data, or the disk below.
pub(crate) enum LoadFailure {
    Bad(String),
    Newer(String),
    Disk(ImageError),
}

/// Reads and decodes the header at area `offset`.
pub(crate) fn read_header(
    disk: &dyn Disk,
    offset: u64,
) -> Result<Result<Slot, SlotProblem>, ImageError> {
    let mut buf = [0u8; SLOT_BYTES];
    if offset
        .checked_add(SLOT_BYTES as u64)
        .is_none_or(|end| end > disk.size())
    {
        return Ok(Err(SlotProblem::NoMagic));
    }
    disk.read_at(offset, &mut buf)?;
    Ok(Slot::decode_at(&buf, offset))
}

pub(crate) fn read_slot(
    disk: &dyn Disk,
    index: usize,
) -> Result<Result<Slot, SlotProblem>, ImageError> {
    read_header(disk, SLOT_OFFSETS[index])
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

/// Reads and checks the directory `slot` names.
fn load_directory(disk: &dyn Disk, slot: &Slot) -> Result<(Directory, Vec<u8>), LoadFailure> {
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
    match Directory::decode(&dir_bytes, slot) {
        Ok(dir) => Ok((dir, dir_bytes)),
        Err(DirectoryProblem::NewerVersion(v)) => {
            Err(LoadFailure::Newer(format!("directory version {v}")))
        }
        Err(e) => Err(LoadFailure::Bad(e.to_string())),
    }
}

/// An authenticated check of a header and its directory's bytes (the
/// directory MAC under the store's key): recovery skips a generation that
/// fails it, as one whose checksums fail.
pub(crate) type Authenticate<'a> = &'a dyn Fn(&Slot, &Directory, &[u8]) -> bool;

/// Verifies the generation `slot` describes: directory and every blob, and
/// the directory's authentication where `auth` is given.
pub(crate) fn load(
    disk: &dyn Disk,
    header_at: u64,
    slot: Slot,
    auth: Option<Authenticate>,
) -> Result<Generation, LoadFailure> {
    let (dir, dir_bytes) = load_directory(disk, &slot)?;
    if auth.is_some_and(|auth| !auth(&slot, &dir, &dir_bytes)) {
        return Err(LoadFailure::Bad(
            "it does not authenticate under the key (key check or directory MAC)".into(),
        ));
    }
    for (name, b) in &dir.blobs {
        if let Err(why) =
            read_checked(disk, b.extent.offset, b.extent.len, b.crc).map_err(LoadFailure::Disk)?
        {
            return Err(LoadFailure::Bad(format!("blob {name:?}: {why}")));
        }
    }
    Ok(Generation {
        header_at,
        slot,
        dir,
        dir_bytes,
    })
}

/// The blocks a header that did not verify may claim: its own block, its
/// directory, and the blobs that directory lists if it still decodes.
fn claimed_extents(disk: &dyn Disk, header_at: u64, slot: &Slot) -> Vec<Extent> {
    let mut out = vec![slot.directory];
    if !SLOT_OFFSETS.contains(&header_at) {
        out.push(Extent {
            offset: header_at,
            len: BLOCK as u32,
        });
    }
    if let Ok((dir, _)) = load_directory(disk, slot) {
        out.extend(dir.blobs.values().map(|b| b.extent));
    }
    out.retain(|e| e.len > 0 && e.end() <= disk.size());
    out
}

/// Headers with their area offsets, anchor first, and the damaged header the
/// walk stopped at, if it stopped at damage.
pub(crate) type Walk = (Vec<(u64, Slot)>, Option<Skipped>);

/// A commit newer than the generation served whose header, directory or
/// blobs do not verify: the commit being written when a crash came, or damage.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// Its generation, when its header decodes.
    pub generation: Option<u64>,
    /// Area offset of its header (a slot, or a chained block).
    pub header_offset: u64,
    /// Why it does not verify.
    pub reason: String,
    /// It has the shape a crash during the commit after the served one
    /// leaves: the next generation, built on the served one, at the place
    /// that commit writes its header (or an undecodable header there).
    /// Damage to that commit has the same shape (`docs/format.md`, section 5).
    pub could_be_torn: bool,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (at, why) = (self.header_offset, &self.reason);
        match self.generation {
            Some(g) => write!(
                f,
                "generation {g} (header at area offset {at}) does not verify: {why}"
            ),
            None => write!(f, "header at area offset {at}: {why}"),
        }
    }
}

/// The headers reachable from an anchor: the anchor, then each successor
/// found where its predecessor's `next` points, with the next generation
/// number and the predecessor's commit id. Also returns why the walk stopped,
/// when it stopped at something damaged rather than at unused space.
pub(crate) fn walk(disk: &dyn Disk, anchor_at: u64, anchor: Slot) -> Result<Walk, ImageError> {
    let mut chain = vec![(anchor_at, anchor)];
    let mut damaged = None;
    while chain.len() <= MAX_CHAIN {
        let cur = &chain[chain.len() - 1].1;
        if cur.next == 0 {
            break;
        }
        let at = cur.next;
        match read_header(disk, at)? {
            Ok(s)
                if cur.generation.checked_add(1) == Some(s.generation)
                    && s.prev_id == cur.commit_id
                    && s.store_id == cur.store_id =>
            {
                chain.push((at, s));
            }
            // Unused space, or an older commit's header: the chain ends here.
            Ok(_) | Err(SlotProblem::NoMagic) => break,
            Err(p) => {
                damaged = Some(Skipped {
                    generation: None,
                    header_offset: at,
                    reason: p.to_string(),
                    could_be_torn: false,
                });
                break;
            }
        }
    }
    Ok((chain, damaged))
}

/// Newer commits whose header is gone but whose embedded directory, right
/// after it in the same block, is still there: where the commit after
/// `chosen` writes its header (its `next`, or the other slot), no magic,
/// but a directory of this store naming a newer generation. A header
/// zeroed alone (its 512 bytes) is found this way; a whole block zeroed,
/// or a header with its directory in other blocks, leaves no trace.
fn orphans(
    disk: &dyn Disk,
    chosen: &Generation,
    other_slot: u64,
) -> Result<Vec<Skipped>, ImageError> {
    let mut found = Vec::new();
    // `next` 0 means "none"; the other slot may well be slot 0, at offset 0.
    let places = (chosen.slot.next != 0).then_some(chosen.slot.next);
    for at in places.into_iter().chain([other_slot]) {
        if read_header(disk, at)? != Err(SlotProblem::NoMagic) {
            continue;
        }
        let Some(start) = at.checked_add(SLOT_BYTES as u64) else {
            continue;
        };
        let mut buf = vec![0u8; crate::format::EMBEDDED_DIRECTORY_MAX as usize];
        if start
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > disk.size())
        {
            continue;
        }
        disk.read_at(start, &mut buf)?;
        let Some(g) = Directory::decode_loose(&buf)
            .filter(|d| d.store_id == chosen.slot.store_id)
            .map(|d| d.generation)
            .filter(|&g| g > chosen.slot.generation)
        else {
            continue;
        };
        found.push(Skipped {
            generation: Some(g),
            header_offset: at,
            reason: "its header is gone (no magic), but its directory is still there".into(),
            could_be_torn: chosen.slot.generation.checked_add(1) == Some(g),
        });
    }
    Ok(found)
}

/// Header slots that do not decode (a checksum that fails, fields that
/// cannot be right): they may have held a newer generation than `chosen`,
/// so they are listed. The other slot is where the commit after `chosen`
/// anchors, so a torn write there has the crash shape.
fn damaged_slots(reports: &[SlotReport], anchor: usize) -> Vec<Skipped> {
    reports
        .iter()
        .filter(|r| !r.sound && r.generation.is_none())
        .map(|r| Skipped {
            generation: None,
            header_offset: SLOT_OFFSETS[r.index],
            reason: format!("header slot {}: {}", r.index, r.status),
            could_be_torn: r.index != anchor,
        })
        .collect()
}

/// Headers of this store newer than `chosen` anywhere in the allocated
/// area, except at the places already listed. A header that does not decode
/// (a flipped bit of its magic is enough) ends a chain exactly as unused
/// space does, so the commits after it are out of reach; their headers are
/// still in their blocks. Every open looks: it reads the first 8 bytes of
/// each 4 KiB block (a header starts a block), and a whole header only
/// where the magic is.
fn newer_headers(
    disk: &dyn Disk,
    chosen: &Generation,
    listed: &[Skipped],
    next_at: [u64; 2],
) -> Result<Vec<Skipped>, ImageError> {
    let mut found = Vec::new();
    let mut magic = [0u8; 8];
    let mut header = [0u8; SLOT_BYTES];
    let mut at = crate::format::DATA_START;
    while at
        .checked_add(SLOT_BYTES as u64)
        .is_some_and(|end| end <= disk.size())
    {
        disk.read_at(at, &mut magic)?;
        if &magic == crate::format::MAGIC {
            disk.read_at(at, &mut header)?;
            if let Ok(s) = Slot::decode_at(&header, at) {
                let newer =
                    s.store_id == chosen.slot.store_id && s.generation > chosen.slot.generation;
                if newer && !listed.iter().any(|l| l.header_offset == at) {
                    found.push(Skipped {
                        generation: Some(s.generation),
                        header_offset: at,
                        reason: "a newer commit, out of reach behind a damaged header".into(),
                        could_be_torn: chosen.slot.generation.checked_add(1) == Some(s.generation)
                            && s.prev_id == chosen.slot.commit_id
                            && next_at.contains(&at),
                    });
                }
            }
        }
        at += BLOCK;
    }
    Ok(found)
}

/// The generation to open, how it is reached, and what the slots hold.
pub(crate) struct Recovery {
    pub chosen: Generation,
    pub chain: Chain,
    pub reports: Vec<SlotReport>,
    /// What is newer than the chosen generation and did not verify (a torn
    /// commit, or damage): reported by `check` and refused by a claim.
    pub skipped: Vec<Skipped>,
}

/// Opens at the newest generation that verifies.
pub(crate) fn recover(
    disk: &dyn Disk,
    path: &Path,
    auth: Option<Authenticate>,
) -> Result<Recovery, StoreError> {
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
                    status: "ok (older anchor, not needed)".into(),
                    sound: true,
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
            first_data: super::create::first_data(disk, super::DEFAULT_AREA)?,
        });
    }
    candidates.sort_by_key(|(_, s)| std::cmp::Reverse(s.generation));
    // Headers newer than the generation finally chosen, which did not verify.
    let mut unverified: Vec<(u64, Slot, String)> = Vec::new();
    let mut damaged_next = None;
    for (index, anchor) in candidates {
        let (chain, damaged) = walk(disk, SLOT_OFFSETS[index], anchor)?;
        let mut failures = Vec::new();
        for (pos, (at, header)) in chain.iter().enumerate().rev() {
            match load(disk, *at, header.clone(), auth) {
                Ok(chosen) => {
                    reports[index].status = anchor_status(chosen.slot.generation, pos);
                    unverified.extend(failures);
                    let quarantine = unverified
                        .iter()
                        .flat_map(|(at, s, _)| claimed_extents(disk, *at, s))
                        .collect();
                    let next_at = [chosen.slot.next, SLOT_OFFSETS[1 - index]];
                    let skipped = unverified
                        .iter()
                        .map(|(at, s, why)| Skipped {
                            generation: Some(s.generation),
                            header_offset: *at,
                            reason: why.clone(),
                            could_be_torn: chosen.slot.generation.checked_add(1)
                                == Some(s.generation)
                                && s.prev_id == chosen.slot.commit_id
                                && next_at.contains(at),
                        })
                        .chain(if pos + 1 == chain.len() {
                            // Where the served header named its successor.
                            damaged.map(|d| Skipped {
                                could_be_torn: d.header_offset == chosen.slot.next,
                                ..d
                            })
                        } else {
                            None
                        })
                        .chain(damaged_next)
                        .collect::<Vec<_>>();
                    let mut skipped: Vec<Skipped> = skipped
                        .into_iter()
                        .chain(orphans(disk, &chosen, SLOT_OFFSETS[1 - index])?)
                        .chain(damaged_slots(&reports, index))
                        .collect();
                    let more = newer_headers(disk, &chosen, &skipped, next_at)?;
                    skipped.extend(more);
                    return Ok(Recovery {
                        chosen,
                        chain: Chain {
                            anchor_slot: index,
                            headers: chain[1..=pos].iter().map(|(at, _)| *at).collect(),
                            quarantine,
                        },
                        reports,
                        skipped,
                    });
                }
                Err(LoadFailure::Disk(e)) => return Err(e.into()),
                Err(LoadFailure::Newer(what)) => {
                    return Err(StoreError::NewerFormat {
                        path: path.to_path_buf(),
                        what: format!(
                            "{what} (header at area offset {at}) is newer than supported"
                        ),
                    })
                }
                Err(LoadFailure::Bad(why)) => failures.push((*at, header.clone(), why)),
            }
        }
        // Nothing reached from this slot verifies: it is damaged or its
        // anchored commit was torn; fall back to the other slot.
        let why = failures
            .first()
            .map(|(_, _, why)| why.clone())
            .unwrap_or_default();
        reports[index].status = format!("does not verify: {why}");
        reports[index].sound = false;
        damaged_next = damaged_next.or(damaged);
        unverified.extend(failures);
    }
    let why: Vec<String> = reports
        .iter()
        .map(|r| format!("slot {}: {}", r.index, r.status))
        .collect();
    Err(StoreError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("no header slot verifies ({})", why.join("; ")),
    })
}
