//! Looking at a store without changing it: `info`, the full `check`, and
//! the raw header views `dump-headers` prints, which also work on an image
//! whose store does not open.

use super::alloc::Allocator;
use super::recover::{self, Skipped, SlotReport};
use super::view::StoreView;
use super::{BlobInfo, StoreError};
use crate::format::{self, Slot};
use crate::image::{Disk, ImageError, Qcow2Disk, Qcow2Facts};
use std::path::{Path, PathBuf};

/// What `tpmstate info` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoreInfo {
    /// The image (or `<memory>`).
    pub path: PathBuf,
    /// Format version of the current header.
    pub format_version: u32,
    /// Current generation.
    pub generation: u64,
    /// Store id (hex).
    pub store_id: String,
    /// Whether blobs are encrypted.
    pub encrypted: bool,
    /// Whether the generation and store id shown were verified under the
    /// key (opened with it: the directory MAC covers both). A plaintext
    /// store's, or an encrypted one's read without its key, are not.
    pub identity_verified: bool,
    /// Whether free blocks may still hold data under a key the store no
    /// longer uses (a rekey's scrub did not finish; the next commit does it).
    pub old_key_data: bool,
    /// Whether the store has held state (a blob) at some time
    /// ([`StoreView::has_held_state`]).
    pub held_state: bool,
    /// "raw-key" or "argon2id" for encrypted stores.
    pub key_derivation: Option<String>,
    /// Store area in bytes.
    pub area_bytes: u64,
    /// Bytes used by the current generation (blocks of blobs and directory, plus header slots).
    pub used_bytes: u64,
    /// Bytes free for the next commit's blocks.
    pub free_bytes: u64,
    /// The largest run of free bytes: a commit writes its new blob versions
    /// and directory in one run where it can, beside the current generation.
    pub largest_free_bytes: u64,
    /// Area offset of the current generation's header (a slot or a chained block).
    pub header_offset: u64,
    /// Chained commits since the anchor in a header slot.
    pub chained_commits: usize,
    /// A newer generation that did not verify (left by a crash, or damage),
    /// in one line; `skipped` has the same, item by item.
    pub leftover: Option<String>,
    /// What is newer than the generation served and did not verify.
    pub skipped: Vec<Skipped>,
    /// Blobs, by name.
    pub blobs: Vec<BlobInfo>,
    /// Both header slots.
    pub slots: Vec<SlotReport>,
    /// qcow2 facts, for an image-backed store.
    pub qcow2: Option<Qcow2Facts>,
}

/// What [`StoreView::check`] or [`StoreView::verify`] verified.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    /// Generation verified.
    pub generation: u64,
    /// Blobs verified (and decrypted, for an encrypted store with its key).
    pub blobs: usize,
    /// Bytes verified: plaintext bytes when authenticated, stored bytes otherwise.
    pub bytes: u64,
    /// Whether the key check, the directory MAC and every blob's tag were
    /// verified too: true for a plaintext store, and for an encrypted one
    /// opened with its key.
    pub authenticated: bool,
    /// Both header slots.
    pub slots: Vec<SlotReport>,
    /// A newer generation that did not verify (left by a crash, or damage),
    /// in one line; `skipped` has the same, item by item.
    pub leftover: Option<String>,
    /// What is newer than the generation served and did not verify.
    pub skipped: Vec<Skipped>,
    /// Whether free blocks may still hold data under a key the store no
    /// longer uses (a rekey's scrub did not finish; the next commit does it).
    pub old_key_data: bool,
}

impl StoreView {
    /// Full verification: re-reads the current generation from the disk and
    /// checks every checksum, and for an encrypted store the key, the directory
    /// MAC and every blob's tag. Fails with [`StoreError::KeyMissing`] on an
    /// encrypted store opened without a key.
    pub fn check(&self) -> Result<CheckReport, StoreError> {
        if self.is_encrypted() && self.key.is_none() {
            return Err(self.key_missing());
        }
        self.verify()
    }

    /// Verifies everything the handle can: as [`StoreView::check`] with a
    /// key; without the key of an encrypted store, the header, the directory
    /// and every blob's checksum, with [`CheckReport::authenticated`] false.
    pub fn verify(&self) -> Result<CheckReport, StoreError> {
        let g = &self.current;
        let corrupt = |reason: String| StoreError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        // The header and directory as they are on disk now must be the ones
        // opened; every blob is then read once, checksummed and decrypted.
        if recover::read_header(&*self.disk, g.header_at)?.as_ref() != Ok(&g.slot) {
            return Err(corrupt(format!(
                "header at area offset {} changed or damaged since the store was opened",
                g.header_at
            )));
        }
        let d = g.slot.directory;
        match recover::read_checked(&*self.disk, d.offset, d.len, g.slot.directory_crc)? {
            Ok(bytes) if bytes == g.dir_bytes => {}
            Ok(_) => {
                return Err(corrupt(
                    "directory changed on disk since the store was opened".into(),
                ))
            }
            Err(why) => return Err(corrupt(format!("directory: {why}"))),
        }
        if let Some(key) = &self.key {
            key.verify_directory_mac(&g.slot.store_id, &g.dir_bytes, &g.slot.directory_mac)
                .map_err(|e| self.crypto(e))?;
        }
        let authenticated = self.key.is_some() || !self.is_encrypted();
        let mut bytes = 0u64;
        for (name, b) in &g.dir.blobs {
            bytes += match authenticated {
                true => self.get_required(name)?.len() as u64,
                false => {
                    match recover::read_checked(&*self.disk, b.extent.offset, b.extent.len, b.crc)?
                    {
                        Ok(stored) => stored.len() as u64,
                        Err(why) => return Err(corrupt(format!("blob {name:?}: {why}"))),
                    }
                }
            };
        }
        Ok(CheckReport {
            generation: g.slot.generation,
            blobs: g.dir.blobs.len(),
            bytes,
            authenticated,
            slots: self.slot_reports(),
            leftover: self.leftover(),
            skipped: self.skipped.clone(),
            old_key_data: self.old_key_remains(),
        })
    }

    /// Both slots' reports. The anchor's status names the current generation
    /// and the length of its chain, so it is written out here rather than on
    /// every commit.
    fn slot_reports(&self) -> Vec<SlotReport> {
        let mut reports = self.slots.clone();
        if let Some(anchor) = reports.get_mut(self.chain.anchor_slot) {
            anchor.status =
                recover::anchor_status(self.current.slot.generation, self.chain.headers.len());
        }
        reports
    }

    /// Facts for `tpmstate info`.
    pub fn info(&self) -> StoreInfo {
        let g = &self.current;
        let in_use = g.dir.extents(&g.slot).chain(self.chain.pinned());
        let free = Allocator::new(g.slot.area_len, in_use).free_runs();
        // An embedded directory lies in its header's block, counted below.
        let used: u64 = g
            .dir
            .extents(&g.slot)
            .filter(|e| !e.is_embedded())
            .map(|e| e.blocks() * format::BLOCK)
            .sum();
        StoreInfo {
            path: self.path.clone(),
            format_version: g.slot.format_version,
            generation: g.slot.generation,
            store_id: hex::encode(g.slot.store_id),
            encrypted: g.slot.encrypted,
            identity_verified: self.authenticated(),
            held_state: self.has_held_state(),
            old_key_data: self.old_key_remains(),
            key_derivation: g.dir.encryption.as_ref().map(|e| match e.kdf {
                format::Kdf::RawKey => "raw-key".to_string(),
                format::Kdf::Argon2id { m_kib, t, p, .. } => {
                    format!("argon2id (m={m_kib} KiB, t={t}, p={p})")
                }
            }),
            area_bytes: g.slot.area_len,
            used_bytes: used + format::DATA_START + self.chain.headers.len() as u64 * format::BLOCK,
            free_bytes: free.iter().map(|(s, e)| e - s).sum(),
            largest_free_bytes: free.iter().map(|(s, e)| e - s).max().unwrap_or(0),
            header_offset: g.header_at,
            chained_commits: self.chain.headers.len(),
            leftover: self.leftover(),
            skipped: self.skipped.clone(),
            blobs: self.list(),
            slots: self.slot_reports(),
            qcow2: self.facts.clone(),
        }
    }
}

/// The decodable header slots of an open store (for diagnostics and tests).
pub fn dump_headers_of(store: &StoreView) -> Vec<Slot> {
    dump_headers(&*store.disk)
        .into_iter()
        .filter_map(|(_, s)| s.ok())
        .collect()
}

/// A chained header's area offset, and the header or why it is unusable.
pub type ChainedHeader = (u64, Result<Slot, String>);

/// The chained headers reached from `anchor` (read from slot `index`), each
/// with its area offset, ending with the damaged header the walk stopped at,
/// if any: for `tpmstate dump-headers`.
pub fn dump_chain(
    disk: &dyn Disk,
    index: usize,
    anchor: &Slot,
) -> Result<Vec<ChainedHeader>, StoreError> {
    let (chain, damaged) = recover::walk(disk, format::SLOT_OFFSETS[index], anchor.clone())?;
    let mut out: Vec<_> = chain
        .into_iter()
        .skip(1)
        .map(|(at, s)| (at, Ok(s)))
        .collect();
    if let Some(damaged) = damaged {
        out.push((damaged.header_offset, Err(damaged.to_string())));
    }
    Ok(out)
}

/// Raw view of both header slots, for `tpmstate dump-headers` on a damaged
/// image: needs only a readable qcow2 mapping, no lock beyond force-share.
pub fn dump_headers(disk: &dyn Disk) -> Vec<(usize, Result<Slot, String>)> {
    (0..format::SLOT_OFFSETS.len())
        .map(|i| {
            let r = match recover::read_slot(disk, i) {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(p)) => Err(p.to_string()),
                Err(e) => Err(e.to_string()),
            };
            (i, r)
        })
        .collect()
}

/// One header slot as `tpmstate dump-headers` shows it.
#[derive(Debug, Clone)]
pub struct SlotDump {
    /// 0 or 1.
    pub index: usize,
    /// The header, or why it is unusable.
    pub header: Result<Slot, String>,
    /// The chained headers reached from it (see [`dump_chain`]), or why
    /// they could not be read.
    pub chain: Result<Vec<ChainedHeader>, String>,
}

/// Every header `tpmstate dump-headers` can find in an image, even one
/// whose store does not open.
#[derive(Debug)]
pub enum ImageDump {
    /// The qcow2 layer opened: both slots through it, with their chains.
    Mapped {
        /// Allocated bytes of the store area.
        area_bytes: u64,
        /// Both slots.
        slots: Vec<SlotDump>,
    },
    /// The qcow2 layer is unusable: every 512-byte-aligned sector of the raw
    /// file that starts with the header magic, by file offset.
    Raw {
        /// Why the qcow2 layer is unusable.
        unusable: ImageError,
        /// Length of the file scanned.
        file_len: u64,
        /// What was found, by file offset.
        found: Vec<(u64, Result<Slot, String>)>,
    },
}

/// Reads every header of the image at `path` without locking it (like
/// `qemu-img -U`) and without opening the store, for diagnostics. Like
/// [`crate::lock::holders_of`], it opens and closes a descriptor of its
/// own, which drops this process's POSIX locks on the image, if it holds any.
pub fn dump_image(path: &Path) -> Result<ImageDump, StoreError> {
    let file = super::open_file(path, false)?;
    let disk = match Qcow2Disk::open(path, file.clone()) {
        Ok(disk) => disk,
        Err(unusable) => return scan_raw(path, &file, unusable),
    };
    let slots = dump_headers(&disk)
        .into_iter()
        .map(|(index, header)| {
            let chain = match &header {
                Ok(s) => dump_chain(&disk, index, s).map_err(|e| e.to_string()),
                Err(_) => Ok(Vec::new()),
            };
            SlotDump {
                index,
                header,
                chain,
            }
        })
        .collect();
    Ok(ImageDump::Mapped {
        area_bytes: disk.size(),
        slots,
    })
}

fn scan_raw(
    path: &Path,
    file: &std::fs::File,
    unusable: ImageError,
) -> Result<ImageDump, StoreError> {
    use std::os::unix::fs::FileExt;
    let io = |source| ImageError::Io {
        path: path.to_path_buf(),
        op: "read",
        source,
    };
    let file_len = file.metadata().map_err(io)?.len();
    let mut buf = vec![0u8; 1 << 20];
    let mut found = Vec::new();
    let mut base = 0u64;
    while base < file_len {
        let n = file.read_at(&mut buf, base).map_err(io)?;
        if n == 0 {
            break;
        }
        for at in (0..n).step_by(512) {
            let sector = &buf[at..n.min(at + 512)];
            if sector.starts_with(format::MAGIC) {
                let header = Slot::decode(sector).map_err(|why| why.to_string());
                found.push((base + at as u64, header));
            }
        }
        base += n as u64;
    }
    Ok(ImageDump::Raw {
        unusable,
        file_len,
        found,
    })
}
