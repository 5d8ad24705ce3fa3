//! Live migration on shared storage (`docs/migration.md`).
//!
//! Source: [`release_outgoing`] makes sure everything is durable, anchored in
//! a header slot, and both slots verify, then drops the store's lock while keeping the handle;
//! [`reclaim`] takes it back with a bounded wait if the migration fails.
//!
//! Target: [`Incoming::open_deferred`] opens the image without locking or
//! reading it; [`Incoming::claim`] takes an exclusive lock (waiting for the
//! source to let go), validates and decrypts the whole store, runs the caller's
//! check on every blob, and only then steps down to a writer lock and returns
//! an active [`Store`]. Until then nothing is written, and any failure drops
//! every lock before it returns.

use crate::crypto::KeySource;
use crate::image::Qcow2Disk;
use crate::lock::{ImageLock, LockError, LockMode, Locking};
use crate::store::{Store, StoreError};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long a target waits for the source to release (QEMU allows 3 s).
pub const DEFAULT_CLAIM_TIMEOUT: Duration = Duration::from_secs(3);

/// A check of one blob's plaintext (the emulator plugs in TPMLIB_ValidateState).
pub type BlobValidator<'a> = &'a dyn Fn(&str, &[u8]) -> Result<(), String>;

/// Errors of migration. Each says what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The other side still holds the image (after the timeout).
    #[error("cannot claim the image: {0}")]
    Locked(#[source] LockError),
    /// Opening or validating the store failed.
    #[error("validation failed: {0}")]
    Store(#[source] StoreError),
    /// A header slot is damaged or does not verify: the image is not exactly
    /// what the source left, so it is refused rather than rolled back.
    #[error("{}: validation failed: header slot {slot}: {status}", path.display())]
    Slot {
        /// The image.
        path: PathBuf,
        /// Slot index.
        slot: usize,
        /// What is wrong with it.
        status: String,
    },
    /// A newer generation than the one that verifies was found (a torn
    /// commit, or damage to the newest header): refused rather than rolled back.
    #[error("{}: validation failed: {what}", path.display())]
    Unsettled {
        /// The image.
        path: PathBuf,
        /// What was found.
        what: String,
    },
    /// A required blob is absent.
    #[error("{}: validation failed: required blob {name:?} is missing", path.display())]
    MissingBlob {
        /// The image.
        path: PathBuf,
        /// The blob.
        name: String,
    },
    /// The caller's check rejected a blob.
    #[error("{}: validation failed: blob {name:?} rejected: {reason}", path.display())]
    Rejected {
        /// The image.
        path: PathBuf,
        /// The blob.
        name: String,
        /// The check's message.
        reason: String,
    },
    /// While released, the source's generation stopped verifying on disk; the
    /// source still holds the lock and should put every blob again.
    #[error("{}: the image was damaged while released: {reason}; rewrite every blob to repair it", path.display())]
    Damaged {
        /// The image.
        path: PathBuf,
        /// What no longer verifies.
        reason: String,
    },
    /// While released, somebody committed to the image: the source's state is stale.
    #[error("{}: the image changed while released (generation {found}, this handle has {ours})", path.display())]
    Diverged {
        /// The image.
        path: PathBuf,
        /// Generation on disk.
        found: u64,
        /// Generation of the handle.
        ours: u64,
    },
}

impl MigrationError {
    /// The broad class of this error (the CLI's exit code).
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            MigrationError::Locked(e) => e.kind(),
            MigrationError::Store(e) => e.kind(),
            MigrationError::Slot { .. }
            | MigrationError::Unsettled { .. }
            | MigrationError::Rejected { .. }
            | MigrationError::Diverged { .. }
            | MigrationError::Damaged { .. }
            | MigrationError::MissingBlob { .. } => crate::ErrorKind::Corrupt,
        }
    }
}

/// Source side: everything is durable after each commit already; this makes
/// sure the current generation is anchored in a slot, names no successor and
/// both header slots verify (so the target can be strict), and releases
/// the handle's lock. The handle stays open for [`reclaim`].
pub fn release_outgoing(store: &mut Store) -> Result<(), MigrationError> {
    store.prepare_handover().map_err(MigrationError::Store)?;
    store.release_open_lock();
    Ok(())
}

/// Source side after a failed migration: takes the writer lock back, waiting
/// up to `timeout`, then checks the image still holds this handle's generation.
///
/// - `Ok`: it does, intact; the source continues.
/// - [`MigrationError::Diverged`]: a newer generation is on disk (the target
///   committed); the lock is released again and the source must not continue
///   with its stale state.
/// - [`MigrationError::Damaged`]: this handle's generation no longer verifies
///   (the storage was damaged meanwhile). The lock is **kept**: the source is
///   the only party still holding the TPM state (in the TPM's memory), and one
///   transaction that puts every blob again repairs the store.
pub fn reclaim(store: &mut Store, timeout: Duration) -> Result<(), MigrationError> {
    store
        .reacquire_lock(LockMode::Writer, Some(timeout))
        .map_err(|e| match e {
            StoreError::Lock(l) => MigrationError::Locked(l),
            other => MigrationError::Store(other),
        })?;
    let ours = store.generation();
    let path = store.path().to_path_buf();
    match store.disk_generation() {
        Ok(found) if found == ours => Ok(()),
        Ok(found) if found > ours => {
            store.release_open_lock();
            Err(MigrationError::Diverged { path, found, ours })
        }
        Ok(found) => {
            store.settle_next_commit();
            Err(MigrationError::Damaged {
                path,
                reason: format!(
                    "generation {ours} no longer verifies; the newest intact one is {found}"
                ),
            })
        }
        Err(e) => {
            store.settle_next_commit();
            Err(MigrationError::Damaged {
                path,
                reason: e.to_string(),
            })
        }
    }
}

/// Target side: an image opened but not yet locked nor read.
#[derive(Debug)]
pub struct Incoming {
    path: PathBuf,
    file: Arc<File>,
    lock: ImageLock,
    warning: Option<String>,
}

/// What a claim checks besides the store's own integrity.
#[derive(Default)]
pub struct ClaimOptions<'a> {
    /// The key the target was given (`None`: the store must be plaintext).
    pub key: Option<KeySource>,
    /// Blobs that must be present.
    pub required: Vec<String>,
    /// How long to wait for the source to release (default 3 s).
    pub timeout: Option<Duration>,
    /// A check of every blob's plaintext.
    pub validate: Option<BlobValidator<'a>>,
}

impl Incoming {
    /// Opens the image read-write without taking any lock.
    pub fn open_deferred(path: &Path, locking: Locking) -> Result<Incoming, MigrationError> {
        let file = crate::store::open_file(path, true).map_err(MigrationError::Store)?;
        let (lock, warning) =
            ImageLock::new(path, file.clone(), locking).map_err(MigrationError::Locked)?;
        Ok(Incoming {
            path: path.to_path_buf(),
            file,
            lock,
            warning,
        })
    }

    /// Claims the image; see the module documentation. On error every lock
    /// is released and nothing was written.
    pub fn claim(self, opts: ClaimOptions<'_>) -> Result<Store, MigrationError> {
        let timeout = opts.timeout.unwrap_or(DEFAULT_CLAIM_TIMEOUT);
        let exclusive = self
            .lock
            .acquire(LockMode::Exclusive, Some(timeout))
            .map_err(MigrationError::Locked)?;
        // On any error `exclusive` and then `self` drop here: the bytes are
        // unlocked and the descriptor closed before the error reaches the caller.
        let store = validate(&self.path, &self.file, &opts)?;
        let writer = self
            .lock
            .acquire(LockMode::Writer, None)
            .map_err(MigrationError::Locked)?;
        drop(exclusive);
        Ok(store.with_lock(self.lock, writer, self.warning))
    }
}

fn validate(
    path: &Path,
    file: &Arc<File>,
    opts: &ClaimOptions<'_>,
) -> Result<Store, MigrationError> {
    let disk = Qcow2Disk::open(path, file.clone()).map_err(|e| MigrationError::Store(e.into()))?;
    let facts = disk.facts();
    let store =
        Store::open_disk(Box::new(disk), path, opts.key.as_ref()).map_err(MigrationError::Store)?;
    let info = store.info();
    for r in info.slots {
        if !r.sound {
            return Err(MigrationError::Slot {
                path: path.to_path_buf(),
                slot: r.index,
                status: r.status,
            });
        }
    }
    if let Some(what) = info.leftover {
        return Err(MigrationError::Unsettled {
            path: path.to_path_buf(),
            what,
        });
    }
    store.check().map_err(MigrationError::Store)?;
    for name in &opts.required {
        if !store.contains(name) {
            return Err(MigrationError::MissingBlob {
                path: path.to_path_buf(),
                name: name.clone(),
            });
        }
    }
    if let Some(check) = opts.validate {
        let names: Vec<String> = store.names().map(str::to_string).collect();
        for name in names {
            let data = store.get_required(&name).map_err(MigrationError::Store)?;
            check(&name, &data).map_err(|reason| MigrationError::Rejected {
                path: path.to_path_buf(),
                name,
                reason,
            })?;
        }
    }
    Ok(store.with_facts(facts))
}
