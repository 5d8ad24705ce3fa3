//! Migration: the source releases its writer after handing the state over
//! (and may reclaim it if the migration fails); the target claims the
//! image under an exclusive lock, validating and decrypting every blob
//! (with a callback of its own) before it accepts it.

use crate::store::{tpmstate_store, Handle};
use crate::{call, put, store_key, text, Fail, TPMSTATE_E_REFUSED};
use std::ffi::{c_char, c_int, c_void};
use std::path::Path;
use std::time::Duration;
use tpmstate::migration::{self, ClaimOptions, Incoming};
use tpmstate::{Locking, ReclaimError, Released};

/// A released store: it reads, it cannot write; [`tpmstate_reclaim`]
/// takes the writer lock back.
pub struct tpmstate_released {
    released: Released,
}

/// A claim's check of one blob: `name` and its decrypted `data`/`len`;
/// returns 0 to accept, anything else to refuse the whole claim. `ctx` is
/// the pointer given to [`tpmstate_claim`].
pub type tpmstate_validate_fn = Option<
    unsafe extern "C" fn(
        ctx: *mut c_void,
        name: *const c_char,
        data: *const u8,
        len: usize,
    ) -> c_int,
>;

/// Releases a writer for a migration's target: settles the image, drops
/// the lock and sets `*out` to a read-only released handle; `*store`
/// becomes NULL. On failure `*store` stays a live writer.
///
/// # Safety
/// `store` points to a live writer handle's pointer; `out` is valid for a
/// write.
#[no_mangle]
pub unsafe extern "C" fn tpmstate_release_outgoing(
    store: *mut *mut tpmstate_store,
    out: *mut *mut tpmstate_released,
) -> c_int {
    call(|| {
        // SAFETY: checked for NULL before each use; the caller promises
        // `*store` is a live handle it gives up on success.
        let handle = unsafe {
            if store.is_null() || (*store).is_null() || out.is_null() {
                return Err(Fail::usage("store, *store and out must not be NULL"));
            }
            Box::from_raw(*store)
        };
        let writer = match handle.handle {
            Handle::Writer(w) => w,
            reader @ Handle::Reader(_) => {
                // Give the reader back untouched.
                let back = Box::into_raw(Box::new(tpmstate_store { handle: reader }));
                // SAFETY: not NULL (checked above).
                unsafe { *store = back };
                return Err(Fail::usage("only a writer handle can be released"));
            }
        };
        match migration::release_outgoing(writer) {
            Ok(released) => {
                let r = Box::into_raw(Box::new(tpmstate_released { released }));
                // SAFETY: both not NULL (checked above); the caller
                // promises them writable.
                unsafe {
                    *store = std::ptr::null_mut();
                    out.write(r);
                }
                Ok(())
            }
            Err(e) => {
                let fail = Fail::of(e.error.kind(), &e.error);
                let back = Box::into_raw(Box::new(tpmstate_store {
                    handle: Handle::Writer(*e.store),
                }));
                // SAFETY: not NULL (checked above).
                unsafe { *store = back };
                Err(fail)
            }
        }
    })
}

/// Takes the writer lock back after a failed migration, waiting up to
/// `timeout_ms`, and checks the image still holds this handle's state. On
/// success `*out` is the writer and `*released` becomes NULL. If the lock
/// cannot be had, `*released` stays live (retry or close it). If the state
/// on disk was damaged meanwhile, the result is `TPMSTATE_E_CORRUPT` with
/// `*out` a writer that must commit every blob again, and `*released` NULL.
///
/// # Safety
/// `released` points to a live released handle's pointer; `out` is valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn tpmstate_reclaim(
    released: *mut *mut tpmstate_released,
    timeout_ms: u32,
    out: *mut *mut tpmstate_store,
) -> c_int {
    call(|| {
        // SAFETY: checked for NULL; the caller promises `*released` live.
        let handle = unsafe {
            if released.is_null() || (*released).is_null() || out.is_null() {
                return Err(Fail::usage("released, *released and out must not be NULL"));
            }
            Box::from_raw(*released)
        };
        let timeout = Duration::from_millis(timeout_ms.into());
        let writer = |w| {
            Box::into_raw(Box::new(tpmstate_store {
                handle: Handle::Writer(w),
            }))
        };
        match handle.released.reclaim(timeout) {
            Ok(w) => {
                // SAFETY: both not NULL (checked above).
                unsafe {
                    *released = std::ptr::null_mut();
                    out.write(writer(w));
                }
                Ok(())
            }
            Err(ReclaimError::StillReleased(r, e)) => {
                let back = Box::into_raw(Box::new(tpmstate_released { released: *r }));
                // SAFETY: not NULL (checked above).
                unsafe { *released = back };
                Err(Fail::from(e))
            }
            Err(ReclaimError::Damaged(w, e)) => {
                // SAFETY: both not NULL (checked above).
                unsafe {
                    *released = std::ptr::null_mut();
                    out.write(writer(*w));
                }
                Err(Fail::from(e))
            }
        }
    })
}

/// Closes a released handle (NULL: nothing).
///
/// # Safety
/// `released` comes from [`tpmstate_release_outgoing`] and is closed once.
#[no_mangle]
pub unsafe extern "C" fn tpmstate_released_close(released: *mut tpmstate_released) -> c_int {
    call(|| {
        if !released.is_null() {
            // SAFETY: the caller promises a live handle, closed once.
            drop(unsafe { Box::from_raw(released) });
        }
        Ok(())
    })
}

/// A migration target's claim of the image at `path`: waits up to
/// `timeout_ms` (0: 3 s) for the source to let go, takes the exclusive
/// lock, verifies and decrypts every blob under the 32-byte `key` (NULL
/// and 0: a plaintext store), checks the `required_count` names in
/// `required` are present, and passes every blob to `validate` (if not
/// NULL). Only then `*out` is a writer. On any failure nothing was
/// written and every lock is released.
///
/// # Safety
/// `path` is a NUL-terminated string; `key` NULL or `key_len` bytes;
/// `required` NULL (with 0) or `required_count` string pointers;
/// `validate` NULL or a function safe to call with `ctx`; `out` valid for
/// a write.
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
        if out.is_null() {
            return Err(Fail::usage("out is NULL"));
        }
        // SAFETY: the caller's promises, passed on.
        let (path, key) = unsafe { (text(path, "path")?, store_key(key, key_len)?) };
        let names = required_names(required, required_count)?;
        let refused = std::cell::RefCell::new(None);
        let check = |name: &str, data: &[u8]| -> Result<(), String> {
            let Some(f) = validate else { return Ok(()) };
            let cname = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
            // SAFETY: the caller promises `validate` safe to call with
            // `ctx`; the name and data live through the call.
            let verdict = unsafe { f(ctx, cname.as_ptr(), data.as_ptr(), data.len()) };
            match verdict {
                0 => Ok(()),
                v => {
                    *refused.borrow_mut() = Some(v);
                    Err(format!("the validation callback refused it (returned {v})"))
                }
            }
        };
        let incoming = Incoming::open_deferred(Path::new(path), Locking::Auto)?;
        let opts = ClaimOptions {
            key,
            required: names,
            timeout: (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms.into())),
            validate: Some(&check),
            expect: Default::default(),
        };
        let store = incoming.claim(opts).map_err(|e| match *refused.borrow() {
            Some(_) => Fail::new(TPMSTATE_E_REFUSED, tpmstate::kind::chain(&e)),
            None => Fail::from(e),
        })?;
        let handle = Box::into_raw(Box::new(tpmstate_store {
            handle: Handle::Writer(store),
        }));
        // SAFETY: not NULL (checked); the caller promises it writable.
        unsafe { put(out, handle, "out") }
    })
}

/// The `count` names at `required`.
fn required_names(required: *const *const c_char, count: usize) -> Result<Vec<String>, Fail> {
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
