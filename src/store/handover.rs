//! Handing an image between two handles that are not the same process: a
//! writer releases it ([`Released`]) and may take it back, and a handle
//! that never held it claims it exclusively ([`Unclaimed::claim`]) after
//! proving the store is exactly what the other side left. The migration
//! layer adds its policy on top (settling before release, required blobs,
//! the caller's check of each blob).

use super::handle::HeldLock;
use super::view::StoreView;
use super::{open_file, Expect, RollbackPolicy, Store, StoreError};
use crate::crypto::KeySource;
use crate::image::Qcow2Disk;
use crate::lock::{ImageLock, LockMode, Locking};
use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A writer that released its lock: it reads what it last committed, and
/// has no method that writes. [`Released::reclaim`] gives a writer back.
pub struct Released {
    view: StoreView,
    lock: ImageLock,
    warning: Option<String>,
    carried: Carried,
}

/// The writer's run-time state a release keeps for the reclaim: a poisoned
/// writer stays poisoned, a pending scrub stays pending.
pub(super) struct Carried {
    pub(super) poisoned: bool,
    pub(super) scrub_pending: bool,
    /// The shared locks on an overlay's backing files, kept while released
    /// (the handle still reads through them).
    pub(super) backing: Vec<super::handle::BackingLock>,
}

impl std::fmt::Debug for Released {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Released").field(&self.view).finish()
    }
}

impl Deref for Released {
    type Target = StoreView;
    fn deref(&self) -> &StoreView {
        &self.view
    }
}

/// Why [`Released::reclaim`] did not give a plain writer back, with the
/// handle the caller goes on with.
#[derive(Debug)]
pub enum ReclaimError {
    /// No lock is held: the writer lock could not be taken within the
    /// timeout (the error names the holder), or the image holds a newer
    /// generation ([`StoreError::Diverged`]) and the lock was let go again.
    /// The handle can retry, or be dropped.
    StillReleased(Box<Released>, StoreError),
    /// The writer lock is held again, but this handle's generation no
    /// longer verifies on disk ([`StoreError::DamagedWhileReleased`]). The
    /// handle is the only holder of the state left: one transaction that
    /// puts every blob again repairs the store.
    Damaged(Box<Store>, StoreError),
}

impl ReclaimError {
    /// The error itself.
    pub fn error(&self) -> &StoreError {
        match self {
            ReclaimError::StillReleased(_, e) | ReclaimError::Damaged(_, e) => e,
        }
    }

    /// The broad class of the error.
    pub fn kind(&self) -> crate::kind::ErrorKind {
        self.error().kind()
    }
}

impl std::fmt::Display for ReclaimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReclaimError::StillReleased(..) => f.write_str("cannot take the image back"),
            ReclaimError::Damaged(..) => f.write_str("took the image back, damaged"),
        }
    }
}

impl std::error::Error for ReclaimError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.error())
    }
}

impl Released {
    pub(super) fn new(
        view: StoreView,
        lock: ImageLock,
        warning: Option<String>,
        carried: Carried,
    ) -> Released {
        Released {
            view,
            lock,
            warning,
            carried,
        }
    }

    /// Takes the writer lock back, waiting up to `timeout`, then checks that
    /// the image still holds this handle's generation, intact: `Ok` gives
    /// the writer back; otherwise see [`ReclaimError`].
    pub fn reclaim(mut self, timeout: Duration) -> Result<Store, ReclaimError> {
        let guard = match self.lock.acquire(LockMode::Writer, Some(timeout)) {
            Ok(guard) => guard,
            Err(e) => return Err(ReclaimError::StillReleased(Box::new(self), e.into())),
        };
        let ours = self.view.generation();
        let path = self.view.path.clone();
        // While released, anything may have changed: another host's
        // commits behind this host's cache, a snapshot that moved the area.
        let on_disk = self
            .view
            .disk
            .reopen()
            .map_err(StoreError::from)
            .and_then(|()| self.view.disk_generation());
        if let Ok(found) = on_disk {
            if found > ours {
                drop(guard);
                let error = StoreError::Diverged { path, found, ours };
                return Err(ReclaimError::StillReleased(Box::new(self), error));
            }
        }
        let Released {
            view,
            lock,
            warning,
            carried,
        } = self;
        let mut store = Store::with_lock(
            view,
            HeldLock {
                lock,
                guard,
                warning,
                backing: carried.backing,
            },
        );
        store.poisoned = carried.poisoned;
        store.scrub_pending = carried.scrub_pending;
        let (newest, source) = match on_disk {
            Ok(found) if found == ours => return Ok(store),
            Ok(found) => (Some(found), None),
            Err(e) => (None, Some(Box::new(e))),
        };
        store.settle_next = true;
        let error = StoreError::DamagedWhileReleased {
            path,
            ours,
            newest,
            source,
        };
        Err(ReclaimError::Damaged(Box::new(store), error))
    }
}

/// An image opened for a claim: no lock taken and nothing read yet (a
/// migration target opens it early, while the source may still write).
#[derive(Debug)]
pub struct Unclaimed {
    path: PathBuf,
    file: Arc<File>,
    lock: ImageLock,
    warning: Option<String>,
    locking: Locking,
}

impl Unclaimed {
    /// Opens the image read-write without taking any lock or reading it.
    pub fn open(path: &Path, locking: Locking) -> Result<Unclaimed, StoreError> {
        let file = open_file(path, true)?;
        let (lock, warning) = ImageLock::new(path, file.clone(), locking)?;
        Ok(Unclaimed {
            path: path.to_path_buf(),
            file,
            lock,
            warning,
            locking,
        })
    }

    /// Claims the image: takes the exclusive lock (waiting up to `timeout`
    /// for the holder to let go), then validates strictly and reads
    /// everything: the qcow2 layer, both header slots sound, nothing newer
    /// than the generation served left unverified
    /// ([`StoreError::SlotDamaged`], [`StoreError::Unsettled`]), the key,
    /// and every blob's checksum and tag ([`StoreView::check`]), and the
    /// caller's expectations (`expect`). Returns a
    /// writer that still holds the exclusive lock, for the caller's own
    /// checks; [`Store::downgrade_to_writer`] then lets readers in. Writes
    /// nothing; on error every lock is released and the file closed.
    pub fn claim(
        self,
        key: Option<&KeySource>,
        timeout: Duration,
        expect: &Expect,
    ) -> Result<Store, StoreError> {
        let guard = self.lock.acquire(LockMode::Exclusive, Some(timeout))?;
        let disk = Qcow2Disk::open(&self.path, self.file)?;
        let backing = super::handle::lock_backing_files(&disk, self.locking)?;
        let facts = disk.facts();
        let view = StoreView::load(Box::new(disk), &self.path, key, Some(facts))?;
        if let Some(r) = view.slots.iter().find(|r| !r.sound) {
            return Err(StoreError::SlotDamaged {
                path: self.path,
                slot: r.index,
                status: r.status.clone(),
            });
        }
        if let Some(what) = view.leftover() {
            return Err(StoreError::Unsettled {
                path: self.path,
                what,
            });
        }
        view.admit(RollbackPolicy::Refuse, expect)?;
        view.check()?;
        let lock = HeldLock {
            lock: self.lock,
            guard,
            warning: self.warning,
            backing,
        };
        Ok(Store::with_lock(view, lock))
    }
}
