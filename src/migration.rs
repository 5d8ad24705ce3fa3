//! Live migration on shared storage (`docs/migration.md`): the policy on top
//! of the store's hand-over primitives. This layer opens no file, disk or
//! lock itself.
//!
//! Source: [`release_outgoing`] makes sure everything is durable, anchored
//! in a header slot, and both slots verify, then releases the writer,
//! returning a [`Released`] handle that reads but cannot write;
//! [`Released::reclaim`] takes it back with a bounded wait if the migration
//! fails.
//!
//! Target: [`Incoming::open_deferred`] opens the image without locking or
//! reading it; [`Incoming::claim`] has the store claim it (exclusive lock,
//! waiting for the source; strict validation and decryption of the whole
//! store: [`Unclaimed::claim`]), checks the required blobs and runs the
//! caller's check on every blob, and only then steps down to a writer lock
//! and returns the writer [`Store`]. Until then nothing is written, and any
//! failure drops every lock before it returns.

use crate::crypto::KeySource;
use crate::kind::ErrorKind;
use crate::lock::{LockError, Locking};
use crate::store::{Expect, Released, Store, StoreError, Unclaimed};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a target waits for the source to release (QEMU allows 3 s).
pub const DEFAULT_CLAIM_TIMEOUT: Duration = Duration::from_secs(3);

/// A check of one blob's plaintext (for example a TPM library's own
/// validation of the state it would load).
pub type BlobValidator<'a> = &'a dyn Fn(&str, &[u8]) -> Result<(), String>;

/// Errors of migration. Each says what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The other side still holds the image (after the timeout).
    #[error("cannot claim the image")]
    Locked(#[source] LockError),
    /// Opening or validating the store failed.
    #[error("validation failed")]
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
}

impl MigrationError {
    /// The broad class of this error (the CLI's exit code).
    pub fn kind(&self) -> ErrorKind {
        match self {
            MigrationError::Locked(e) => e.kind(),
            MigrationError::Store(e) => e.kind(),
            MigrationError::Slot { .. }
            | MigrationError::Unsettled { .. }
            | MigrationError::Rejected { .. }
            | MigrationError::MissingBlob { .. } => ErrorKind::Corrupt,
        }
    }
}

impl From<StoreError> for MigrationError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Lock(l) => MigrationError::Locked(l),
            StoreError::SlotDamaged { path, slot, status } => {
                MigrationError::Slot { path, slot, status }
            }
            StoreError::Unsettled { path, what } => MigrationError::Unsettled { path, what },
            other => MigrationError::Store(other),
        }
    }
}

/// A hand-over that could not settle the image: the writer comes back, still
/// holding its lock, with the reason (a failed settling commit poisons it,
/// as any failed commit does).
#[derive(Debug, thiserror::Error)]
#[error("cannot hand the image over")]
pub struct ReleaseError {
    /// The writer, still holding the image.
    pub store: Box<Store>,
    /// Why.
    #[source]
    pub error: StoreError,
}

/// Source side: everything is durable after each commit already; this makes
/// sure the current generation is anchored in a slot, names no successor and
/// both header slots verify (so the target can be strict), and releases the
/// writer, which becomes a [`Released`] handle.
pub fn release_outgoing(mut store: Store) -> Result<Released, ReleaseError> {
    match store.prepare_handover() {
        Ok(()) => Ok(store.release()),
        Err(error) => Err(ReleaseError {
            store: Box::new(store),
            error,
        }),
    }
}

/// Target side: an image opened but not yet locked nor read.
#[derive(Debug)]
pub struct Incoming {
    image: Unclaimed,
    path: PathBuf,
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
    /// What the target knows of the store (the source's generation and
    /// store id, sent along with the migration stream): an older or another
    /// store is refused.
    pub expect: Expect,
}

impl Incoming {
    /// Opens the image read-write without taking any lock.
    pub fn open_deferred(path: &Path, locking: Locking) -> Result<Incoming, MigrationError> {
        Ok(Incoming {
            image: Unclaimed::open(path, locking)?,
            path: path.to_path_buf(),
        })
    }

    /// Claims the image; see the module documentation. On error every lock
    /// is released and nothing was written.
    pub fn claim(self, opts: ClaimOptions<'_>) -> Result<Store, MigrationError> {
        let timeout = opts.timeout.unwrap_or(DEFAULT_CLAIM_TIMEOUT);
        // On any error below `store` drops: the bytes are unlocked and the
        // descriptor closed before the error reaches the caller.
        let mut store = self.image.claim(opts.key.as_ref(), timeout, &opts.expect)?;
        if let Some(name) = opts.required.iter().find(|n| !store.contains(n)) {
            return Err(MigrationError::MissingBlob {
                path: self.path,
                name: name.clone(),
            });
        }
        if let Some(check) = opts.validate {
            let names: Vec<String> = store.names().map(str::to_string).collect();
            for name in names {
                let data = store.get_required(&name)?;
                check(&name, &data).map_err(|reason| MigrationError::Rejected {
                    path: self.path.clone(),
                    name,
                    reason,
                })?;
            }
        }
        store.downgrade_to_writer()?;
        Ok(store)
    }
}
