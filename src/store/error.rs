//! The store's error type.

use crate::crypto::CryptoError;
use crate::image::ImageError;
use crate::lock::LockError;
use crate::ErrorKind;
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
    #[error("{}: {source}", path.display())]
    Crypto {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: CryptoError,
    },
    /// The image holds no tpmstate store.
    #[error("{}: not a tpmstate store (no header slot carries the tpmstate magic; run `tpmstate format`)", path.display())]
    NotAStore {
        /// The image.
        path: PathBuf,
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
    #[error("{}: the store is encrypted: give --key-file or --passphrase-file", path.display())]
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
    #[error("{}: commit needs {needed} bytes of store area but the image holds at most {capacity} bytes; nothing was written", path.display())]
    CapacityExceeded {
        /// The image.
        path: PathBuf,
        /// Area bytes the commit would need.
        needed: u64,
        /// Area bytes the image can hold.
        capacity: u64,
    },
    /// A write or sync failed earlier; the handle refuses further commits.
    #[error("{}: an earlier write or sync failed; reopen the store before committing again", path.display())]
    Poisoned {
        /// The image.
        path: PathBuf,
    },
    /// The handle does not hold a writer lock (opened read-only or released for migration).
    #[error("{}: the store is not open for writing (no writer lock held)", path.display())]
    NotWritable {
        /// The image.
        path: PathBuf,
    },
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
}

impl StoreError {
    /// The broad class of this error (the CLI's exit code).
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Image(e) => e.kind(),
            StoreError::Lock(e) => e.kind(),
            StoreError::Crypto { source, .. } => match source {
                CryptoError::WrongKey(_) => ErrorKind::WrongKey,
                CryptoError::Tampered(_) | CryptoError::Kdf(_) => ErrorKind::Corrupt,
                CryptoError::ReadKeyFile { .. } => ErrorKind::Io,
                CryptoError::BadKeyFile { .. } | CryptoError::BadInput(_) => ErrorKind::Usage,
            },
            StoreError::NotAStore { .. } => ErrorKind::NotAStore,
            StoreError::Corrupt { .. } => ErrorKind::Corrupt,
            StoreError::NewerFormat { .. } => ErrorKind::Unsupported,
            StoreError::KeyMissing { .. } => ErrorKind::KeyMissing,
            StoreError::KeyNotExpected { .. } => ErrorKind::WrongKey,
            StoreError::CapacityExceeded { .. } | StoreError::Poisoned { .. } => ErrorKind::Io,
            StoreError::NoSuchBlob { .. }
            | StoreError::InvalidName { .. }
            | StoreError::NotWritable { .. }
            | StoreError::Usage(_) => ErrorKind::Usage,
        }
    }
}
