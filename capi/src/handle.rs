//! The handles C holds: a store (a writer or a read-only handle behind a
//! mutex, so threads may share it), a nested lock acquisition, and a
//! released store. A handle a call gives up (a release, a reclaim) is
//! emptied in place: the caller's pointer stays the same allocation, and
//! a call on an emptied handle is refused, never undefined.

use crate::Fail;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tpmstate::lock::LockGuard;
use tpmstate::{ReadOnlyStore, Released, Store, StoreView};

/// An open store: a writer (or exclusive) handle, or a read-only one.
pub struct tpmstate_store {
    state: Mutex<Option<Handle>>,
    /// Nested acquisitions ([`tpmstate_lock`]) not yet released.
    nested: Arc<AtomicUsize>,
}

/// What a store handle holds.
pub(crate) enum Handle {
    Writer(Store),
    Reader(ReadOnlyStore),
}

impl Handle {
    pub(crate) fn view(&self) -> &StoreView {
        match self {
            Handle::Writer(s) => s,
            Handle::Reader(s) => s,
        }
    }

    pub(crate) fn writer(&mut self) -> Result<&mut Store, Fail> {
        match self {
            Handle::Writer(s) => Ok(s),
            Handle::Reader(r) => Err(Fail::usage(format!(
                "{}: opened read-only (TPMSTATE_LOCK_SHARED or _NONE); open it with TPMSTATE_LOCK_WRITER to write",
                r.path().display()
            ))),
        }
    }
}

/// A mutex that a panic elsewhere does not make unusable: the store's own
/// state is consistent after any failed call (a failed commit poisons the
/// writer itself, which then refuses to commit).
fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl tpmstate_store {
    /// A new handle on the heap, for C.
    pub(crate) fn boxed(handle: Handle) -> *mut tpmstate_store {
        Box::into_raw(Box::new(tpmstate_store {
            state: Mutex::new(Some(handle)),
            nested: Arc::default(),
        }))
    }

    /// Runs `f` on the handle, the only call on it meanwhile.
    pub(crate) fn with<R>(
        &self,
        f: impl FnOnce(&mut Handle) -> Result<R, Fail>,
    ) -> Result<R, Fail> {
        match locked(&self.state).as_mut() {
            Some(h) => f(h),
            None => Err(Fail::usage(
                "this store handle was given up (by a release); close it",
            )),
        }
    }

    /// Takes the writer out of the handle for a call that gives it up,
    /// unless nested acquisitions are still held; `put_back` returns it.
    pub(crate) fn take_writer(&self) -> Result<Store, Fail> {
        let mut state = locked(&self.state);
        let held = self.nested.load(Ordering::SeqCst);
        match state.take() {
            Some(Handle::Writer(w)) if held == 0 => Ok(w),
            other => {
                let message = match &other {
                    Some(Handle::Writer(_)) => format!(
                        "{held} nested lock acquisitions are still held: release them first"
                    ),
                    Some(Handle::Reader(_)) => "only a writer handle can be released".into(),
                    None => "this store handle was given up already".into(),
                };
                *state = other;
                Err(Fail::usage(message))
            }
        }
    }

    /// Puts a writer back after a failed hand-over.
    pub(crate) fn put_back(&self, writer: Store) {
        *locked(&self.state) = Some(Handle::Writer(writer));
    }

    /// A nested acquisition, counted until released.
    pub(crate) fn nested(&self, guard: LockGuard) -> *mut tpmstate_lock {
        self.nested.fetch_add(1, Ordering::SeqCst);
        Box::into_raw(Box::new(tpmstate_lock {
            _guard: guard,
            count: Arc::clone(&self.nested),
        }))
    }
}

/// A counted lock acquisition, held until tpmstate_lock_release().
pub struct tpmstate_lock {
    _guard: LockGuard,
    count: Arc<AtomicUsize>,
}

impl Drop for tpmstate_lock {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A released store: it reads, it cannot write; tpmstate_reclaim() takes
/// the writer lock back.
pub struct tpmstate_released {
    state: Mutex<Option<Released>>,
}

impl tpmstate_released {
    pub(crate) fn boxed(released: Released) -> *mut tpmstate_released {
        Box::into_raw(Box::new(tpmstate_released {
            state: Mutex::new(Some(released)),
        }))
    }

    /// Takes the released handle out for a reclaim; `put_back` returns it.
    pub(crate) fn take(&self) -> Result<Released, Fail> {
        locked(&self.state)
            .take()
            .ok_or_else(|| Fail::usage("this released handle was reclaimed already; close it"))
    }

    pub(crate) fn put_back(&self, released: Released) {
        *locked(&self.state) = Some(released);
    }
}
