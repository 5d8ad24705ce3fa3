//! The C ABI of tpmstate: `libtpmstate_c.so` and `libtpmstate_c.a`, with
//! `include/tpmstate.h` generated from these declarations by cbindgen
//! (`tests/header.rs` fails when the two differ). `docs/c-api.md` is the
//! guide, with a complete example.
//!
//! Rules every function keeps:
//! - it returns a status: [`TPMSTATE_OK`] or an error code, stable across
//!   versions (the CLI's exit codes, plus a few of the ABI's own);
//!   [`tpmstate_last_error`] gives the message of the calling thread's last
//!   failure;
//! - no panic crosses the boundary: one becomes [`TPMSTATE_E_INTERNAL`];
//! - every pointer is checked for NULL and every length against its
//!   buffer's kind; names must be UTF-8 (paths are bytes, as Linux has them);
//! - threads may share a handle: calls on it take turns (a mutex);
//! - copies of secrets (keys) and of blob contents it hands out are wiped
//!   when dropped or freed with [`tpmstate_blob_free`].
//!
//! `unsafe` lives here only at the boundary: each block says why it holds.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]
// The C names are the ABI's: lower case with the library's prefix.
#![allow(non_camel_case_types)]

mod handle;
mod migration;
mod store;

pub use handle::{tpmstate_lock, tpmstate_released, tpmstate_store};
pub use migration::*;
pub use store::*;

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use tpmstate::ErrorKind;

/// Success.
pub const TPMSTATE_OK: c_int = 0;
/// A bad argument: a NULL pointer, a bad length, an unknown lock mode, a
/// call the handle's kind does not allow.
pub const TPMSTATE_E_USAGE: c_int = 1;
/// Not a qcow2 image, or no tpmstate store in it.
pub const TPMSTATE_E_NOT_A_STORE: c_int = 2;
/// The image or the store is damaged.
pub const TPMSTATE_E_CORRUPT: c_int = 3;
/// The store is encrypted and no key was given.
pub const TPMSTATE_E_KEY_MISSING: c_int = 4;
/// The key does not open the store (or a key was given for a plaintext one).
pub const TPMSTATE_E_WRONG_KEY: c_int = 5;
/// Another process (or handle) holds a conflicting lock.
pub const TPMSTATE_E_LOCKED: c_int = 6;
/// The image uses a feature tpmstate does not write.
pub const TPMSTATE_E_UNSUPPORTED: c_int = 7;
/// An operating-system I/O error.
pub const TPMSTATE_E_IO: c_int = 8;
/// The store has no room for the commit.
pub const TPMSTATE_E_NO_SPACE: c_int = 9;
/// A bug in tpmstate (a panic is reported so); nothing was written.
pub const TPMSTATE_E_INTERNAL: c_int = 10;
/// An older store, or another one, than the caller expects.
pub const TPMSTATE_E_ROLLBACK: c_int = 11;
/// No blob of that name.
pub const TPMSTATE_E_NO_SUCH_BLOB: c_int = 12;
/// A claim's validation callback refused a blob.
pub const TPMSTATE_E_REFUSED: c_int = 13;
/// tpmstate_reclaim took the lock back, but the state on disk was damaged
/// while released: *out is a writer that must commit every blob again.
pub const TPMSTATE_E_DAMAGED: c_int = 14;

/// Lock mode: no lock at all, QEMU's force-share read (`qemu-img -U`): a
/// read-only handle for diagnostics while a writer holds the image.
pub const TPMSTATE_LOCK_NONE: c_int = 0;
/// Lock mode: others may read, nobody may write (a read-only handle).
pub const TPMSTATE_LOCK_SHARED: c_int = 1;
/// Lock mode: read and write; others may only force-share read.
pub const TPMSTATE_LOCK_WRITER: c_int = 2;
/// Lock mode: nobody else at all.
pub const TPMSTATE_LOCK_EXCLUSIVE: c_int = 3;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// The message of the calling thread's last failure, in plain words ("" if
/// none yet). Successful calls leave it; the string stays valid until the
/// thread's next failing call. Never NULL.
#[no_mangle]
pub extern "C" fn tpmstate_last_error() -> *const c_char {
    // During thread exit the thread's storage may be gone already.
    LAST_ERROR
        .try_with(|m| m.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// The status code of an error class: the CLI's exit code, spelled out so
/// that a new class cannot slip in unnumbered.
fn code_of(kind: ErrorKind) -> c_int {
    match kind {
        ErrorKind::Usage => TPMSTATE_E_USAGE,
        ErrorKind::NotAStore => TPMSTATE_E_NOT_A_STORE,
        ErrorKind::Corrupt => TPMSTATE_E_CORRUPT,
        ErrorKind::KeyMissing => TPMSTATE_E_KEY_MISSING,
        ErrorKind::WrongKey => TPMSTATE_E_WRONG_KEY,
        ErrorKind::Locked => TPMSTATE_E_LOCKED,
        ErrorKind::Unsupported => TPMSTATE_E_UNSUPPORTED,
        ErrorKind::Io => TPMSTATE_E_IO,
        ErrorKind::NoSpace => TPMSTATE_E_NO_SPACE,
        ErrorKind::Internal => TPMSTATE_E_INTERNAL,
        ErrorKind::Rollback => TPMSTATE_E_ROLLBACK,
    }
}

/// A failure on its way to C: a code and a message.
pub(crate) struct Fail {
    code: c_int,
    message: String,
}

impl Fail {
    pub(crate) fn usage(message: impl Into<String>) -> Fail {
        Fail {
            code: TPMSTATE_E_USAGE,
            message: message.into(),
        }
    }

    pub(crate) fn new(code: c_int, message: impl Into<String>) -> Fail {
        Fail {
            code,
            message: message.into(),
        }
    }

    /// A library error: its class's code and its whole chain of causes.
    pub(crate) fn of(kind: ErrorKind, e: &dyn std::error::Error) -> Fail {
        Fail {
            code: code_of(kind),
            message: tpmstate::kind::chain(e),
        }
    }
}

macro_rules! fail_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Fail {
            fn from(e: $t) -> Fail {
                Fail::of(e.kind(), &e)
            }
        }
    )*};
}
fail_from!(
    tpmstate::StoreError,
    tpmstate::migration::MigrationError,
    tpmstate::crypto::CryptoError
);

/// Runs `f`, turning its failure or panic into a status and the thread's
/// last message.
pub(crate) fn call(f: impl FnOnce() -> Result<(), Fail>) -> c_int {
    let result = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        Err(Fail::new(
            TPMSTATE_E_INTERNAL,
            format!("internal error (a bug in tpmstate; nothing was written): {what}"),
        ))
    });
    let (code, message) = match result {
        Ok(()) => return TPMSTATE_OK,
        Err(f) => (f.code, f.message),
    };
    // A message with a NUL byte keeps the part before it.
    let message = CString::new(message).unwrap_or_else(|e| {
        let end = e.nul_position();
        let mut bytes = e.into_vec();
        bytes.truncate(end);
        // No NUL is left before `end`: this cannot fail.
        CString::new(bytes).unwrap_or_default()
    });
    // During thread exit the thread's storage may be gone: the code stands.
    let _ = LAST_ERROR.try_with(|m| *m.borrow_mut() = message);
    code
}

/// The UTF-8 string at `p`, named `what` in errors.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn text<'a>(p: *const c_char, what: &str) -> Result<&'a str, Fail> {
    if p.is_null() {
        return Err(Fail::usage(format!("{what} is NULL")));
    }
    // SAFETY: not NULL (checked), and the caller promises a NUL-terminated
    // string that lives long enough.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|_| Fail::usage(format!("{what} is not UTF-8")))
}

/// Frees a handle C gives back (NULL: nothing), as one call.
///
/// # Safety
/// `p` is NULL or came from `Box::into_raw` in this library, is freed
/// once, and no other call on it is in progress.
pub(crate) unsafe fn free<T>(p: *mut T) -> c_int {
    call(|| {
        if !p.is_null() {
            // SAFETY: the caller's promise: a live box, freed once.
            drop(unsafe { Box::from_raw(p) });
        }
        Ok(())
    })
}

/// The file path at `p`: bytes, as Linux paths are.
///
/// # Safety
/// As [`text`].
pub(crate) unsafe fn path<'a>(p: *const c_char) -> Result<&'a std::path::Path, Fail> {
    use std::os::unix::ffi::OsStrExt;
    if p.is_null() {
        return Err(Fail::usage("path is NULL"));
    }
    // SAFETY: not NULL (checked), and the caller promises a NUL-terminated
    // string that lives long enough.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    if bytes.is_empty() {
        return Err(Fail::usage("path is empty"));
    }
    Ok(std::path::Path::new(std::ffi::OsStr::from_bytes(bytes)))
}

/// Readies the out-pointer `out`: refuses a NULL one, and sets it to NULL
/// first, so that a failed call leaves no stale value there.
///
/// # Safety
/// `out` is NULL or valid for a write of a pointer.
pub(crate) unsafe fn reset_out<T>(out: *mut *mut T) -> Result<(), Fail> {
    if out.is_null() {
        return Err(Fail::usage("out is NULL"));
    }
    // SAFETY: not NULL (checked); the caller promises it writable.
    unsafe { out.write(std::ptr::null_mut()) };
    Ok(())
}

/// The `len` bytes at `p` (NULL only with `len` 0), named `what` in errors.
///
/// # Safety
/// `p` is NULL or points to `len` readable bytes that outlive `'a`.
pub(crate) unsafe fn bytes<'a>(p: *const u8, len: usize, what: &str) -> Result<&'a [u8], Fail> {
    if len > isize::MAX as usize {
        return Err(Fail::usage(format!("{what}: length {len} is too large")));
    }
    if p.is_null() {
        return match len {
            0 => Ok(&[]),
            _ => Err(Fail::usage(format!("{what} is NULL with length {len}"))),
        };
    }
    // SAFETY: not NULL, `len` fits an isize (both checked); the caller
    // promises `len` readable bytes that live long enough.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// The store key in `key`/`key_len`: NULL and 0 for none, or 32 bytes.
///
/// # Safety
/// As [`bytes`].
pub(crate) unsafe fn store_key(
    key: *const u8,
    key_len: usize,
) -> Result<Option<tpmstate::KeySource>, Fail> {
    // SAFETY: the caller's promise, passed on.
    let raw = unsafe { bytes(key, key_len, "key") }?;
    if raw.is_empty() {
        return Ok(None);
    }
    let raw: &[u8; 32] = raw
        .try_into()
        .map_err(|_| Fail::usage(format!("key: {} bytes; a store key has 32", raw.len())))?;
    let key = tpmstate::Key::from_bytes(raw).map_err(|e| Fail::usage(format!("key: {e}")))?;
    Ok(Some(tpmstate::KeySource::Key(key)))
}

/// Stores `value` through the out-pointer `out`.
///
/// # Safety
/// `out` is NULL or valid for a write of a `T`.
pub(crate) unsafe fn put<T>(out: *mut T, value: T, what: &str) -> Result<(), Fail> {
    if out.is_null() {
        return Err(Fail::usage(format!("{what} is NULL")));
    }
    // SAFETY: not NULL (checked); the caller promises it is writable.
    unsafe { out.write(value) };
    Ok(())
}
