//! What every handle can do: read. A [`StoreView`] holds the last committed
//! generation in memory and reads blobs through it; the handle types
//! ([`super::Store`], [`super::ReadOnlyStore`], [`super::Released`]) all
//! dereference to one, and only the writer adds methods that write.

use super::recover::{self, Chain, Generation, SlotReport};
use super::{BlobInfo, StoreError};
use crate::crypto::{Key, KeySource};
use crate::image::{Disk, Qcow2Facts};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The read side of an open store, shared by every handle type. It cannot
/// be made or kept on its own: it lives inside a handle, which decides what
/// lock is held while it is read.
pub struct StoreView {
    pub(super) path: PathBuf,
    pub(super) disk: Box<dyn Disk>,
    pub(super) current: Generation,
    pub(super) chain: Chain,
    pub(super) slots: Vec<SlotReport>,
    pub(super) skipped: Vec<super::recover::Skipped>,
    pub(super) key: Option<Key>,
    pub(super) facts: Option<Qcow2Facts>,
}

impl std::fmt::Debug for StoreView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreView")
            .field("path", &self.path)
            .field("generation", &self.current.slot.generation)
            .field("encrypted", &self.current.slot.encrypted)
            .finish_non_exhaustive()
    }
}

impl StoreView {
    /// Recovers the newest generation on `disk` that verifies and checks the
    /// key against it. Reads only.
    pub(super) fn load(
        disk: Box<dyn Disk>,
        path: &Path,
        key: Option<&KeySource>,
        facts: Option<Qcow2Facts>,
    ) -> Result<StoreView, StoreError> {
        let recovery = recover::recover(&*disk, path)?;
        let mut view = StoreView {
            path: path.to_path_buf(),
            disk,
            current: recovery.chosen,
            chain: recovery.chain,
            slots: recovery.reports,
            skipped: recovery.skipped,
            key: None,
            facts,
        };
        view.key = view.unlock(key)?;
        Ok(view)
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
        let master = source.master_key(&enc.kdf).map_err(|e| self.crypto(e))?;
        let id = &self.current.slot.store_id;
        master
            .verify_key_check(id, &enc.key_check)
            .map_err(|e| self.crypto(e))?;
        master
            .verify_directory_mac(
                id,
                &self.current.dir_bytes,
                &self.current.slot.directory_mac,
            )
            .map_err(|e| self.crypto(e))?;
        Ok(Some(master))
    }

    /// What is newer than the generation served and did not verify.
    pub fn skipped(&self) -> &[super::recover::Skipped] {
        &self.skipped
    }

    /// The skipped generations in one line, as `info` and `check` report them.
    pub(super) fn leftover(&self) -> Option<String> {
        let parts: Vec<String> = self.skipped.iter().map(|s| s.to_string()).collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    pub(super) fn crypto(&self, source: crate::crypto::CryptoError) -> StoreError {
        StoreError::Crypto {
            path: self.path.clone(),
            source,
        }
    }

    pub(super) fn key_missing(&self) -> StoreError {
        StoreError::KeyMissing {
            path: self.path.clone(),
        }
    }

    pub(super) fn no_such_blob(&self, name: &str) -> StoreError {
        StoreError::NoSuchBlob {
            path: self.path.clone(),
            name: name.to_string(),
        }
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
        let Some(sealed) = &b.sealed else {
            return Ok(Some(stored));
        };
        let key = self.key.as_ref().ok_or_else(|| self.key_missing())?;
        key.open(
            &self.current.slot.store_id,
            name,
            b.written_gen,
            sealed,
            &stored,
        )
        .map(Some)
        .map_err(|e| self.crypto(e))
    }

    /// Reads a blob that must exist.
    pub fn get_required(&self, name: &str) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        self.get(name)?.ok_or_else(|| self.no_such_blob(name))
    }

    /// The generation recovery would open now, read from the disk.
    pub fn disk_generation(&self) -> Result<u64, StoreError> {
        Ok(recover::recover(&*self.disk, &self.path)?
            .chosen
            .slot
            .generation)
    }
}
