//! The TPM's life cycle over libtpms, as swtpm runs it: stopped until INIT
//! (or at once with `--flags not-need-init`), running until STOP, SHUTDOWN
//! or the end; state blobs in and out only while stopped.

use crate::image::{ImageHandle, Taken};
use crate::libtpms::{Libtpms, StateType, TpmResult, TPM_BAD_PARAMETER, TPM_FAIL, TPM_SUCCESS};
use crate::log::Log;
use crate::nvram::StoreHost;
use std::cell::RefCell;
use std::rc::Rc;

/// The I/O buffer size swtpm starts with.
pub const DEFAULT_BUFFER_SIZE: u32 = 4096;

/// A TPM 2 on libtpms with its state in the store.
pub struct Tpm {
    lib: Libtpms,
    host: Rc<RefCell<StoreHost>>,
    log: Log,
    running: bool,
    buffer_size: u32,
}

impl Tpm {
    /// Binds libtpms to the store; the TPM is not started yet.
    pub fn new(mut lib: Libtpms, image: ImageHandle, log: Log) -> Result<Tpm, String> {
        let host = Rc::new(RefCell::new(StoreHost::new(image, log.clone())));
        lib.register(host.clone())
            .map_err(|rc| format!("libtpms refused its callbacks or TPM 2 (error 0x{rc:x})"))?;
        let (size, _, _) = lib.set_buffer_size(DEFAULT_BUFFER_SIZE);
        Ok(Tpm {
            lib,
            host,
            log,
            running: false,
            buffer_size: size,
        })
    }

    /// Whether the TPM is running.
    pub fn running(&self) -> bool {
        self.running
    }

    /// The store behind the TPM (never borrow across a libtpms call).
    pub fn host(&self) -> std::cell::RefMut<'_, StoreHost> {
        self.host.borrow_mut()
    }

    /// Starts the TPM (CMD_INIT) from the blobs held from SET_STATEBLOB,
    /// or else the stored state; a running TPM is stopped first. The start
    /// is one commit (`nvram.rs`); with `delete_volatile` that commit also
    /// deletes the volatile state, so that a later start cannot resume
    /// from it again. A start libtpms refuses writes nothing.
    pub fn init(&mut self, delete_volatile: bool) -> TpmResult {
        self.stop();
        self.host().begin_start();
        if let Err(rc) = self.lib.main_init() {
            self.host().abandon_start();
            self.lib.terminate();
            let why = self.host().failed.take();
            let path = self.host().image().path().display().to_string();
            let loaded = match self.host().loaded.join(", ") {
                l if l.is_empty() => "no state".to_string(),
                l => l,
            };
            self.log.error(&format!(
                "libtpms could not start the TPM from {path} (error 0x{rc:x}): {}; it read {loaded}; \
                 the image is left as it was",
                why.unwrap_or_else(|| "it refuses the state (it entered failure mode)".into())
            ));
            return TPM_FAIL;
        }
        let volatile = delete_volatile.then_some(StateType::Volatile.name());
        let committed = self.host().finish_start(volatile);
        if let Err(rc) = committed {
            self.lib.terminate();
            return rc;
        }
        self.running = true;
        TPM_SUCCESS
    }

    /// Makes the image writable before something that may write (a TPM
    /// command, INIT, SET_STATEBLOB, ...): takes a handed-over image back,
    /// or claims a migration target's; TPM_FAIL if that fails (the log
    /// says why).
    pub fn make_writable(&mut self, why: &str, wait: std::time::Duration) -> TpmResult {
        let taken = self.host().image().make_writable(why, wait);
        match taken {
            Ok(Taken::AsItWas) => TPM_SUCCESS,
            Ok(Taken::Damaged) => match self.write_state_again() {
                Ok(()) => TPM_SUCCESS,
                Err(e) => {
                    // The image's newest state does not verify and cannot be
                    // rebuilt: stop rather than serve on top of it.
                    let msg = format!(
                        "{}: repairing it failed: {e}",
                        self.host().image().path().display()
                    );
                    self.log.error(&msg);
                    self.host().failed.get_or_insert(msg);
                    TPM_FAIL
                }
            },
            Err(_) => TPM_FAIL,
        }
    }

    /// Writes every blob again in one commit after the image was damaged
    /// while handed over: `permall` from the running TPM's memory (the
    /// only sound copy), the others from the image where they verify.
    fn write_state_again(&mut self) -> Result<(), String> {
        let permall = match self.running {
            true => Some(self.lib.get_state(StateType::Permanent).map_err(|rc| {
                format!("libtpms could not hand out its permanent state (error 0x{rc:x})")
            })?),
            false => None,
        };
        let mut host = self.host();
        let store = host.image().store().ok_or("the image is not held")?;
        let mut blobs = Vec::new();
        for name in store.names().map(str::to_string).collect::<Vec<_>>() {
            if name == StateType::Permanent.name() && permall.is_some() {
                continue;
            }
            let data = store.get_required(&name).map_err(|e| {
                format!(
                    "{name} is damaged and the TPM's memory does not hold it: {}",
                    crate::chain(&e)
                )
            })?;
            blobs.push((name, data.to_vec()));
        }
        if let Some(p) = permall {
            blobs.push((StateType::Permanent.name().to_string(), p));
        }
        let mut t = store.transaction();
        for (name, data) in &blobs {
            t.put(name, data).map_err(|e| crate::chain(&e))?;
        }
        t.commit().map_err(|e| crate::chain(&e))?;
        self.log
            .info("every blob written again: the image is sound");
        Ok(())
    }

    /// Stops the TPM (CMD_STOP, CMD_SHUTDOWN); its state stays stored.
    pub fn stop(&mut self) {
        if self.running {
            self.lib.terminate();
            self.running = false;
        }
    }

    /// Runs one TPM command at `locality`; a stopped TPM answers with
    /// TPM_RC_FAILURE, as swtpm does.
    pub fn process(&mut self, command: &[u8], locality: u8) -> Vec<u8> {
        if !self.running || command.len() > self.buffer_size as usize {
            return failure_response();
        }
        self.host().locality = locality;
        match self.lib.process(command) {
            Ok(resp) => resp.to_vec(),
            Err(rc) => {
                self.log.error(&format!(
                    "libtpms could not process a command (error 0x{rc:x})"
                ));
                failure_response()
            }
        }
    }

    /// Writes the volatile state to the store (CMD_STORE_VOLATILE).
    pub fn store_volatile(&mut self) -> TpmResult {
        if !self.running {
            return TPM_FAIL;
        }
        let data = match self.lib.volatile_all_store() {
            Ok(d) => d,
            Err(rc) => return rc,
        };
        let mut host = self.host();
        match crate::libtpms::Host::store(&mut *host, StateType::Volatile.name(), &data) {
            Ok(()) => TPM_SUCCESS,
            Err(rc) => rc,
        }
    }

    /// A state blob for GET_STATEBLOB (the TPM runs): the stored one, or
    /// for the volatile state, libtpms's serialization of it now.
    pub fn get_state_blob(&mut self, st: StateType) -> Result<Vec<u8>, TpmResult> {
        if st == StateType::Volatile {
            return self.lib.volatile_all_store();
        }
        let mut host = self.host();
        let Some(view) = host.image().view() else {
            return Err(TPM_FAIL);
        };
        match view.get(st.name()) {
            Ok(blob) => Ok(blob.map(|b| b.to_vec()).unwrap_or_default()),
            Err(e) => {
                self.log
                    .error(&format!("reading {}: {}", st.name(), crate::chain(&e)));
                Err(TPM_FAIL)
            }
        }
    }

    /// Holds a blob received with SET_STATEBLOB (the TPM is stopped) for
    /// the next INIT, which commits it only if libtpms starts from it.
    pub fn set_state_blob(&mut self, st: StateType, data: &[u8]) -> TpmResult {
        if self.running {
            return TPM_BAD_PARAMETER;
        }
        self.host().hold(st.name(), data);
        TPM_SUCCESS
    }

    /// SET_BUFFERSIZE: sets (when stopped and `wanted` > 0) or queries the
    /// buffer size; returns (size, min, max).
    pub fn buffer_size(&mut self, wanted: u32) -> Result<(u32, u32, u32), TpmResult> {
        if wanted != 0 && self.running {
            return Err(TPM_BAD_PARAMETER);
        }
        let (size, min, max) = self.lib.set_buffer_size(wanted);
        if wanted != 0 {
            self.buffer_size = size;
        }
        Ok((size, min, max))
    }

    /// libtpms itself, for the control commands that pass straight through.
    pub fn lib(&mut self) -> &mut Libtpms {
        &mut self.lib
    }
}

impl Drop for Tpm {
    /// Stops libtpms (TPMLIB_Terminate) however the emulator ends.
    fn drop(&mut self) {
        self.stop();
    }
}

/// The largest command the data channel reads: libtpms's largest buffer.
pub const MAX_COMMAND: usize = 64 * 1024;

/// A TPM 2 response `{tag ST_NO_SESSIONS, size 10, rc}`.
pub fn error_response(rc: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(10);
    r.extend_from_slice(&0x8001u16.to_be_bytes());
    r.extend_from_slice(&10u32.to_be_bytes());
    r.extend_from_slice(&rc.to_be_bytes());
    r
}

/// TPM_RC_FAILURE: what a stopped TPM answers.
pub fn failure_response() -> Vec<u8> {
    error_response(0x101)
}

/// TPM_RC_LOCALITY: a locality this TPM refuses.
pub fn locality_response() -> Vec<u8> {
    error_response(0x907)
}
