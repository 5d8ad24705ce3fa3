//! What every handle can do: read. A [`StoreView`] holds the last committed
//! generation in memory and reads blobs through it; the handle types
//! ([`super::Store`], [`super::ReadOnlyStore`], [`super::Released`]) all
//! dereference to one, and only the writer adds methods that write.

use super::recover::{self, read_checked, read_slot, Chain, Generation, SlotReport};
use super::{BlobInfo, Expect, RollbackPolicy, StoreError};
use crate::crypto::{Key, KeySource};
use crate::format::{Directory, Extent, Slot};
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
    /// Whether each slot holds a header of this store whose directory says
    /// the store has held state (see [`StoreView::has_held_state`]).
    pub(super) slot_marked: [bool; 2],
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
    /// key against it. With the key of an encrypted store, the directory
    /// MAC takes part in choosing: a generation whose MAC fails is skipped
    /// as one whose checksums fail. Reads only; the caller then decides
    /// with [`StoreView::admit`] whether what was skipped is acceptable.
    pub(super) fn load(
        disk: Box<dyn Disk>,
        path: &Path,
        key: Option<&KeySource>,
        facts: Option<Qcow2Facts>,
    ) -> Result<StoreView, StoreError> {
        let recovery = recover::recover(&*disk, path, None)?;
        let mut view = StoreView {
            path: path.to_path_buf(),
            disk,
            current: recovery.chosen,
            chain: recovery.chain,
            slots: recovery.reports,
            skipped: recovery.skipped,
            key: None,
            facts,
            slot_marked: [false; 2],
        };
        let master = match view.derive_master(key) {
            Ok(Some(master)) => master,
            Ok(None) => {
                view.mark_slots();
                return Ok(view);
            }
            // A key for a plaintext newest generation: a plaintext store, or
            // a forged plaintext generation over an encrypted one; the key
            // tells which (a passphrase through the KDF settings an
            // encrypted directory still in a slot records).
            Err(not_expected @ StoreError::KeyNotExpected { .. }) => {
                match view.master_for_plaintext_newest(key)? {
                    Some(master) => master,
                    None => return Err(not_expected),
                }
            }
            Err(other) => return Err(other),
        };
        let authentic = |slot: &Slot, dir: &Directory, bytes: &[u8]| {
            let id = &slot.store_id;
            let key_check = dir.encryption.as_ref().map(|e| &e.key_check);
            // With a key, a plaintext generation never counts as authentic.
            slot.encrypted
                && key_check.is_some_and(|c| master.verify_key_check(id, c).is_ok())
                && master
                    .verify_directory_mac(id, bytes, &slot.directory_mac)
                    .is_ok()
        };
        // The newest generation's key check decides whether the key is
        // wrong: after a rekey an older generation under the old key may
        // still be on disk, and the old key must not open it.
        view.check_key(&master)?;
        let current = &view.current;
        if !current.slot.encrypted {
            // Only an older encrypted generation under this key makes this
            // a forged plaintext one rather than a plaintext store.
            match recover::recover(&*view.disk, path, Some(&authentic)) {
                Ok(again) => view.adopt(again),
                // Nothing authenticates: it is a plaintext store.
                Err(StoreError::Corrupt { .. }) => {
                    return Err(StoreError::KeyNotExpected {
                        path: view.path.clone(),
                    })
                }
                Err(other) => return Err(other),
            }
        } else if !authentic(&current.slot, &current.dir, &current.dir_bytes) {
            // The key is right but the directory chosen by checksums alone
            // does not authenticate (forged): choose again with the key
            // check and MAC taking part.
            let again = recover::recover(&*view.disk, path, Some(&authentic))?;
            view.adopt(again);
        }
        view.key = Some(master);
        view.mark_slots();
        Ok(view)
    }

    /// Switches to what a recovery chose again.
    fn adopt(&mut self, again: recover::Recovery) {
        self.current = again.chosen;
        self.chain = again.chain;
        self.slots = again.reports;
        self.skipped = again.skipped;
    }

    fn mark_slots(&mut self) {
        self.slot_marked =
            [0, 1].map(|i| self.slot_directory(i).is_some_and(|(_, d)| d.held_state));
    }

    /// Whether this store has held state: a commit stored a blob in it at
    /// some time, even if its blobs were deleted since. Once the commit after
    /// the first such one has landed, both header slots say so, so the
    /// marker survives the loss of either slot; an emulator must not make a
    /// fresh TPM over a store that has held state unless told to.
    pub fn has_held_state(&self) -> bool {
        self.current.dir.held_state || self.slot_marked.iter().any(|&m| m)
    }

    /// The directory extent and decoded directory of the header in slot
    /// `index`, if it is a header of this store whose directory verifies.
    pub(super) fn slot_directory(&self, index: usize) -> Option<(Extent, Directory)> {
        let slot = read_slot(&*self.disk, index).ok()?.ok()?;
        if slot.store_id != self.current.slot.store_id {
            return None;
        }
        let d = slot.directory;
        let bytes = read_checked(&*self.disk, d.offset, d.len, slot.directory_crc)
            .ok()?
            .ok()?;
        let dir = Directory::decode(&bytes, &slot).ok()?;
        Some((d, dir))
    }

    /// The master key `key` gives under the KDF settings of an encrypted
    /// directory in either slot, when the newest generation is plaintext.
    fn master_for_plaintext_newest(
        &self,
        key: Option<&KeySource>,
    ) -> Result<Option<Key>, StoreError> {
        let Some(source) = key else {
            return Ok(None);
        };
        let kdf = (0..2)
            .filter_map(|i| self.slot_directory(i))
            .find_map(|(_, dir)| dir.encryption.map(|e| e.kdf));
        match kdf {
            Some(kdf) => source
                .master_key(&kdf)
                .map(Some)
                .map_err(|e| self.crypto(e)),
            None => Ok(None),
        }
    }

    /// Derives the master key as the current generation's KDF settings say
    /// (`None` without a key).
    fn derive_master(&self, key: Option<&KeySource>) -> Result<Option<Key>, StoreError> {
        let (source, enc) = match (key, &self.current.dir.encryption) {
            (None, _) => return Ok(None),
            (Some(_), None) => {
                return Err(StoreError::KeyNotExpected {
                    path: self.path.clone(),
                })
            }
            (Some(s), Some(e)) => (s, e),
        };
        source
            .master_key(&enc.kdf)
            .map(Some)
            .map_err(|e| self.crypto(e))
    }

    /// Checks `master` against the current generation's key check.
    fn check_key(&self, master: &Key) -> Result<(), StoreError> {
        let check = self.current.dir.encryption.as_ref().map(|e| e.key_check);
        match check {
            Some(c) => master
                .verify_key_check(&self.current.slot.store_id, &c)
                .map_err(|e| self.crypto(e)),
            None => Ok(()),
        }
    }

    /// Applies the caller's rollback policy and expectations to what was
    /// loaded: refuses to serve an older generation than one on disk
    /// unless `rollback` accepts it, and refuses a store older than or
    /// other than `expect` says.
    pub(super) fn admit(
        &self,
        rollback: RollbackPolicy,
        expect: &Expect,
    ) -> Result<(), StoreError> {
        // Never fall back to an empty store over a newer commit: a consumer
        // would start from nothing (an emulator, with a fresh TPM).
        let torn_only = matches!(&self.skipped[..], [one] if one.could_be_torn)
            && !self.current.dir.blobs.is_empty();
        let refused = match rollback {
            RollbackPolicy::Refuse => !self.skipped.is_empty(),
            RollbackPolicy::AcceptTorn => !self.skipped.is_empty() && !torn_only,
            RollbackPolicy::Accept => false,
        };
        if refused {
            return Err(StoreError::RolledBack {
                path: self.path.clone(),
                served: self.generation(),
                skipped: self.skipped.clone(),
            });
        }
        let id = self.current.slot.store_id;
        if let Some(expected) = expect.store_id.filter(|e| *e != id) {
            return Err(StoreError::UnexpectedStore {
                path: self.path.clone(),
                found: hex::encode(id),
                expected: hex::encode(expected),
            });
        }
        if let Some(expected) = expect.min_generation.filter(|&e| self.generation() < e) {
            return Err(StoreError::OlderThanExpected {
                path: self.path.clone(),
                served: self.generation(),
                expected,
            });
        }
        Ok(())
    }

    /// Whether the key has verified this generation: its generation and
    /// store id are then authenticated (the directory MAC covers both).
    pub fn authenticated(&self) -> bool {
        self.key.is_some()
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
        Ok(recover::recover(&*self.disk, &self.path, None)?
            .chosen
            .slot
            .generation)
    }
}
