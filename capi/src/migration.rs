//! Migration: the source releases its writer after handing the state over
//! (and may reclaim it if the migration fails); the target claims the
//! image under an exclusive lock, validating and decrypting every blob
//! (with a callback of its own) before it accepts it.

use crate::handle::{tpmstate_released, tpmstate_store, Handle};
use crate::{call, put, reset_out, store_key, text, Fail, TPMSTATE_E_DAMAGED, TPMSTATE_E_REFUSED};
use std::ffi::{c_char, c_int, c_void};
use std::time::Duration;
use tpmstate::migration::{self, ClaimOptions, Incoming};
use tpmstate::{Locking, ReclaimError};

/// A claim's check of one blob: name and its decrypted data/len (data is
/// NULL for an empty blob); returns 0 to accept, anything else to refuse
/// the whole claim. ctx is the pointer given to tpmstate_claim(). It must
/// return normally: no longjmp() out of it, no C++ exception through it.
pub type tpmstate_validate_fn = Option<
    unsafe extern "C" fn(
        ctx: *mut c_void,
        name: *const c_char,
        data: *const u8,
        len: usize,
    ) -> c_int,
>;

/// Releases a writer for a migration's target: settles the image, drops
/// the lock and sets *out to a read-only released handle; the store is
/// freed and *store becomes NULL. On failure *store is the same live
/// handle as before. A handle with nested acquisitions outstanding is
/// refused.
///
/// # Safety
/// store points to a live writer handle's pointer; out is valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn tpmstate_release_outgoing(
    store: *mut *mut tpmstate_store,
    out: *mut *mut tpmstate_released,
) -> c_int {
    call(|| {
        // SAFETY: the caller promises `out` NULL or writable.
        unsafe { reset_out(out)? };
        // SAFETY: `store` is checked for NULL before it is read; the
        // caller promises `*store` a live handle.
        if store.is_null() || unsafe { (*store).is_null() } {
            return Err(Fail::usage("store and *store must not be NULL"));
        }
        // SAFETY: not NULL (checked); a live handle (the caller's promise).
        let handle = unsafe { &**store };
        let writer = handle.take_writer()?;
        match migration::release_outgoing(writer) {
            Ok(released) => {
                // SAFETY: all three checked not NULL; the store handle is
                // emptied and, by the caller's promise, used by no one else
                // now: freeing it ends its life here.
                unsafe {
                    out.write(tpmstate_released::boxed(released));
                    drop(Box::from_raw(*store));
                    *store = std::ptr::null_mut();
                }
                Ok(())
            }
            Err(e) => {
                let fail = Fail::from(e.error);
                handle.put_back(*e.store);
                Err(fail)
            }
        }
    })
}

/// Takes the writer lock back after a failed migration, waiting up to
/// timeout_ms, and checks the image still holds this handle's state.
/// On success *out is the writer, the released handle is freed and
/// *released becomes NULL. TPMSTATE_E_DAMAGED: the lock is back but the
/// state on disk was damaged meanwhile; *out is a writer that must commit
/// every blob again, and *released is NULL. Any other failure (the lock
/// is busy, or a target committed a newer state: TPMSTATE_E_CORRUPT)
/// leaves *released the same live handle and *out NULL.
///
/// # Safety
/// released points to a live released handle's pointer; out is
/// valid for a write.
#[no_mangle]
pub unsafe extern "C" fn tpmstate_reclaim(
    released: *mut *mut tpmstate_released,
    timeout_ms: u32,
    out: *mut *mut tpmstate_store,
) -> c_int {
    call(|| {
        // SAFETY: the caller promises `out` NULL or writable.
        unsafe { reset_out(out)? };
        // SAFETY: `released` is checked for NULL before it is read.
        if released.is_null() || unsafe { (*released).is_null() } {
            return Err(Fail::usage("released and *released must not be NULL"));
        }
        // SAFETY: not NULL (checked); a live handle (the caller's promise).
        let handle = unsafe { &**released };
        let timeout = Duration::from_millis(timeout_ms.into());
        let (writer, result) = match handle.take()?.reclaim(timeout) {
            Ok(w) => (w, Ok(())),
            Err(ReclaimError::StillReleased(r, e)) => {
                handle.put_back(*r);
                return Err(Fail::from(e));
            }
            Err(ReclaimError::Damaged(w, e)) => {
                let message = tpmstate::kind::chain(&e);
                (*w, Err(Fail::new(TPMSTATE_E_DAMAGED, message)))
            }
        };
        // SAFETY: all checked not NULL; the released handle is emptied and,
        // by the caller's promise, used by no one else now.
        unsafe {
            out.write(tpmstate_store::boxed(Handle::Writer(writer)));
            drop(Box::from_raw(*released));
            *released = std::ptr::null_mut();
        }
        result
    })
}

/// Closes a released handle (NULL: nothing).
///
/// # Safety
/// released comes from tpmstate_release_outgoing() and is closed
/// once, with no other call on it in progress.
#[no_mangle]
pub unsafe extern "C" fn tpmstate_released_close(released: *mut tpmstate_released) -> c_int {
    // SAFETY: the caller's promise (above), passed on.
    unsafe { crate::free(released) }
}

/// A migration target's claim of the image at path: waits up to
/// timeout_ms (0: 3 s) for the source to let go, takes the exclusive lock,
/// verifies and decrypts every blob under the 32-byte key (NULL and 0: a
/// plaintext store), checks that the required_count names in required are
/// present (a missing one: TPMSTATE_E_CORRUPT), and passes every blob to
/// validate (if not NULL; a refusal: TPMSTATE_E_REFUSED). Only then *out
/// is a writer. On any failure nothing was written, every lock is
/// released and *out is NULL.
///
/// # Safety
/// path is a NUL-terminated string; key NULL or key_len bytes;
/// required NULL (with 0) or required_count string pointers; validate NULL
/// or a function safe to call with ctx; out valid for a write.
#[no_mangle]
pub unsafe extern "C" fn tpmstate_claim(
    path: *const c_char,
    key: *const u8,
    key_len: usize,
    timeout_ms: u32,
    required: *const *const c_char,
    required_count: usize,
    validate: tpmstate_validate_fn,
    ctx: *mut c_void,
    out: *mut *mut tpmstate_store,
) -> c_int {
    call(|| {
        // SAFETY: the caller promises `out` NULL or writable.
        unsafe { reset_out(out)? };
        // SAFETY: the caller's promises, passed on.
        let (path, key, names) = unsafe {
            (
                crate::path(path)?,
                store_key(key, key_len)?,
                required_names(required, required_count)?,
            )
        };
        let refused = std::cell::Cell::new(false);
        let check = |name: &str, data: &[u8]| -> Result<(), String> {
            let Some(f) = validate else { return Ok(()) };
            let cname = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
            let bytes = match data.is_empty() {
                true => std::ptr::null(),
                false => data.as_ptr(),
            };
            // SAFETY: the caller promises `validate` safe to call with
            // `ctx`; the name and data live through the call.
            match unsafe { f(ctx, cname.as_ptr(), bytes, data.len()) } {
                0 => Ok(()),
                v => {
                    refused.set(true);
                    Err(format!("the validation callback refused it (returned {v})"))
                }
            }
        };
        let incoming = Incoming::open_deferred(path, Locking::Auto)?;
        let opts = ClaimOptions {
            key,
            required: names,
            timeout: (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms.into())),
            validate: Some(&check),
            expect: Default::default(),
        };
        let store = incoming.claim(opts).map_err(|e| match refused.get() {
            true => Fail::new(TPMSTATE_E_REFUSED, tpmstate::kind::chain(&e)),
            false => Fail::from(e),
        })?;
        let handle = tpmstate_store::boxed(Handle::Writer(store));
        // SAFETY: not NULL (checked); the caller promises it writable.
        unsafe { put(out, handle, "out") }
    })
}

/// The count names at required.
///
/// # Safety
/// `required` is NULL or points to `count` NUL-terminated strings.
unsafe fn required_names(
    required: *const *const c_char,
    count: usize,
) -> Result<Vec<String>, Fail> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if required.is_null() || count > 1 << 16 {
        return Err(Fail::usage(format!("required: NULL or too long ({count})")));
    }
    // SAFETY: not NULL (checked); the caller promises `count` pointers.
    let list = unsafe { std::slice::from_raw_parts(required, count) };
    list.iter()
        // SAFETY: the caller promises each a NUL-terminated string.
        .map(|&p| unsafe { text(p, "required name") }.map(str::to_string))
        .collect()
}
