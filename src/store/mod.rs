//! The store: named blobs in a qcow2 image (or any [`crate::image::Disk`]), committed
//! atomically and durably with one sync, optionally encrypted.
//!
//! An open store is a handle whose type is the lock it holds
//! ([`handle`]): a writer [`Store`], a [`ReadOnlyStore`], or a [`Released`]
//! writer; each reads through the [`StoreView`] it dereferences to. A
//! [`Transaction`] collects puts and deletes; its commit builds the next
//! generation on a copy, writes it to blocks the current one does not use
//! (with its header in the run's first block, where the current header's
//! `next` points, or in the other header slot), syncs once, and only then
//! replaces the in-memory state. A failed commit leaves the handle at the old
//! generation.

mod alloc;
mod commit;
mod create;
mod error;
pub mod handle;
mod handover;
mod inspect;
mod layout;
mod recover;
mod rekey;
mod snapshot;
mod view;

pub use commit::Transaction;
pub use error::StoreError;
pub use handle::{ReadOnlyStore, Store};
pub use handover::{ReclaimError, Released, Unclaimed};
pub use inspect::{
    dump_chain, dump_headers, dump_headers_of, dump_image, ChainedHeader, CheckReport, ImageDump,
    SlotDump, StoreInfo,
};
pub use recover::{Skipped, SlotReport};
pub use rekey::Rekeyed;
pub use view::StoreView;

use crate::crypto::KeySource;
use crate::lock::Locking;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Default store area: holds libtpms's largest state (a 512 KiB `permall`
/// plus volatile state) twice over, copy-on-write space included.
pub const DEFAULT_AREA: u64 = 4 << 20;

/// How to open an existing store. The lock mode is the handle type's:
/// [`Store::open`] takes the writer lock, [`Store::open_exclusive`] the
/// exclusive one, [`ReadOnlyStore::open`] a shared one and
/// [`ReadOnlyStore::open_force_share`] QEMU's force-share read.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Key for an encrypted store (`None` for a plaintext one; reading an
    /// encrypted store's blobs then fails with [`StoreError::KeyMissing`]).
    pub key: Option<KeySource>,
    /// QEMU's `locking=` option.
    pub locking: Locking,
    /// How long to wait for a conflicting holder (`None`: try once).
    pub lock_timeout: Option<Duration>,
    /// What to do when a newer commit than the one that can be served does
    /// not verify (default: refuse).
    pub rollback: RollbackPolicy,
    /// What the caller knows of the store, checked at open.
    pub expect: Expect,
}

/// What an open does when something newer than the generation it can serve
/// does not verify: serving it would take the TPM's state back in time
/// (`docs/format.md`, section 5, says what the format can and cannot tell).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RollbackPolicy {
    /// Refuse with [`StoreError::RolledBack`].
    #[default]
    Refuse,
    /// Serve the generation before one newer commit that has the shape a
    /// crash during that commit leaves ([`Skipped::could_be_torn`]), if that
    /// generation holds blobs; refuse anything more, and never fall back to
    /// an empty store. For a process restarting after a crash.
    AcceptTorn,
    /// Serve the newest generation that verifies, whatever is newer: for
    /// diagnostics, or a deliberate recovery.
    Accept,
}

/// What a caller knows of a store, checked when it opens or claims it:
/// anti-rollback and anti-substitution hooks. In an encrypted store opened
/// with its key both are authenticated (the directory MAC covers them); in
/// a plaintext store anyone who can write the image can forge them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Expect {
    /// The oldest generation acceptable (the last one the caller saw
    /// committed): an older one is [`StoreError::OlderThanExpected`].
    pub min_generation: Option<u64>,
    /// The store id (`tpmstate info`): another store's image, even under
    /// the same key, is [`StoreError::UnexpectedStore`].
    pub store_id: Option<[u8; 16]>,
}

/// How to format a store.
#[derive(Debug, Clone, Default)]
pub struct FormatOptions {
    /// Encrypt blobs with this key (`None`: plaintext store).
    pub key: Option<KeySource>,
    /// Store area in bytes (default: the image's virtual size, at most [`DEFAULT_AREA`]).
    pub area: Option<u64>,
    /// QEMU's `locking=` option.
    pub locking: Locking,
    /// Format (or create over) an image even if it already holds a store
    /// or other data, destroying it.
    pub force: bool,
}

/// A blob as listed by [`StoreView::list`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlobInfo {
    /// Its name.
    pub name: String,
    /// Plaintext size in bytes.
    pub size: u32,
    /// Generation that last wrote it.
    pub written_generation: u64,
    /// Area offset of its stored bytes (for diagnostics).
    pub area_offset: u64,
    /// Stored bytes (plaintext size plus the 16-byte tag when encrypted).
    pub stored_bytes: u32,
}

/// Opens the image file once (read-write when `writable`); anything but a
/// regular file is refused at once.
pub(crate) fn open_file(path: &Path, writable: bool) -> Result<Arc<File>, StoreError> {
    let file = crate::file::open_regular(path, writable).map_err(crate::image::ImageError::from)?;
    Ok(Arc::new(file))
}
