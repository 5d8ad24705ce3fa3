//! tpmstate keeps a virtual TPM's state blobs (`permall`, `volatilestate`,
//! `savestate`, ...) crash-safe and encrypted inside a qcow2 image.
//!
//! Layers, top to bottom (a module only uses the ones below it;
//! `docs/architecture.md` is the map):
//! - [`migration`]: release on a migration source, claim-and-validate on a target;
//! - [`store`]: handles by lock mode, open/recover, transactions, one-sync
//!   commits, rekey, check;
//! - [`format`] (on-disk structures, CBOR, checksums; no I/O) and [`crypto`]
//!   (keys, AES-256-GCM);
//! - [`image`]: the qcow2 file behind the small [`image::Disk`] trait; [`lock`]
//!   sits beside it on the same file descriptor and speaks QEMU's
//!   image-locking protocol;
//! - [`swtpm_files`]: swtpm's state directories and linear files, imported
//!   into a store in one commit and exported from one (beside
//!   [`migration`], on the store's public API);
//! - [`swtpm`]: swtpm's control messages, state blob format, its
//!   encryption and its linear file (no I/O), which the emulator speaks;
//! - leaves every layer may use: [`kind`] (the error classes) and [`file`]
//!   (opening an image file, regular files only).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod crypto;
pub mod file;
pub mod format;
pub mod image;
pub mod kind;
pub mod lock;
pub mod migration;
pub mod snapshot_ctl;
pub mod store;
pub mod swtpm;
pub mod swtpm_files;

pub use crypto::{Key, KeySource};
pub use kind::ErrorKind;
pub use lock::{LockMode, Locking};
pub use store::{
    Expect, OpenOptions, ReadOnlyStore, ReclaimError, Released, RollbackPolicy, Store, StoreError,
    StoreView, Transaction,
};

/// The handles an emulator shares between threads must stay `Send + Sync`.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Store>();
    send_sync::<ReadOnlyStore>();
    send_sync::<Released>();
    send_sync::<lock::ImageLock>();
    send_sync::<lock::LockGuard>();
};
