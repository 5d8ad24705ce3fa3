//! libtpms's NVRAM in the store: each state blob libtpms writes while it
//! runs is one durable commit of the writer handle the emulator holds for
//! its life.
//!
//! Starting the TPM (INIT) is one commit too: blobs received with
//! SET_STATEBLOB are held, libtpms starts from them (or from the store),
//! and only if it started does the held `permall` land, with whatever
//! libtpms wrote while starting and the deletion of the volatile state INIT
//! may ask for. A start libtpms refuses writes nothing. A held volatile
//! state is read by the start and not stored, as swtpm hands it to libtpms
//! without storing it.

use crate::image::ImageHandle;
use crate::libtpms::{Host, TpmResult, TPM_FAIL};
use crate::log::Log;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Blob changes waiting for a start: `None` deletes.
type Pending = BTreeMap<String, Option<Vec<u8>>>;

/// A start in progress.
struct Start {
    /// The blobs held from SET_STATEBLOB, which it reads first.
    held: Pending,
    /// What libtpms wrote or deleted while starting.
    written: Pending,
}

/// The store behind libtpms, and the locality of the command in progress.
pub struct StoreHost {
    image: ImageHandle,
    log: Log,
    /// Locality of the command being processed (SET_LOCALITY or the
    /// send-command header).
    pub locality: u8,
    /// Blobs received with SET_STATEBLOB, for the next start.
    held: Pending,
    /// While the TPM starts: what it starts from and what it writes.
    starting: Option<Start>,
    /// What the start read, and from where: for the message when libtpms
    /// refuses the state.
    pub loaded: Vec<String>,
    /// Time spent in store commits (for `bench`).
    pub commit_time: Duration,
    /// Number of commits made.
    pub commits: u64,
    /// Set when a write failed: the TPM's state in memory is then ahead of
    /// the image, and the emulator reports it and stops serving.
    pub failed: Option<String>,
}

impl StoreHost {
    /// Serves libtpms's NVRAM from `image`.
    pub fn new(image: ImageHandle, log: Log) -> StoreHost {
        StoreHost {
            image,
            log,
            locality: 0,
            held: Pending::new(),
            starting: None,
            loaded: Vec::new(),
            commit_time: Duration::ZERO,
            commits: 0,
            failed: None,
        }
    }

    /// The image, for reads outside libtpms's callbacks, and to claim,
    /// reclaim or release it.
    pub fn image(&mut self) -> &mut ImageHandle {
        &mut self.image
    }

    /// Holds a blob received with SET_STATEBLOB for the next start (an
    /// empty one drops what was held for that name).
    pub fn hold(&mut self, name: &str, data: &[u8]) {
        match data.is_empty() {
            true => self.held.remove(name),
            false => self.held.insert(name.to_string(), Some(data.to_vec())),
        };
    }

    /// Begins a start: libtpms's reads and writes go to the held blobs.
    pub fn begin_start(&mut self) {
        self.starting = Some(Start {
            held: std::mem::take(&mut self.held),
            written: Pending::new(),
        });
        self.loaded.clear();
    }

    /// The start failed: nothing it wrote is kept; the held blobs are.
    pub fn abandon_start(&mut self) {
        // The held blobs stay held: a retried INIT must not quietly start
        // the image's older TPM instead.
        if let Some(start) = self.starting.take() {
            self.held = start.held;
        }
        self.image.start_failed();
    }

    /// The start succeeded: commits what it changed (and the deletion of
    /// `also_delete`, if stored) in one commit, or none if nothing changed.
    pub fn finish_start(&mut self, also_delete: Option<&str>) -> Result<(), TpmResult> {
        let Some(Start {
            held,
            written: mut changes,
        }) = self.starting.take()
        else {
            return Ok(());
        };
        if let Some(permall) = held
            .get("permall")
            .filter(|_| !changes.contains_key("permall"))
        {
            changes.insert("permall".into(), permall.clone());
        }
        if let Some(name) = also_delete {
            changes.insert(name.to_string(), None);
        }
        let path = self.image.path().display().to_string();
        let Some(store) = self.image.store() else {
            return Err(self.fail(format!(
                "{path}: the image is not held: the TPM's start cannot be stored"
            )));
        };
        changes.retain(|name, data| data.is_some() || store.contains(name));
        if changes.is_empty() {
            self.image.started();
            return Ok(());
        }
        let start = Instant::now();
        let mut t = store.transaction();
        let staged = changes.iter().try_for_each(|(name, data)| match data {
            Some(d) => t.put(name, d),
            None => t.delete(name),
        });
        let result = staged.and_then(|()| t.commit());
        self.commit_time += start.elapsed();
        self.commits += 1;
        if result.is_ok() {
            self.image.started();
        }
        result.map(|_| ()).map_err(|e| {
            let names: Vec<&str> = changes.keys().map(String::as_str).collect();
            self.fail(format!(
                "committing the TPM's start ({}) to {path}: {}",
                names.join(", "),
                crate::chain(&e)
            ))
        })
    }

    fn fail(&mut self, what: String) -> TpmResult {
        self.log.error(&what);
        self.failed.get_or_insert(what);
        TPM_FAIL
    }
}

impl Host for StoreHost {
    fn load(&mut self, name: &str) -> Result<Option<Vec<u8>>, TpmResult> {
        if let Some(start) = &self.starting {
            let found = match (start.written.get(name), start.held.get(name)) {
                (Some(w), _) => Some((w, "written while starting")),
                (None, Some(h)) => Some((h, "from SET_STATEBLOB")),
                (None, None) => None,
            };
            if let Some((blob, origin)) = found {
                let size = blob.as_ref().map_or(0, Vec::len);
                self.loaded.push(format!("{name} ({size} bytes, {origin})"));
                return Ok(blob.clone());
            }
        }
        let path = self.image.path().display().to_string();
        let Some(view) = self.image.view() else {
            self.log.error(&format!(
                "{path}: reading {name}: the image is not claimed yet"
            ));
            return Err(TPM_FAIL);
        };
        match view.get(name) {
            Ok(blob) => {
                if let Some(b) = &blob {
                    self.loaded
                        .push(format!("{name} ({} bytes, from the image)", b.len()));
                }
                Ok(blob.map(|b| b.to_vec()))
            }
            Err(e) => Err(self.fail(format!("reading {name} from {path}: {}", crate::chain(&e)))),
        }
    }

    fn store(&mut self, name: &str, data: &[u8]) -> Result<(), TpmResult> {
        if let Some(start) = self.starting.as_mut() {
            start.written.insert(name.to_string(), Some(data.to_vec()));
            return Ok(());
        }
        let Some(store) = self.image.store() else {
            // Handed over to a migration target: by construction nothing
            // writes the image until it is taken back.
            let path = self.image.path().display();
            self.log.error(&format!(
                "{path}: not storing {name}: the image is handed over"
            ));
            return Err(TPM_FAIL);
        };
        let start = Instant::now();
        let result = store.put(name, data);
        self.commit_time += start.elapsed();
        self.commits += 1;
        result.map(|_| ()).map_err(|e| {
            let path = self.image.path().display().to_string();
            self.fail(format!(
                "storing {name} ({} bytes) in {path}: {}",
                data.len(),
                crate::chain(&e)
            ))
        })
    }

    fn delete(&mut self, name: &str, must_exist: bool) -> Result<(), TpmResult> {
        let pending = self
            .starting
            .as_ref()
            .and_then(|s| s.written.get(name).or(s.held.get(name)));
        let exists = match pending {
            Some(change) => change.is_some(),
            None => self.image.view().is_some_and(|v| v.contains(name)),
        };
        if !exists {
            return match must_exist {
                true => Err(TPM_FAIL),
                false => Ok(()),
            };
        }
        if let Some(start) = self.starting.as_mut() {
            start.written.insert(name.to_string(), None);
            return Ok(());
        }
        let path = self.image.path().display().to_string();
        let Some(store) = self.image.store() else {
            self.log.error(&format!(
                "{path}: not deleting {name}: the image is handed over"
            ));
            return Err(TPM_FAIL);
        };
        store
            .delete(name)
            .map(|_| ())
            .map_err(|e| self.fail(format!("deleting {name} from {path}: {}", crate::chain(&e))))
    }

    fn locality(&self) -> u8 {
        self.locality
    }
}
