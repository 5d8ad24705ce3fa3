//! libtpms's NVRAM in the store: each state blob libtpms writes is one
//! durable commit of the writer handle the emulator holds for its life.

use crate::libtpms::{Host, TpmResult, TPM_FAIL};
use crate::log::Log;
use std::time::{Duration, Instant};
use tpmstate::Store;

/// The store behind libtpms, and the locality of the command in progress.
pub struct StoreHost {
    store: Store,
    log: Log,
    /// Locality of the command being processed (SET_LOCALITY or the
    /// send-command header).
    pub locality: u8,
    /// Time spent in store commits, and their number (for `bench`).
    pub commit_time: Duration,
    /// Number of commits made.
    pub commits: u64,
    /// Set when a write failed: the TPM's state in memory is then ahead of
    /// the image, and the emulator reports it and stops serving.
    pub failed: Option<String>,
}

impl StoreHost {
    /// Serves libtpms's NVRAM from `store`.
    pub fn new(store: Store, log: Log) -> StoreHost {
        StoreHost {
            store,
            log,
            locality: 0,
            commit_time: Duration::ZERO,
            commits: 0,
            failed: None,
        }
    }

    /// The store, for reads and writes outside libtpms's callbacks.
    pub fn store(&mut self) -> &mut Store {
        &mut self.store
    }

    /// Gives the store back (on shutdown, or to release it).
    pub fn into_store(self) -> Store {
        self.store
    }

    fn fail(&mut self, what: String) -> TpmResult {
        self.log.error(&what);
        self.failed.get_or_insert(what);
        TPM_FAIL
    }
}

impl Host for StoreHost {
    fn load(&mut self, name: &str) -> Result<Option<Vec<u8>>, TpmResult> {
        match self.store.get(name) {
            Ok(blob) => Ok(blob.map(|b| b.to_vec())),
            Err(e) => Err(self.fail(format!(
                "reading {name} from {}: {}",
                self.store.path().display(),
                crate::chain(&e)
            ))),
        }
    }

    fn store(&mut self, name: &str, data: &[u8]) -> Result<(), TpmResult> {
        let start = Instant::now();
        let result = self.store.put(name, data);
        self.commit_time += start.elapsed();
        self.commits += 1;
        match result {
            Ok(_) => Ok(()),
            Err(e) => Err(self.fail(format!(
                "storing {name} ({} bytes) in {}: {}",
                data.len(),
                self.store.path().display(),
                crate::chain(&e)
            ))),
        }
    }

    fn delete(&mut self, name: &str, must_exist: bool) -> Result<(), TpmResult> {
        if !self.store.contains(name) {
            return match must_exist {
                true => Err(TPM_FAIL),
                false => Ok(()),
            };
        }
        match self.store.delete(name) {
            Ok(_) => Ok(()),
            Err(e) => Err(self.fail(format!(
                "deleting {name} from {}: {}",
                self.store.path().display(),
                crate::chain(&e)
            ))),
        }
    }

    fn locality(&self) -> u8 {
        self.locality
    }
}
