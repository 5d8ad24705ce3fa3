//! The store's error type.

use crate::crypto::CryptoError;
use crate::image::ImageError;
use crate::kind::ErrorKind;
use crate::lock::LockError;
use std::path::PathBuf;

/// Errors of the store. Each names the image (or `<memory>`) it is about.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The qcow2 image or the disk below failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Locking failed.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A key could not be read or derived, or authentication failed.
    #[error("{}", path.display())]
    Crypto {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: CryptoError,
    },
    /// The image holds no tpmstate store.
    #[error("{}: {}", path.display(), match first_data {
        None => "no tpmstate store in this image (`tpmstate format` makes one)".to_string(),
        Some(at) => format!("no tpmstate store found, but the image holds data (from byte {at}): if it held a store, its header slots are damaged; see `tpmstate dump-headers` before anything else (`tpmstate format --force` would destroy what is there)"),
    })]
    NotAStore {
        /// The image.
        path: PathBuf,
        /// Where the first non-zero byte of the store area lies, if any.
        first_data: Option<u64>,
    },
    /// Formatting or creating would destroy what the file holds; `force` was not given.
    #[error("{}: holds {holds}; {action} would destroy it (give --force to do it anyway)", path.display())]
    WouldDestroy {
        /// The file.
        path: PathBuf,
        /// What it holds, in a user's words.
        holds: String,
        /// What was refused.
        action: &'static str,
    },
    /// The store is damaged beyond its crash recovery.
    #[error("{}: corrupt store: {reason}", path.display())]
    Corrupt {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The store was written by a newer tpmstate.
    #[error("{}: {what}; upgrade tpmstate to open it", path.display())]
    NewerFormat {
        /// The image.
        path: PathBuf,
        /// Which version is too new.
        what: String,
    },
    /// The store is encrypted and no key was given.
    #[error("{}: the store is encrypted, and no key was given", path.display())]
    KeyMissing {
        /// The image.
        path: PathBuf,
    },
    /// A key was given for a plaintext store (possibly a substituted image).
    #[error("{}: a key was given but the store is not encrypted", path.display())]
    KeyNotExpected {
        /// The image.
        path: PathBuf,
    },
    /// No blob of that name.
    #[error("{}: no blob named {name:?}", path.display())]
    NoSuchBlob {
        /// The image.
        path: PathBuf,
        /// The name asked for.
        name: String,
    },
    /// A bad blob name.
    #[error("invalid blob name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The commit does not fit and the store area cannot grow enough.
    #[error("{}: no room for this commit: it needs {needed} bytes in one run (its new blob versions and directory, written beside the current generation until the commit lands), but the store area of {area} bytes has {free} bytes free in runs of at most {largest_free}, and the image can hold an area of at most {capacity} bytes; nothing was written. Grow the image while nothing holds it (`qemu-img resize {} +{}M`) and commit again", path.display(), path.display(), wanted.saturating_sub(*capacity).div_ceil(1 << 20).max(1))]
    CapacityExceeded {
        /// The image.
        path: PathBuf,
        /// Bytes of the commit's run: new blob versions and the directory
        /// (and a chained commit's header block).
        needed: u64,
        /// Bytes of the store area now.
        area: u64,
        /// Free bytes in it (not used by the current generation or pinned).
        free: u64,
        /// The largest run of free bytes.
        largest_free: u64,
        /// Area bytes the image can hold (its virtual size).
        capacity: u64,
        /// The area the commit grows to when the image can hold it: the
        /// virtual size the remedy reaches.
        wanted: u64,
    },
    /// A write or sync failed earlier; the handle refuses further commits.
    #[error("{}: an earlier write or sync failed; reopen the store before committing again", path.display())]
    Poisoned {
        /// The image.
        path: PathBuf,
    },
    /// A claim found a header slot damaged or not verifying: the image is
    /// not exactly what its last holder left, so it is refused rather than
    /// opened at an older generation.
    #[error("{}: header slot {slot}: {status}", path.display())]
    SlotDamaged {
        /// The image.
        path: PathBuf,
        /// Slot index.
        slot: usize,
        /// What is wrong with it.
        status: String,
    },
    /// A claim found a newer generation than the one that verifies (a torn
    /// commit, or damage to the newest header): refused rather than rolled back.
    #[error("{}: {what}", path.display())]
    Unsettled {
        /// The image.
        path: PathBuf,
        /// What was found.
        what: String,
    },
    /// While released, somebody committed to the image: the released
    /// handle's state is stale.
    #[error("{}: the image changed while released (generation {found}, this handle has {ours})", path.display())]
    Diverged {
        /// The image.
        path: PathBuf,
        /// Generation on disk.
        found: u64,
        /// Generation of the handle.
        ours: u64,
    },
    /// Before a commit, the image held a newer generation than this writer's:
    /// another process committed while this one held the writer lock, which
    /// means the lock was lost (a shared file system's lease expired, or
    /// locking is off). Nothing was written and the handle is poisoned.
    #[error("{}: image changed under us: {what} (lock lost?); nothing was written", path.display())]
    ImageChanged {
        /// The image.
        path: PathBuf,
        /// What changed.
        what: String,
    },
    /// While released, the handle's generation stopped verifying on disk.
    #[error("{}: the image was damaged while released (rewrite every blob to repair it): generation {ours} no longer verifies{}", path.display(), newest.map(|g| format!("; the newest intact one is {g}")).unwrap_or_default())]
    DamagedWhileReleased {
        /// The image.
        path: PathBuf,
        /// Generation of the handle.
        ours: u64,
        /// The newest generation that still verifies, if the store opens at all.
        newest: Option<u64>,
        /// Why the store does not open, if it does not.
        #[source]
        source: Option<Box<StoreError>>,
    },
    /// A newer commit than the one that can be served does not verify, and
    /// the caller's [`super::RollbackPolicy`] does not accept serving the older one.
    #[error("{}: {}; serving generation {served}, the newest that verifies, would take the TPM's state back: refused (after a crash during a commit that is the commit that never completed; to open the older state anyway, accept the rollback with --accept-rollback)", path.display(), skipped.iter().map(|s| s.to_string()).collect::<Vec<_>>().join("; "))]
    RolledBack {
        /// The image.
        path: PathBuf,
        /// The generation that would be served.
        served: u64,
        /// What is newer and does not verify.
        skipped: Vec<super::Skipped>,
    },
    /// The store is older than the caller expects.
    #[error("{}: the store is at generation {served}, older than the generation {expected} expected: refused as a rollback", path.display())]
    OlderThanExpected {
        /// The image.
        path: PathBuf,
        /// The generation served.
        served: u64,
        /// The oldest acceptable.
        expected: u64,
    },
    /// The image holds another store than the caller expects.
    #[error("{}: the image holds store {found}, not the expected store {expected}: refused as a substituted image", path.display())]
    UnexpectedStore {
        /// The image.
        path: PathBuf,
        /// Its store id (hex).
        found: String,
        /// The expected one (hex).
        expected: String,
    },
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
    /// An internal invariant failed (a bug), reported instead of a panic;
    /// nothing was written.
    #[error("internal error: {0}")]
    Internal(String),
}

impl StoreError {
    /// The broad class of this error (the CLI's exit code).
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Image(e) => e.kind(),
            StoreError::Lock(e) => e.kind(),
            StoreError::Crypto { source, .. } => source.kind(),
            StoreError::NotAStore { .. } => ErrorKind::NotAStore,
            StoreError::Corrupt { .. }
            | StoreError::SlotDamaged { .. }
            | StoreError::Unsettled { .. }
            | StoreError::Diverged { .. }
            | StoreError::DamagedWhileReleased { .. } => ErrorKind::Corrupt,
            StoreError::NewerFormat { .. } => ErrorKind::Unsupported,
            StoreError::KeyMissing { .. } => ErrorKind::KeyMissing,
            StoreError::KeyNotExpected { .. } => ErrorKind::WrongKey,
            StoreError::CapacityExceeded { .. } => ErrorKind::NoSpace,
            StoreError::Poisoned { .. } => ErrorKind::Io,
            StoreError::ImageChanged { .. } => ErrorKind::Locked,
            StoreError::NoSuchBlob { .. }
            | StoreError::InvalidName { .. }
            | StoreError::WouldDestroy { .. }
            | StoreError::Usage(_) => ErrorKind::Usage,
            StoreError::Internal(_) => ErrorKind::Internal,
            StoreError::RolledBack { .. }
            | StoreError::OlderThanExpected { .. }
            | StoreError::UnexpectedStore { .. } => ErrorKind::Rollback,
        }
    }
}
