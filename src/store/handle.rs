//! The handles an open store comes in, by the lock they hold for their
//! whole life (`docs/architecture.md`, "Handles"):
//!
//! - [`Store`], the writer: holds the writer (or exclusive) lock and is the
//!   only type with `put`, `delete`, `transaction` and `rekey`;
//! - [`ReadOnlyStore`]: holds a shared or force-share lock; reads, `info`
//!   and `check` only;
//! - [`super::Released`]: a writer that handed the image over; reads only,
//!   until `reclaim` gives a writer back.
//!
//! The lock is taken before the handle exists and its guard is a private
//! field, so a handle cannot outlive its acquisition, and no public method
//! hands out the [`ImageLock`]: nested acquisitions go through
//! [`Store::acquire_nested`], whose guard only counts on top of the handle's
//! own. Writing without the writer lock does not compile:
//!
//! ```compile_fail,E0599
//! # fn f(store: tpmstate::ReadOnlyStore) {
//! store.put("permall", b"no writer lock").unwrap(); // no `put` on a read-only handle
//! # }
//! ```
//!
//! ```compile_fail,E0599
//! # fn f(store: &mut tpmstate::ReadOnlyStore) {
//! store.transaction(); // nor a transaction
//! # }
//! ```
//!
//! ```compile_fail,E0599
//! # fn f(store: tpmstate::Store) {
//! let released = store.release();
//! released.put("permall", b"after the hand-over").unwrap(); // no `put` once released
//! # }
//! ```
//!
//! ```compile_fail,E0599
//! # fn f(store: tpmstate::Store) {
//! let lock = store.lock(); // the store's lock is never handed out
//! # }
//! ```
//!
//! ```compile_fail,E0616
//! # fn f(store: tpmstate::Store) {
//! let _ = store.lock.guard; // nor its guard, to drop under the store
//! # }
//! ```

use super::view::StoreView;
use super::{open_file, OpenOptions, StoreError};
#[cfg(any(test, feature = "testing"))]
use crate::crypto::KeySource;
#[cfg(any(test, feature = "testing"))]
use crate::image::Disk;
use crate::image::{PageBuf, Qcow2Disk};
use crate::lock::{ImageLock, LockGuard, LockMode, Locking};
use std::ops::Deref;
use std::path::Path;
use std::time::Duration;

/// An acquisition a handle holds for its whole life, with the image's lock
/// state (to count nested acquisitions on) and the warning opening it gave.
pub(super) struct HeldLock {
    pub(super) lock: ImageLock,
    pub(super) guard: LockGuard,
    pub(super) warning: Option<String>,
    /// Shared locks on the backing files of an overlay, held as long.
    pub(super) backing: Vec<BackingLock>,
}

/// A shared lock on a backing file: readers welcome, writers and resizes kept out.
pub(super) struct BackingLock {
    _lock: ImageLock,
    _guard: LockGuard,
}

/// Takes a shared lock on each backing file of `disk`, as QEMU does on the
/// backing files of an image it opens: the overlay reads through them, so
/// nothing may write them meanwhile.
pub(super) fn lock_backing_files(
    disk: &Qcow2Disk,
    locking: Locking,
) -> Result<Vec<BackingLock>, StoreError> {
    let mut locks = Vec::new();
    for (path, file) in disk.backing_files() {
        let (lock, _warning) = ImageLock::new(path, file.clone(), locking)?;
        let guard = lock.acquire(LockMode::Shared, None)?;
        locks.push(BackingLock {
            _lock: lock,
            _guard: guard,
        });
    }
    Ok(locks)
}

impl HeldLock {
    /// Takes `mode` on the detached lock of a disk with no file behind it.
    #[cfg(any(test, feature = "testing"))]
    fn detached(path: &Path, mode: LockMode) -> Result<HeldLock, StoreError> {
        let lock = ImageLock::detached(path);
        let guard = lock.acquire(mode, None)?;
        Ok(HeldLock {
            lock,
            guard,
            warning: None,
            backing: Vec::new(),
        })
    }
}

/// Opens the image at `path`, takes `mode` (waiting as `opts` says), and
/// loads the store. A writer first frees what a crash during an earlier
/// format or growth leaked, so that `qemu-img check` passes again.
fn open_image(
    path: &Path,
    mode: LockMode,
    opts: &OpenOptions,
) -> Result<(StoreView, HeldLock), StoreError> {
    let writable = mode >= LockMode::Writer;
    let file = open_file(path, writable)?;
    let (lock, warning) = ImageLock::new(path, file.clone(), opts.locking)?;
    let guard = lock.acquire(mode, opts.lock_timeout)?;
    let mut disk = Qcow2Disk::open(path, file)?;
    let backing = lock_backing_files(&disk, opts.locking)?;
    if writable {
        disk.reclaim_leaks()?;
        disk.make_own()?;
    }
    let facts = disk.facts();
    let view = StoreView::load(Box::new(disk), path, opts.key.as_ref(), Some(facts))?;
    view.admit(opts.rollback, &opts.expect)?;
    Ok((
        view,
        HeldLock {
            lock,
            guard,
            warning,
            backing,
        },
    ))
}

/// The writer handle: an open store holding the image's writer (or
/// exclusive) lock for its whole life. Reads come from [`StoreView`].
pub struct Store {
    pub(super) view: StoreView,
    pub(super) lock: HeldLock,
    /// The next commit anchors and names no successor, so that it and the
    /// one after rewrite both header slots (a repair after damage).
    pub(super) settle_next: bool,
    /// The last commit's write buffer, reused (it holds no plaintext of an
    /// encrypted store: only ciphertext and metadata).
    pub(super) write_buf: PageBuf,
    /// A write or sync failed: the on-disk state is unknown until reopened.
    pub(super) poisoned: bool,
    /// A rekey committed but could not zero the old key's free blocks: the
    /// next commit does it.
    pub(super) scrub_pending: bool,
    /// Free space has come apart: the next commit moves the blobs of the
    /// area's upper half into holes (see `commit.rs`).
    pub(super) compact_next: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Store").field(&self.view).finish()
    }
}

impl Deref for Store {
    type Target = StoreView;
    fn deref(&self) -> &StoreView {
        &self.view
    }
}

impl Store {
    pub(super) fn with_lock(view: StoreView, lock: HeldLock) -> Store {
        Store {
            view,
            lock,
            settle_next: false,
            write_buf: PageBuf::default(),
            poisoned: false,
            scrub_pending: false,
            compact_next: false,
        }
    }

    /// Opens the store in the qcow2 image at `path` for writing: takes the
    /// writer lock, validates the image, recovers the newest generation that
    /// verifies, and checks the key.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Store, StoreError> {
        let (view, lock) = open_image(path, LockMode::Writer, &opts)?;
        Ok(Store::opened(view, lock))
    }

    /// As [`Store::open`], with the exclusive lock: nobody else, not even a
    /// force-share reader, may hold the image (`rekey` uses it).
    pub fn open_exclusive(path: &Path, opts: OpenOptions) -> Result<Store, StoreError> {
        let (view, lock) = open_image(path, LockMode::Exclusive, &opts)?;
        Ok(Store::opened(view, lock))
    }

    /// A writer on a freshly opened image: a rekey whose scrub did not
    /// finish left the old key's header in the other slot, so the next
    /// commit scrubs (see `rekey.rs`).
    fn opened(view: StoreView, lock: HeldLock) -> Store {
        let mut store = Store::with_lock(view, lock);
        store.scrub_pending = store.view.old_key_remains();
        store.compact_next = super::commit::needs_compaction(&store.view);
        store
    }

    /// Opens a store for writing on any [`Disk`], for tests and fuzz targets
    /// (with the `testing` feature): the handle owns the disk alone and its
    /// lock only counts acquisitions, so it must not be a shared image. It
    /// serves the newest generation that verifies whatever is newer
    /// ([`super::RollbackPolicy::Accept`]): tests of recovery look at what
    /// was served and skipped.
    #[cfg(any(test, feature = "testing"))]
    pub fn open_disk(
        disk: Box<dyn Disk>,
        path: &Path,
        key: Option<&KeySource>,
    ) -> Result<Store, StoreError> {
        let view = StoreView::load(disk, path, key, None)?;
        let lock = HeldLock::detached(path, LockMode::Writer)?;
        Ok(Store::opened(view, lock))
    }

    /// The mode of the handle's own acquisition (writer or exclusive).
    pub fn lock_mode(&self) -> LockMode {
        self.lock.guard.mode()
    }

    /// The strongest mode this process holds on the image now, nested
    /// acquisitions included.
    pub fn lock_held(&self) -> Option<LockMode> {
        self.lock.lock.held()
    }

    /// A warning from opening the lock (POSIX fallback), to show the user.
    pub fn lock_warning(&self) -> Option<&str> {
        self.lock.warning.as_deref()
    }

    /// A nested acquisition of `mode` on the image, counted on top of the
    /// handle's own: a weaker or equal mode changes no lock byte, a stronger
    /// one upgrades (waiting up to `timeout`), and dropping the guard steps
    /// back to the strongest mode still held, never below the handle's. The
    /// guard keeps its acquisition even if it outlives the handle.
    pub fn acquire_nested(
        &self,
        mode: LockMode,
        timeout: Option<Duration>,
    ) -> Result<LockGuard, StoreError> {
        Ok(self.lock.lock.acquire(mode, timeout)?)
    }

    /// Steps the handle's own acquisition down to the writer mode (from
    /// exclusive, after a claim's validation): others may read again.
    pub fn downgrade_to_writer(&mut self) -> Result<(), StoreError> {
        let writer = self.lock.lock.acquire(LockMode::Writer, None)?;
        // The old guard drops here, after the writer one is counted.
        self.lock.guard = writer;
        Ok(())
    }

    /// Drops the writer lock and keeps a handle that can only read, for a
    /// migration source handing the image over
    /// (`migration::release_outgoing` settles the image first).
    pub fn release(self) -> super::Released {
        let HeldLock {
            lock,
            guard,
            warning,
            backing,
        } = self.lock;
        drop(guard);
        let carried = super::handover::Carried {
            poisoned: self.poisoned,
            scrub_pending: self.scrub_pending,
            backing,
        };
        super::Released::new(self.view, lock, warning, carried)
    }

    /// Whether free blocks may still hold data under a key this store no
    /// longer uses (a rekey's scrub failed or was cut short); the next
    /// commit zeroes them.
    pub fn scrub_pending(&self) -> bool {
        self.scrub_pending
    }
}

/// A read-only handle: an open store holding a shared (or force-share) lock
/// for its whole life. Reads, [`StoreView::info`] and [`StoreView::check`]
/// only: it has no method that writes.
pub struct ReadOnlyStore {
    view: StoreView,
    lock: HeldLock,
}

impl std::fmt::Debug for ReadOnlyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ReadOnlyStore").field(&self.view).finish()
    }
}

impl Deref for ReadOnlyStore {
    type Target = StoreView;
    fn deref(&self) -> &StoreView {
        &self.view
    }
}

impl ReadOnlyStore {
    /// Opens the store at `path` under a shared lock: other readers may
    /// share it, writers are kept out while it is open.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<ReadOnlyStore, StoreError> {
        let (view, lock) = open_image(path, LockMode::Shared, &opts)?;
        Ok(ReadOnlyStore { view, lock })
    }

    /// Opens the store at `path` under a force-share lock (`qemu-img -U`):
    /// it reads while a writer holds the image, for diagnostics, and may see
    /// a commit being written (recovery then picks the last one that verifies).
    pub fn open_force_share(path: &Path, opts: OpenOptions) -> Result<ReadOnlyStore, StoreError> {
        let (view, lock) = open_image(path, LockMode::ForceShareRead, &opts)?;
        Ok(ReadOnlyStore { view, lock })
    }

    /// Opens a store read-only on any [`Disk`], for tests and fuzz targets
    /// (with the `testing` feature).
    #[cfg(any(test, feature = "testing"))]
    pub fn open_disk(
        disk: Box<dyn Disk>,
        path: &Path,
        key: Option<&KeySource>,
    ) -> Result<ReadOnlyStore, StoreError> {
        let view = StoreView::load(disk, path, key, None)?;
        let lock = HeldLock::detached(path, LockMode::Shared)?;
        Ok(ReadOnlyStore { view, lock })
    }

    /// The mode of the handle's own acquisition (shared or force-share).
    pub fn lock_mode(&self) -> LockMode {
        self.lock.guard.mode()
    }

    /// A warning from opening the lock (POSIX fallback), to show the user.
    pub fn lock_warning(&self) -> Option<&str> {
        self.lock.warning.as_deref()
    }
}
