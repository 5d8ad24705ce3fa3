//! Stores: create, open (by lock mode), read a blob, commit several,
//! counted lock acquisitions, info, close.

use crate::handle::{tpmstate_lock, tpmstate_store, Handle};
use crate::{bytes, call, put, reset_out, store_key, text, Fail};
use crate::{TPMSTATE_E_NO_SUCH_BLOB, TPMSTATE_LOCK_EXCLUSIVE, TPMSTATE_LOCK_NONE};
use crate::{TPMSTATE_LOCK_SHARED, TPMSTATE_LOCK_WRITER};
use std::ffi::{c_char, c_int};
use std::time::Duration;
use tpmstate::image::CreateOptions;
use tpmstate::store::FormatOptions;
use tpmstate::{LockMode, OpenOptions, ReadOnlyStore, RollbackPolicy, Store};
use zeroize::Zeroize;

/// One change of a commit: data/len stored as blob name, or the blob
/// deleted when remove is not 0 (data is then ignored). If a commit names
/// a blob twice, the later change wins.
#[repr(C)]
pub struct tpmstate_change {
    /// The blob's name (UTF-8, NUL-terminated).
    pub name: *const c_char,
    /// Its new content (NULL only with len 0).
    pub data: *const u8,
    /// The content's length.
    pub len: usize,
    /// Not 0: delete the blob.
    pub remove: c_int,
}

/// What tpmstate_info() reports.
#[repr(C)]
pub struct tpmstate_info_t {
    /// The generation the handle serves.
    pub generation: u64,
    /// How many blobs it holds.
    pub blobs: u64,
    /// Their plaintext bytes in all.
    pub bytes: u64,
    /// 1 if the store is encrypted.
    pub encrypted: c_int,
    /// The handle's lock mode (TPMSTATE_LOCK_*).
    pub lock_mode: c_int,
}

/// A lock mode for a nested acquisition.
fn lock_mode(mode: c_int) -> Result<LockMode, Fail> {
    match mode {
        TPMSTATE_LOCK_SHARED => Ok(LockMode::Shared),
        TPMSTATE_LOCK_WRITER => Ok(LockMode::Writer),
        TPMSTATE_LOCK_EXCLUSIVE => Ok(LockMode::Exclusive),
        other => Err(Fail::usage(format!(
            "lock mode {other}: use TPMSTATE_LOCK_SHARED, _WRITER or _EXCLUSIVE (or _NONE to open)"
        ))),
    }
}

fn mode_code(mode: LockMode) -> c_int {
    match mode {
        LockMode::ForceShareRead => TPMSTATE_LOCK_NONE,
        LockMode::Shared => TPMSTATE_LOCK_SHARED,
        LockMode::Writer => TPMSTATE_LOCK_WRITER,
        LockMode::Exclusive => TPMSTATE_LOCK_EXCLUSIVE,
    }
}

/// Creates a new qcow2 image at path (mode 0600) of size bytes (0: 4 MiB)
/// holding an empty store, encrypted under the 32-byte key (NULL and 0: a
/// plaintext store). An existing file is refused.
///
/// # Safety
/// path is a NUL-terminated string; key is NULL or key_len bytes.
#[no_mangle]
pub unsafe extern "C" fn tpmstate_create(
    path: *const c_char,
    key: *const u8,
    key_len: usize,
    size: u64,
) -> c_int {
    call(|| {
        // SAFETY: the caller's promises, passed on.
        let (path, key) = unsafe { (crate::path(path)?, store_key(key, key_len)?) };
        let mut image = CreateOptions::default();
        if size != 0 {
            image.size = size;
        }
        let format = FormatOptions {
            key,
            ..Default::default()
        };
        Ok(Store::create(path, image, format)?)
    })
}

/// Opens the store in the image at path with lock mode (TPMSTATE_LOCK_WRITER
/// or _EXCLUSIVE: a writer; _SHARED or _NONE: read-only), under the 32-byte
/// key (NULL and 0 for a plaintext store). *out receives the handle, to be
/// closed with tpmstate_close(); it is NULL after a failure.
///
/// # Safety
/// path is a NUL-terminated string; key is NULL or key_len bytes;
/// out is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn tpmstate_open(
    path: *const c_char,
    key: *const u8,
    key_len: usize,
    mode: c_int,
    out: *mut *mut tpmstate_store,
) -> c_int {
    call(|| {
        // SAFETY: the caller promises `out` NULL or writable.
        unsafe { reset_out(out)? };
        // SAFETY: the caller's promises, passed on.
        let (path, key) = unsafe { (crate::path(path)?, store_key(key, key_len)?) };
        let opts = OpenOptions {
            key,
            ..Default::default()
        };
        let handle = match mode {
            // A force-share reader may catch a writer mid-commit: that
            // commit looks torn, and the one before it is the last
            // acknowledged.
            TPMSTATE_LOCK_NONE => Handle::Reader(ReadOnlyStore::open_force_share(
                path,
                OpenOptions {
                    rollback: RollbackPolicy::AcceptTorn,
                    ..opts
                },
            )?),
            _ => match lock_mode(mode)? {
                LockMode::Writer => Handle::Writer(Store::open(path, opts)?),
                LockMode::Exclusive => Handle::Writer(Store::open_exclusive(path, opts)?),
                _ => Handle::Reader(ReadOnlyStore::open(path, opts)?),
            },
        };
        // SAFETY: `out` is not NULL (checked); the caller promises it writable.
        unsafe { put(out, tpmstate_store::boxed(handle), "out") }
    })
}

/// Reads blob name: *data receives a copy of its content and *len its
/// length, to be freed with tpmstate_blob_free() (an empty blob gives a
/// NULL *data and 0, as does a failure). A missing blob is
/// TPMSTATE_E_NO_SUCH_BLOB.
///
/// # Safety
/// store is a live handle; name a NUL-terminated string; data and
/// len valid for writes.
#[no_mangle]
pub unsafe extern "C" fn tpmstate_get(
    store: *const tpmstate_store,
    name: *const c_char,
    data: *mut *mut u8,
    len: *mut usize,
) -> c_int {
    call(|| {
        if len.is_null() {
            return Err(Fail::usage("len is NULL"));
        }
        // SAFETY: the caller promises `data` and `len` NULL or writable;
        // `len` is not NULL (checked).
        unsafe {
            len.write(0);
            reset_out(data)?;
        }
        if store.is_null() {
            return Err(Fail::usage("store is NULL"));
        }
        // SAFETY: not NULL (checked); the caller promises a live handle
        // and a NUL-terminated name.
        let (store, name) = unsafe { (&*store, text(name, "name")?) };
        let blob = store.with(|h| {
            let view = h.view();
            view.get(name)?.ok_or_else(|| {
                let path = view.path().display();
                Fail::new(
                    TPMSTATE_E_NO_SUCH_BLOB,
                    format!("{path}: no blob named {name}"),
                )
            })
        })?;
        let (ptr, n) = match blob.len() {
            0 => (std::ptr::null_mut(), 0),
            n => (
                Box::into_raw(blob.to_vec().into_boxed_slice()).cast::<u8>(),
                n,
            ),
        };
        // SAFETY: both not NULL (checked); the caller promises them writable.
        unsafe {
            data.write(ptr);
            len.write(n);
        }
        Ok(())
    })
}

/// Wipes and frees a blob copy tpmstate_get() gave (data NULL: nothing).
///
/// # Safety
/// data and len are exactly what one tpmstate_get() call
/// returned, freed once.
#[no_mangle]
pub unsafe extern "C" fn tpmstate_blob_free(data: *mut u8, len: usize) {
    if data.is_null() || len == 0 {
        return;
    }
    // SAFETY: the caller promises `data`/`len` came from `tpmstate_get`,
    // which made them from a boxed slice of exactly `len` bytes, and that
    // this is the only free. Zeroing and freeing bytes cannot panic.
    let mut blob = unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(data, len)) };
    blob.zeroize();
}

/// Commits count changes in one atomic, durable commit; *generation (if
/// not NULL) receives the new generation. Nothing is written if any
/// change is refused. Needs a writer handle.
///
/// # Safety
/// store is a live handle; changes points to count changes whose
/// names and data are valid; generation is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn tpmstate_commit(
    store: *mut tpmstate_store,
    changes: *const tpmstate_change,
    count: usize,
    generation: *mut u64,
) -> c_int {
    call(|| {
        if store.is_null() || (changes.is_null() && count > 0) {
            return Err(Fail::usage("store and changes must not be NULL"));
        }
        if count > 1 << 20 {
            return Err(Fail::usage(format!("{count} changes in one commit")));
        }
        // SAFETY: not NULL (checked); the caller promises a live handle
        // and `count` readable changes.
        let (store, changes) = unsafe {
            let list = match count {
                0 => &[][..],
                _ => std::slice::from_raw_parts(changes, count),
            };
            (&*store, list)
        };
        let g = store.with(|h| {
            let mut tx = h.writer()?.transaction();
            for c in changes {
                // SAFETY: the caller promises each change's name a
                // NUL-terminated string and its data `len` readable bytes.
                let (name, data) = unsafe { (text(c.name, "change name")?, c.data) };
                match c.remove {
                    // SAFETY: as above.
                    0 => tx.put(name, unsafe { bytes(data, c.len, name)? })?,
                    _ => tx.delete(name)?,
                }
            }
            Ok(tx.commit()?)
        })?;
        if !generation.is_null() {
            // SAFETY: not NULL (checked); the caller promises it writable.
            unsafe { generation.write(g) };
        }
        Ok(())
    })
}

/// A counted acquisition of lock mode on the store's image, on top of the
/// handle's own: the real lock changes only when the strongest mode held
/// changes, and the last release steps back. Waits up to timeout_ms for a
/// conflicting holder (0: try once). *out receives the acquisition, to be
/// released with tpmstate_lock_release(); it keeps its lock even after the
/// handle is closed, and a handle with acquisitions outstanding cannot be
/// released for a migration.
///
/// # Safety
/// store is a live writer handle; out valid for a write.
#[no_mangle]
pub unsafe extern "C" fn tpmstate_lock_acquire(
    store: *const tpmstate_store,
    mode: c_int,
    timeout_ms: u32,
    out: *mut *mut tpmstate_lock,
) -> c_int {
    call(|| {
        // SAFETY: the caller promises `out` NULL or writable.
        unsafe { reset_out(out)? };
        if store.is_null() {
            return Err(Fail::usage("store is NULL"));
        }
        // SAFETY: not NULL (checked); the caller promises a live handle.
        let store = unsafe { &*store };
        let mode = lock_mode(mode)?;
        let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms.into()));
        // Counted under the handle's mutex, so that a release on another
        // thread sees it.
        let lock = store.with(|h| match h {
            Handle::Writer(s) => Ok(store.nested(s.acquire_nested(mode, timeout)?)),
            Handle::Reader(_) => Err(Fail::usage(
                "nested locks need a writer handle (TPMSTATE_LOCK_WRITER or _EXCLUSIVE)",
            )),
        })?;
        // SAFETY: not NULL (checked); the caller promises it writable.
        unsafe { put(out, lock, "out") }
    })
}

/// Releases one acquisition (NULL: nothing).
///
/// # Safety
/// lock comes from tpmstate_lock_acquire() and is released once.
#[no_mangle]
pub unsafe extern "C" fn tpmstate_lock_release(lock: *mut tpmstate_lock) -> c_int {
    // SAFETY: the caller's promise (above), passed on.
    unsafe { crate::free(lock) }
}

/// Fills *info with the handle's generation, blob count, bytes,
/// encryption and lock mode.
///
/// # Safety
/// store is a live handle; info valid for a write.
#[no_mangle]
pub unsafe extern "C" fn tpmstate_info(
    store: *const tpmstate_store,
    info: *mut tpmstate_info_t,
) -> c_int {
    call(|| {
        if store.is_null() || info.is_null() {
            return Err(Fail::usage("store and info must not be NULL"));
        }
        // SAFETY: not NULL (checked); the caller promises a live handle.
        let store = unsafe { &*store };
        let value = store.with(|h| {
            let view = h.view();
            let list = view.list();
            let mode = match &*h {
                Handle::Writer(s) => s.lock_mode(),
                Handle::Reader(s) => s.lock_mode(),
            };
            Ok(tpmstate_info_t {
                generation: view.generation(),
                blobs: list.len() as u64,
                bytes: list.iter().map(|b| u64::from(b.size)).sum(),
                encrypted: c_int::from(view.is_encrypted()),
                lock_mode: mode_code(mode),
            })
        })?;
        // SAFETY: not NULL (checked); the caller promises it writable.
        unsafe { put(info, value, "info") }
    })
}

/// Closes a handle, releasing its lock and wiping its key (NULL: nothing).
/// Nested acquisitions still outstanding keep their lock until released.
///
/// # Safety
/// store comes from this library and is closed once, with no other
/// call on it in progress.
#[no_mangle]
pub unsafe extern "C" fn tpmstate_close(store: *mut tpmstate_store) -> c_int {
    // SAFETY: the caller's promise (above), passed on.
    unsafe { crate::free(store) }
}
