//! Internal snapshots of the image a store lives in, taken, listed, deleted
//! and applied through the store's own handles, so that a running emulator
//! (which holds the image's lock, keeping `qemu-img snapshot` out) can take
//! one between two commits.
//!
//! A snapshot holds the whole image as it was at the last commit: the store
//! it holds opens at that generation. Taking one leaves the store area the
//! active image's own (copied in the same metadata change), so the next
//! commit is an ordinary one; see `docs/format.md`, "Snapshots and
//! overlays". Applying one is a deliberate rollback of the TPM's state, done
//! with the exclusive lock (the VM off).

use super::{open_file, Store, StoreError, StoreView};
use crate::image::{Qcow2Disk, SnapshotEntry, SnapshotOp};
use crate::lock::{ImageLock, LockMode, Locking};
use std::path::Path;

impl StoreView {
    /// The image's internal snapshots, read from the image now.
    pub fn snapshots(&self) -> Result<Vec<SnapshotEntry>, StoreError> {
        Ok(self.disk.snapshots()?)
    }
}

impl Store {
    /// Takes an internal snapshot named `name` of the image at the current
    /// generation, durably. `qemu-img snapshot -l` lists it and
    /// `qemu-img snapshot -a` (or [`Store::apply_snapshot`]) applies it.
    pub fn create_snapshot(&mut self, name: &str) -> Result<(), StoreError> {
        self.change_snapshot(SnapshotOp::Create(name))
    }

    /// Deletes the internal snapshot `name` (a name or QEMU's numeric ID), durably.
    pub fn delete_snapshot(&mut self, name: &str) -> Result<(), StoreError> {
        self.change_snapshot(SnapshotOp::Delete(name))
    }

    fn change_snapshot(&mut self, op: SnapshotOp<'_>) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned {
                path: self.view.path.clone(),
            });
        }
        // A change that fails after its header switch leaves the disk
        // refusing writes (its map may be stale), so the next commit fails
        // and poisons the handle; one refused or failed before the switch
        // leaves the image and the handle as they were.
        Ok(self.view.disk.change_snapshot(op)?)
    }

    /// Makes the internal snapshot `name` the image's active state, under
    /// the exclusive lock (so never under a running emulator or QEMU: that
    /// is refused as a lock conflict). The store then opens at the
    /// generation the snapshot holds, older than the one it replaces; a
    /// caller that pinned a minimum generation must lower it.
    pub fn apply_snapshot(path: &Path, name: &str, locking: Locking) -> Result<(), StoreError> {
        let file = open_file(path, true)?;
        let (lock, _warning) = ImageLock::new(path, file.clone(), locking)?;
        let _guard = lock.acquire(LockMode::Exclusive, None)?;
        let mut disk = Qcow2Disk::open(path, file)?;
        let _backing = super::handle::lock_backing_files(&disk, locking)?;
        disk.change_snapshot(SnapshotOp::Apply(name))?;
        Ok(())
    }
}
