//! The image as the emulator holds it, through the library's handle types:
//! a writer `Store` (reads and writes), a `Released` handle after a
//! migration source handed the image over (reads only: nothing can write
//! until a reclaim succeeds), or, on a migration target, nothing yet until
//! the first SET_STATEBLOB or TPM command claims it (exclusive lock, the
//! whole store validated and decrypted with this emulator's key, then
//! writer).

use crate::log::Log;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tpmstate::migration::{self, ClaimOptions, Incoming, MigrationError};
use tpmstate::store::FormatOptions;
use tpmstate::store::ReclaimError;
use tpmstate::{KeySource, Locking, Released, Store, StoreError, StoreView};

/// How an image became writable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Held already, claimed, or taken back as it was left.
    AsItWas,
    /// Taken back, but its newest generation no longer verifies: the caller
    /// must write the TPM's state again.
    Damaged,
}

/// How long a claim or a reclaim waits for the other side (QEMU allows 3 s).
pub const HANDOVER_WAIT: Duration = Duration::from_secs(3);

enum State {
    Writer(Store),
    Released(Released),
    /// A migration target's image, neither locked nor read yet.
    Incoming,
    /// Only while a transition runs.
    Vacant,
}

/// The emulator's image handle and what it needs to claim or reclaim it.
pub struct ImageHandle {
    state: State,
    path: PathBuf,
    key: Option<KeySource>,
    log: Log,
    /// The generation a migration target claimed, until its TPM started:
    /// a start that fails gives the unchanged image back.
    claimed: Option<u64>,
}

impl ImageHandle {
    /// An image held as a writer.
    pub fn writer(store: Store, key: Option<KeySource>, log: Log) -> ImageHandle {
        let path = store.path().to_path_buf();
        ImageHandle {
            state: State::Writer(store),
            path,
            key,
            log,
            claimed: None,
        }
    }

    /// A migration target's image, claimed later (`--migration incoming`).
    pub fn incoming(path: &Path, key: Option<KeySource>, log: Log) -> ImageHandle {
        ImageHandle {
            state: State::Incoming,
            path: path.to_path_buf(),
            key,
            log,
            claimed: None,
        }
    }

    /// Whether the emulator has a key for the store (`--key`).
    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The store to read, if the image is held (writer or released).
    pub fn view(&self) -> Option<&StoreView> {
        match &self.state {
            State::Writer(s) => Some(s),
            State::Released(r) => Some(r),
            State::Incoming | State::Vacant => None,
        }
    }

    /// The writer, if the image is held as one now; never claims or
    /// reclaims (libtpms's callbacks use this: a write while the image is
    /// handed over is refused, whatever libtpms does).
    pub fn store(&mut self) -> Option<&mut Store> {
        match &mut self.state {
            State::Writer(s) => Some(s),
            _ => None,
        }
    }

    /// Makes the image writable before something that may write: a
    /// released image is reclaimed (waiting up to `wait`), a migration
    /// target's image claimed. On failure the image stays as it was and the
    /// log says why, in one line.
    pub fn make_writable(&mut self, why: &str, wait: Duration) -> Result<Taken, String> {
        let state = std::mem::replace(&mut self.state, State::Vacant);
        let (state, result) = match state {
            State::Writer(s) => (State::Writer(s), Ok(Taken::AsItWas)),
            State::Released(r) => self.reclaim(r, why, wait),
            State::Incoming => match self.claim(wait) {
                Ok(store) => {
                    self.claimed = Some(store.generation());
                    (State::Writer(store), Ok(Taken::AsItWas))
                }
                Err(e) => (State::Incoming, Err(e)),
            },
            State::Vacant => (State::Vacant, Err("the image is not held".to_string())),
        };
        self.state = state;
        if let Err(e) = &result {
            self.log.error(e);
        }
        result
    }

    fn reclaim(&self, r: Released, why: &str, wait: Duration) -> (State, Result<Taken, String>) {
        match r.reclaim(wait) {
            Ok(store) => {
                self.log
                    .info(&format!("{}: taken back ({why})", self.path.display()));
                (State::Writer(store), Ok(Taken::AsItWas))
            }
            Err(ReclaimError::StillReleased(r, e)) => (
                State::Released(*r),
                Err(format!(
                    "{}: cannot take the image back ({why}): {}",
                    self.path.display(),
                    tpmstate::kind::chain(&e)
                )),
            ),
            Err(ReclaimError::Damaged(store, e)) => {
                // This handle's TPM holds the only sound copy: the caller
                // writes it all again (Tpm::make_writable).
                self.log.error(&format!(
                    "{}: taken back ({why}), but it was damaged while handed over ({}); writing the TPM's state again",
                    self.path.display(),
                    tpmstate::kind::chain(&e)
                ));
                (State::Writer(*store), Ok(Taken::Damaged))
            }
        }
    }

    fn claim(&self, wait: Duration) -> Result<Store, String> {
        let started = std::time::Instant::now();
        let try_claim = || {
            Incoming::open_deferred(&self.path, Locking::Auto).and_then(|incoming| {
                incoming.claim(ClaimOptions {
                    key: self.key.clone(),
                    timeout: Some(wait),
                    ..Default::default()
                })
            })
        };
        let claimed = match try_claim() {
            // A blank image of the target's own: formatted now, under the
            // exclusive lock, then claimed.
            Err(MigrationError::Store(StoreError::NotAStore {
                first_data: None, ..
            })) => {
                let opts = FormatOptions {
                    key: self.key.clone(),
                    ..Default::default()
                };
                Store::format(&self.path, opts)
                    .map_err(MigrationError::Store)
                    .and_then(|()| try_claim())
            }
            other => other,
        };
        match claimed {
            Ok(store) => {
                self.log.info(&format!(
                    "{}: claimed for the incoming migration (generation {}, every blob validated) in {:.2} ms",
                    self.path.display(),
                    store.generation(),
                    started.elapsed().as_secs_f64() * 1000.0
                ));
                Ok(store)
            }
            Err(e) => Err(format!(
                "{}: refusing the incoming migration: {}",
                self.path.display(),
                tpmstate::kind::chain(&e)
            )),
        }
    }

    /// The TPM started: a claimed image is this emulator's for good.
    pub fn started(&mut self) {
        self.claimed = None;
    }

    /// The TPM's start failed: an image claimed for an incoming migration
    /// and not written since is let go again (no lock left), so that the
    /// source can take it back while this emulator still runs.
    pub fn start_failed(&mut self) {
        let Some(generation) = self.claimed.take() else {
            return;
        };
        let unchanged = matches!(&self.state, State::Writer(s) if s.generation() == generation);
        if unchanged {
            self.state = State::Incoming;
            self.log.info(&format!(
                "{}: the incoming state did not start: image let go, unchanged",
                self.path.display()
            ));
        }
    }

    /// Hands the image over to a migration target: commits so that the
    /// target can check it strictly, then releases the lock. From here on
    /// only [`ImageHandle::make_writable`] can write again.
    pub fn release(&mut self) -> Result<(), String> {
        let state = std::mem::replace(&mut self.state, State::Vacant);
        let (state, result) = match state {
            State::Writer(store) => match migration::release_outgoing(store) {
                Ok(r) => (State::Released(r), Ok(())),
                Err(e) => {
                    let msg = format!(
                        "{}: cannot hand the image over: {}",
                        self.path.display(),
                        tpmstate::kind::chain(&e.error)
                    );
                    (State::Writer(*e.store), Err(msg))
                }
            },
            other => (other, Ok(())),
        };
        self.state = state;
        match &result {
            Ok(()) => self.log.info(&format!(
                "{}: handed over (lock released)",
                self.path.display()
            )),
            Err(e) => self.log.error(e),
        }
        result
    }
}
