//! The store: named blobs in a qcow2 image (or any [`Disk`]), committed
//! atomically and durably with one sync, optionally encrypted.
//!
//! A [`Store`] holds the last committed [`recover::Generation`] in memory. A
//! [`Transaction`] collects puts and deletes; its commit builds the next
//! generation on a copy, writes it to blocks the current one does not use
//! (with its header in the run's first block, where the current header's
//! `next` points, or in the other header slot), syncs once, and only then
//! replaces the in-memory state. A failed commit leaves the handle at the old
//! generation.

mod commit;
mod error;
mod inspect;
mod recover;

pub use commit::Transaction;
pub use error::StoreError;
pub use inspect::{
    dump_chain, dump_headers, dump_headers_of, ChainedHeader, CheckReport, StoreInfo,
};
pub use recover::SlotReport;

use crate::crypto::{Key, KeySource};
use crate::format::{self, Slot, SLOT_BYTES};
use crate::image::{CreateOptions, Disk, PageBuf, Qcow2Disk, Qcow2Facts};
use crate::lock::{ImageLock, LockGuard, LockMode, Locking};
use recover::{Chain, Generation};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// Default store area: holds libtpms's largest state (a 512 KiB `permall`
/// plus volatile state) twice over, copy-on-write space included.
pub const DEFAULT_AREA: u64 = 4 << 20;

/// How to open an existing store.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Key for an encrypted store (`None` for a plaintext one; reading an
    /// encrypted store's blobs then fails with [`StoreError::KeyMissing`]).
    pub key: Option<KeySource>,
    /// Lock mode taken on open; [`LockMode::Writer`] and up open the file read-write.
    pub mode: LockMode,
    /// QEMU's `locking=` option.
    pub locking: Locking,
    /// How long to wait for a conflicting holder (`None`: try once).
    pub lock_timeout: Option<Duration>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            key: None,
            mode: LockMode::Writer,
            locking: Locking::Auto,
            lock_timeout: None,
        }
    }
}

/// How to format a store.
#[derive(Debug, Clone, Default)]
pub struct FormatOptions {
    /// Encrypt blobs with this key (`None`: plaintext store).
    pub key: Option<KeySource>,
    /// Store area in bytes (default: the image's virtual size, at most [`DEFAULT_AREA`]).
    pub area: Option<u64>,
    /// QEMU's `locking=` option.
    pub locking: Locking,
}

/// A blob as listed by [`Store::list`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlobInfo {
    /// Its name.
    pub name: String,
    /// Plaintext size in bytes.
    pub size: u32,
    /// Generation that last wrote it.
    pub written_generation: u64,
    /// Area offset of its stored bytes (for diagnostics).
    pub area_offset: u64,
    /// Stored bytes (plaintext size plus the 16-byte tag when encrypted).
    pub stored_bytes: u32,
}

struct Locks {
    lock: ImageLock,
    guard: Option<LockGuard>,
    warning: Option<String>,
}

/// An open store. See the module documentation.
pub struct Store {
    path: PathBuf,
    disk: Box<dyn Disk>,
    current: Generation,
    chain: Chain,
    slots: Vec<SlotReport>,
    leftover: Option<String>,
    /// The next commit anchors and names no successor, so that it and the
    /// one after rewrite both header slots (a repair after damage).
    settle_next: bool,
    /// The last commit's write buffer, reused (it holds no plaintext of an
    /// encrypted store: only ciphertext and metadata).
    write_buf: PageBuf,
    key: Option<Key>,
    locks: Option<Locks>,
    facts: Option<Qcow2Facts>,
    poisoned: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("generation", &self.current.slot.generation)
            .field("encrypted", &self.current.slot.encrypted)
            .finish_non_exhaustive()
    }
}

/// Opens the image file once (read-write when `writable`).
pub(crate) fn open_file(path: &Path, writable: bool) -> Result<Arc<File>, StoreError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map(Arc::new)
        .map_err(|source| {
            crate::image::ImageError::Io {
                path: path.to_path_buf(),
                op: "open",
                source,
            }
            .into()
        })
}

impl Store {
    /// Opens the store in the qcow2 image at `path`: takes the lock, validates the
    /// image, recovers the newest generation that verifies, and checks the key.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Store, StoreError> {
        let file = open_file(path, opts.mode >= LockMode::Writer)?;
        let (lock, warning) = ImageLock::new(path, file.clone(), opts.locking)?;
        let guard = lock.acquire(opts.mode, opts.lock_timeout)?;
        let mut disk = Qcow2Disk::open(path, file)?;
        if opts.mode >= LockMode::Writer {
            // The write lock is ours: free what a crash during an earlier
            // format or growth leaked, so `qemu-img check` passes again.
            disk.reclaim_leaks()?;
        }
        let facts = disk.facts();
        let mut store = Store::open_disk(Box::new(disk), path, opts.key.as_ref())?;
        store.facts = Some(facts);
        store.locks = Some(Locks {
            lock,
            guard: Some(guard),
            warning,
        });
        Ok(store)
    }

    /// Opens a store on any [`Disk`] (tests use [`crate::image::CrashDisk`]).
    /// No lock is involved and nothing is written.
    pub fn open_disk(
        disk: Box<dyn Disk>,
        path: &Path,
        key: Option<&KeySource>,
    ) -> Result<Store, StoreError> {
        let recovery = recover::recover(&*disk, path)?;
        let mut store = Store {
            path: path.to_path_buf(),
            disk,
            current: recovery.chosen,
            chain: recovery.chain,
            slots: recovery.reports,
            leftover: recovery.leftover,
            settle_next: false,
            write_buf: PageBuf::default(),
            key: None,
            locks: None,
            facts: None,
            poisoned: false,
        };
        store.key = store.unlock(key)?;
        Ok(store)
    }

    /// Derives and checks the master key against the current generation.
    fn unlock(&self, key: Option<&KeySource>) -> Result<Option<Key>, StoreError> {
        let enc = &self.current.dir.encryption;
        let (source, enc) = match (key, enc) {
            (None, _) => return Ok(None),
            (Some(_), None) => {
                return Err(StoreError::KeyNotExpected {
                    path: self.path.clone(),
                })
            }
            (Some(s), Some(e)) => (s, e),
        };
        let crypto = |source| StoreError::Crypto {
            path: self.path.clone(),
            source,
        };
        let master = source.master_key(&enc.kdf).map_err(crypto)?;
        let id = &self.current.slot.store_id;
        master
            .verify_key_check(id, &enc.key_check)
            .map_err(crypto)?;
        master
            .verify_directory_mac(
                id,
                &self.current.dir_bytes,
                &self.current.slot.directory_mac,
            )
            .map_err(crypto)?;
        Ok(Some(master))
    }

    /// Creates a new qcow2 image at `path` (which must not exist) holding an
    /// empty store. The image is built under a temporary name and linked into
    /// place only when complete, so a crash leaves no half-made image at `path`.
    pub fn create(
        path: &Path,
        image: CreateOptions,
        opts: FormatOptions,
    ) -> Result<(), StoreError> {
        if path.exists() {
            return Err(StoreError::Usage(format!(
                "{}: already exists",
                path.display()
            )));
        }
        let file_name = path
            .file_name()
            .ok_or_else(|| StoreError::Usage(format!("{}: not a file path", path.display())))?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.tpmstate-{}.tmp",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        let result = (|| {
            Qcow2Disk::create_file(&tmp, image)?;
            Store::format(&tmp, opts)?;
            let io = |op, source| crate::image::ImageError::Io {
                path: path.to_path_buf(),
                op,
                source,
            };
            // link() refuses to replace an existing file, unlike rename().
            std::fs::hard_link(&tmp, path).map_err(|e| io("link", e))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("fsync directory", e))?;
            Ok(())
        })();
        let _ = std::fs::remove_file(&tmp);
        result
    }

    /// Formats a new, empty store inside the existing qcow2 image at `path`
    /// (for example one made by `qemu-img create -f qcow2 IMAGE 4M`), under an
    /// exclusive lock. Any store already there is destroyed.
    pub fn format(path: &Path, opts: FormatOptions) -> Result<(), StoreError> {
        let file = open_file(path, true)?;
        let (lock, _warning) = ImageLock::new(path, file.clone(), opts.locking)?;
        let _guard = lock.acquire(LockMode::Exclusive, None)?;
        let mut disk = Qcow2Disk::open(path, file)?;
        let area =
            opts.area.unwrap_or(DEFAULT_AREA.min(disk.max_len())) / format::BLOCK * format::BLOCK;
        if area < format::DATA_START + 4 * format::BLOCK || area > disk.max_len() {
            return Err(StoreError::Usage(format!(
                "{}: store area of {area} bytes does not fit (image virtual size {} bytes, at least {} needed)",
                path.display(),
                disk.max_len(),
                format::DATA_START + 4 * format::BLOCK
            )));
        }
        disk.zero_fill(area)?;
        Store::format_disk(&mut disk, path, area, opts.key.as_ref())
    }

    /// Writes generation 1 (no blobs) to a zeroed `disk`, with one sync.
    pub fn format_disk(
        disk: &mut dyn Disk,
        path: &Path,
        area: u64,
        key: Option<&KeySource>,
    ) -> Result<(), StoreError> {
        let mut store_id = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut store_id);
        let crypto = |source| StoreError::Crypto {
            path: path.to_path_buf(),
            source,
        };
        let (encryption, master) = match key {
            None => (None, None),
            Some(source) => {
                let kdf = source.new_kdf();
                let master = source.master_key(&kdf).map_err(crypto)?;
                let key_check = master.key_check(&store_id);
                (Some(format::Encryption { kdf, key_check }), Some(master))
            }
        };
        let dir = format::Directory {
            version: format::DIRECTORY_VERSION,
            store_id,
            generation: 1,
            encryption,
            blobs: Default::default(),
        };
        let bytes = dir.encode();
        let slot = Slot {
            format_version: format::FORMAT_VERSION,
            encrypted: master.is_some(),
            generation: 1,
            store_id,
            area_len: area,
            // Embedded in slot 0's block (an empty directory is far below
            // EMBEDDED_DIRECTORY_MAX).
            directory: format::Extent {
                offset: format::SLOT_OFFSETS[0] + SLOT_BYTES as u64,
                len: bytes.len() as u32,
            },
            directory_crc: crc32c::crc32c(&bytes),
            directory_mac: master
                .map(|m| m.directory_mac(&store_id, &bytes))
                .unwrap_or([0; 32]),
            commit_id: rand::random(),
            prev_id: [0; 16],
            // The first commit anchors.
            next: 0,
        };
        let mut slot0 = vec![0u8; format::BLOCK as usize];
        slot0[..SLOT_BYTES].copy_from_slice(&slot.encode());
        slot0[SLOT_BYTES..SLOT_BYTES + bytes.len()].copy_from_slice(&bytes);
        disk.write_at(format::SLOT_OFFSETS[0], &slot0)?;
        disk.write_at(format::SLOT_OFFSETS[1], &[0u8; format::BLOCK as usize])?;
        disk.sync()?;
        Ok(())
    }

    /// The image path (or `<memory>`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current generation number.
    pub fn generation(&self) -> u64 {
        self.current.slot.generation
    }

    /// Whether blobs are encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.current.slot.encrypted
    }

    /// The image's lock state, for nested or stronger acquisitions.
    pub fn lock(&self) -> Option<&ImageLock> {
        self.locks.as_ref().map(|l| &l.lock)
    }

    /// A warning from opening the lock (POSIX fallback), to show the user.
    pub fn lock_warning(&self) -> Option<&str> {
        self.locks.as_ref().and_then(|l| l.warning.as_deref())
    }

    /// Drops the lock acquisition taken by [`Store::open`]; the handle stays
    /// usable for reads. Used by a migration source when it hands over.
    pub fn release_open_lock(&mut self) {
        if let Some(l) = &mut self.locks {
            l.guard = None;
        }
    }

    /// Takes `mode` again as the handle's own acquisition (after
    /// [`Store::release_open_lock`]), waiting up to `timeout`.
    pub fn reacquire_lock(
        &mut self,
        mode: LockMode,
        timeout: Option<Duration>,
    ) -> Result<(), StoreError> {
        if let Some(l) = &mut self.locks {
            let guard = l.lock.acquire(mode, timeout)?;
            l.guard = Some(guard);
        }
        Ok(())
    }

    /// Names of the blobs, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.current.dir.blobs.keys().map(String::as_str)
    }

    /// The blobs with their sizes.
    pub fn list(&self) -> Vec<BlobInfo> {
        self.current
            .dir
            .blobs
            .iter()
            .map(|(name, b)| BlobInfo {
                name: name.clone(),
                size: b.plain_len,
                written_generation: b.written_gen,
                area_offset: b.extent.offset,
                stored_bytes: b.extent.len,
            })
            .collect()
    }

    /// Whether a blob exists.
    pub fn contains(&self, name: &str) -> bool {
        self.current.dir.blobs.contains_key(name)
    }

    /// Reads a blob (`None` if absent), verifying its checksum and, for an
    /// encrypted store, its authentication tag.
    pub fn get(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        let Some(b) = self.current.dir.blobs.get(name) else {
            return Ok(None);
        };
        let stored = match recover::read_checked(&*self.disk, b.extent.offset, b.extent.len, b.crc)?
        {
            Ok(s) => Zeroizing::new(s),
            Err(why) => {
                return Err(StoreError::Corrupt {
                    path: self.path.clone(),
                    reason: format!("blob {name:?}: {why}"),
                })
            }
        };
        match &b.sealed {
            None => Ok(Some(stored)),
            Some(sealed) => {
                let key = self.key.as_ref().ok_or_else(|| StoreError::KeyMissing {
                    path: self.path.clone(),
                })?;
                key.open(
                    &self.current.slot.store_id,
                    name,
                    b.written_gen,
                    sealed,
                    &stored,
                )
                .map(Some)
                .map_err(|source| StoreError::Crypto {
                    path: self.path.clone(),
                    source,
                })
            }
        }
    }

    /// Reads a blob that must exist.
    pub fn get_required(&self, name: &str) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        self.get(name)?.ok_or_else(|| StoreError::NoSuchBlob {
            path: self.path.clone(),
            name: name.to_string(),
        })
    }

    /// Starts a transaction.
    pub fn transaction<'d>(&mut self) -> Transaction<'_, 'd> {
        Transaction::new(self)
    }

    /// Puts one blob in its own transaction.
    pub fn put(&mut self, name: &str, data: &[u8]) -> Result<u64, StoreError> {
        let mut t = self.transaction();
        t.put(name, data)?;
        t.commit()
    }

    /// Deletes one blob in its own transaction (`NoSuchBlob` if absent).
    pub fn delete(&mut self, name: &str) -> Result<u64, StoreError> {
        if !self.contains(name) {
            return Err(StoreError::NoSuchBlob {
                path: self.path.clone(),
                name: name.to_string(),
            });
        }
        let mut t = self.transaction();
        t.delete(name)?;
        t.commit()
    }

    /// Changes the key (or encrypts a plaintext store) in one atomic commit:
    /// every blob is re-encrypted under `new`, with a new key check. Once that
    /// commit is durable, every block it does not use and the other header
    /// slot are overwritten with zeros (and synced), so no ciphertext under
    /// the old key (or old plaintext) is left in the store area.
    pub fn rekey(&mut self, new: &KeySource) -> Result<u64, StoreError> {
        if self.is_encrypted() && self.key.is_none() {
            return Err(StoreError::KeyMissing {
                path: self.path.clone(),
            });
        }
        let kdf = new.new_kdf();
        let master = new.master_key(&kdf).map_err(|source| StoreError::Crypto {
            path: self.path.clone(),
            source,
        })?;
        let mut t = Transaction::new(self);
        t.rekey_to(master, kdf)?;
        let generation = t.commit()?;
        self.scrub_free_space()?;
        Ok(generation)
    }

    /// Zeroes every block of the area the current generation does not use,
    /// and the other header slot. Only free space is written, so a crash
    /// part-way leaves the current generation intact.
    fn scrub_free_space(&mut self) -> Result<(), StoreError> {
        let g = &self.current;
        let mut used: Vec<(u64, u64)> = g
            .dir
            .extents(&g.slot)
            .chain(self.chain.pinned())
            .filter(|e| e.len > 0)
            .map(|e| (e.start(), e.end()))
            .collect();
        used.sort_unstable();
        let mut free = Vec::new();
        let mut at = format::DATA_START;
        for (s, e) in used.into_iter().chain([(g.slot.area_len, g.slot.area_len)]) {
            if s > at {
                free.push((at, s));
            }
            at = at.max(e);
        }
        let other = 1 - self.chain.anchor_slot;
        let zeros = vec![0u8; 64 * 1024];
        let result = (|| {
            self.disk.write_at(
                format::SLOT_OFFSETS[other],
                &zeros[..format::BLOCK as usize],
            )?;
            for (start, end) in free {
                let mut off = start;
                while off < end {
                    let n = (end - off).min(zeros.len() as u64);
                    self.disk.write_at(off, &zeros[..n as usize])?;
                    off += n;
                }
            }
            self.disk.sync()
        })();
        if let Err(e) = result {
            self.poisoned = true;
            return Err(e.into());
        }
        self.slots[other] = SlotReport {
            index: other,
            generation: None,
            status: "no tpmstate magic".into(),
            sound: true,
        };
        Ok(())
    }

    /// Attaches the lock a migration claim took (crate-internal).
    pub(crate) fn with_lock(
        mut self,
        lock: ImageLock,
        guard: LockGuard,
        warning: Option<String>,
    ) -> Store {
        self.locks = Some(Locks {
            lock,
            guard: Some(guard),
            warning,
        });
        self
    }

    /// Records qcow2 facts for [`Store::info`] (crate-internal).
    pub(crate) fn with_facts(mut self, facts: Qcow2Facts) -> Store {
        self.facts = Some(facts);
        self
    }

    /// The generation recovery would open now, read from the disk.
    pub fn disk_generation(&self) -> Result<u64, StoreError> {
        Ok(recover::recover(&*self.disk, &self.path)?
            .chosen
            .slot
            .generation)
    }

    /// Leaves the image in the form a migration target can check strictly:
    /// the current generation anchored in a header slot, naming no successor
    /// block, with both slots sound and nothing newer left by a crash. Commits
    /// an unchanged generation when the image is not already in that form.
    pub fn prepare_handover(&mut self) -> Result<(), StoreError> {
        let settled = self.slots.iter().all(|r| r.sound)
            && self.chain.headers.is_empty()
            && self.leftover.is_none()
            && self.current.slot.next == 0;
        if settled {
            return Ok(());
        }
        let mut t = Transaction::new(self);
        t.settle();
        t.commit().map(|_| ())
    }

    /// Makes the next commit anchor in a slot and name no successor, so
    /// that it and the commit after it rewrite both header slots: a source
    /// whose image was damaged during a migration repairs it this way.
    pub(crate) fn settle_next_commit(&mut self) {
        self.settle_next = true;
    }

    fn writable(&self) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned {
                path: self.path.clone(),
            });
        }
        match &self.locks {
            Some(l) if l.lock.held() < Some(LockMode::Writer) => Err(StoreError::NotWritable {
                path: self.path.clone(),
            }),
            _ => Ok(()),
        }
    }
}
