//! The one FFI module: libtpms 0.9 (`libtpms.so.0`), loaded at run time so
//! that a machine without it still builds and tests everything else, and
//! the emulator can say exactly what to install.
//!
//! libtpms is a process-wide singleton that calls back into its host for
//! NVRAM and locality. [`Libtpms`] is `!Send`, so every TPM call happens
//! on the thread that loaded it, and the callbacks reach the host's
//! [`Host`] through a thread-local.
#![allow(unsafe_code)]

use libloading::Library;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_uchar, CStr};
use std::marker::PhantomData;
use std::rc::Rc;

/// A TPM result code (`TPM_RESULT`).
pub type TpmResult = u32;
/// `TPM_SUCCESS`.
pub const TPM_SUCCESS: TpmResult = 0;
/// `TPM_BAD_PARAMETER`.
pub const TPM_BAD_PARAMETER: TpmResult = 3;
/// `TPM_FAIL`.
pub const TPM_FAIL: TpmResult = 9;
/// `TPM_IOERROR`.
pub const TPM_IOERROR: TpmResult = 0x1f;
/// `TPM_RETRY`: what `loaddata` answers for "no such state yet".
pub const TPM_RETRY: TpmResult = 0x800;

/// The library's file name, as Debian's `libtpms0` installs it.
pub const SONAME: &str = "libtpms.so.0";

/// What libtpms calls back into: the host keeps its state and knows the
/// locality of the command being processed. Errors are TPM result codes,
/// which libtpms acts on; the host logs the reason before returning one.
pub trait Host {
    /// Blob `name`, or `None` when there is none yet.
    fn load(&mut self, name: &str) -> Result<Option<Vec<u8>>, TpmResult>;
    /// Stores blob `name` durably before returning.
    fn store(&mut self, name: &str, data: &[u8]) -> Result<(), TpmResult>;
    /// Deletes blob `name`; an absent blob is an error when `must_exist`.
    fn delete(&mut self, name: &str, must_exist: bool) -> Result<(), TpmResult>;
    /// The locality of the command being processed.
    fn locality(&self) -> u8;
}

/// The state blobs libtpms can hand over and take back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateType {
    /// `permall`: the TPM's permanent state.
    Permanent = 1,
    /// `volatilestate`.
    Volatile = 2,
    /// `savestate` (folded into `permall` by a TPM 2).
    SaveState = 4,
}

impl StateType {
    /// The NVRAM name libtpms uses for this blob.
    pub fn name(self) -> &'static str {
        match self {
            StateType::Permanent => "permall",
            StateType::Volatile => "volatilestate",
            StateType::SaveState => "savestate",
        }
    }
}

/// Why libtpms could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The shared library is not installed (or not loadable).
    #[error(
        "cannot load {SONAME} ({source}): the emulator needs libtpms 0.9; \
         on Debian or Ubuntu run `apt-get install libtpms0`"
    )]
    Missing {
        /// The loader's error.
        #[source]
        source: libloading::Error,
    },
    /// libtpms is one per process and this process has it loaded already.
    #[error("libtpms is loaded already: it is one per process")]
    AlreadyLoaded,
    /// A symbol the emulator needs is missing: a libtpms too old.
    #[error("{SONAME} lacks {symbol} ({source}): the emulator needs libtpms 0.9 or newer")]
    Symbol {
        /// The missing symbol.
        symbol: &'static str,
        /// The loader's error.
        #[source]
        source: libloading::Error,
    },
}

#[repr(C)]
struct Callbacks {
    size_of_struct: c_int,
    nvram_init: Option<extern "C" fn() -> TpmResult>,
    nvram_loaddata:
        Option<extern "C" fn(*mut *mut c_uchar, *mut u32, u32, *const c_char) -> TpmResult>,
    nvram_storedata: Option<extern "C" fn(*const c_uchar, u32, u32, *const c_char) -> TpmResult>,
    nvram_deletename: Option<extern "C" fn(u32, *const c_char, c_uchar) -> TpmResult>,
    io_init: Option<extern "C" fn() -> TpmResult>,
    io_getlocality: Option<extern "C" fn(*mut u32, u32) -> TpmResult>,
    io_getphysicalpresence: Option<extern "C" fn(*mut c_uchar, u32) -> TpmResult>,
}

/// The entry points, copied out of the library; valid while `_lib` lives.
struct Fns {
    get_version: unsafe extern "C" fn() -> u32,
    choose_tpm_version: unsafe extern "C" fn(c_int) -> TpmResult,
    register_callbacks: unsafe extern "C" fn(*mut Callbacks) -> TpmResult,
    main_init: unsafe extern "C" fn() -> TpmResult,
    terminate: unsafe extern "C" fn(),
    process:
        unsafe extern "C" fn(*mut *mut c_uchar, *mut u32, *mut u32, *mut c_uchar, u32) -> TpmResult,
    volatile_all_store: unsafe extern "C" fn(*mut *mut c_uchar, *mut u32) -> TpmResult,
    cancel_command: unsafe extern "C" fn() -> TpmResult,
    get_state: unsafe extern "C" fn(c_int, *mut *mut c_uchar, *mut u32) -> TpmResult,
    get_info: unsafe extern "C" fn(c_int) -> *mut c_char,
    set_buffer_size: unsafe extern "C" fn(u32, *mut u32, *mut u32) -> u32,
    hash_start: unsafe extern "C" fn() -> TpmResult,
    hash_data: unsafe extern "C" fn(*const c_uchar, u32) -> TpmResult,
    hash_end: unsafe extern "C" fn() -> TpmResult,
    established_get: unsafe extern "C" fn(*mut c_uchar) -> TpmResult,
    established_reset: unsafe extern "C" fn() -> TpmResult,
}

thread_local! {
    /// The host's NVRAM, for the callbacks (set by [`Libtpms::register`]).
    static NVRAM: RefCell<Option<Rc<RefCell<dyn Host>>>> = const { RefCell::new(None) };
}

/// libtpms, loaded, on this thread.
pub struct Libtpms {
    fns: Fns,
    /// The response buffer libtpms `malloc`s and grows; ours to `free`.
    response: *mut c_uchar,
    response_capacity: u32,
    _lib: Library,
    /// libtpms is one per process and calls back on the calling thread.
    _not_send: PhantomData<*const ()>,
}

impl Libtpms {
    /// Loads `libtpms.so.0` and resolves every entry point the emulator uses.
    pub fn load() -> Result<Libtpms, LoadError> {
        // libtpms's state is process-wide: a second handle, on any thread,
        // would share it behind the first one's back.
        static LOADED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if LOADED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(LoadError::AlreadyLoaded);
        }
        // SAFETY: loading libtpms runs only its ELF constructors, which set
        // up no state beyond the library's own globals.
        let lib =
            unsafe { Library::new(SONAME) }.map_err(|source| LoadError::Missing { source })?;
        macro_rules! sym {
            ($name:literal) => {{
                // SAFETY: the type given by the field this initializes is the
                // prototype of $name in libtpms's <libtpms/tpm_library.h> or
                // <libtpms/tpm_tis.h>; the pointer is used only while `lib`,
                // stored alongside it, stays loaded.
                let s = unsafe { lib.get(concat!($name, "\0").as_bytes()) }.map_err(|source| {
                    LoadError::Symbol {
                        symbol: $name,
                        source,
                    }
                })?;
                *s
            }};
        }
        let fns = Fns {
            get_version: sym!("TPMLIB_GetVersion"),
            choose_tpm_version: sym!("TPMLIB_ChooseTPMVersion"),
            register_callbacks: sym!("TPMLIB_RegisterCallbacks"),
            main_init: sym!("TPMLIB_MainInit"),
            terminate: sym!("TPMLIB_Terminate"),
            process: sym!("TPMLIB_Process"),
            volatile_all_store: sym!("TPMLIB_VolatileAll_Store"),
            cancel_command: sym!("TPMLIB_CancelCommand"),
            get_state: sym!("TPMLIB_GetState"),
            get_info: sym!("TPMLIB_GetInfo"),
            set_buffer_size: sym!("TPMLIB_SetBufferSize"),
            hash_start: sym!("TPM_IO_Hash_Start"),
            hash_data: sym!("TPM_IO_Hash_Data"),
            hash_end: sym!("TPM_IO_Hash_End"),
            established_get: sym!("TPM_IO_TpmEstablished_Get"),
            established_reset: sym!("TPM_IO_TpmEstablished_Reset"),
        };
        Ok(Libtpms {
            fns,
            response: std::ptr::null_mut(),
            response_capacity: 0,
            _lib: lib,
            _not_send: PhantomData,
        })
    }

    /// libtpms's version as "major.minor.micro".
    pub fn version(&self) -> String {
        // SAFETY: takes no arguments and only reads a constant.
        let v = unsafe { (self.fns.get_version)() };
        format!("{}.{}.{}", v >> 16, (v >> 8) & 0xff, v & 0xff)
    }

    /// Registers `nvram` for libtpms's callbacks and selects a TPM 2.
    pub fn register(&mut self, nvram: Rc<RefCell<dyn Host>>) -> Result<(), TpmResult> {
        NVRAM.with(|slot| *slot.borrow_mut() = Some(nvram));
        let mut callbacks = Callbacks {
            size_of_struct: std::mem::size_of::<Callbacks>() as c_int,
            nvram_init: Some(nvram_init),
            nvram_loaddata: Some(nvram_loaddata),
            nvram_storedata: Some(nvram_storedata),
            nvram_deletename: Some(nvram_deletename),
            io_init: Some(io_init),
            io_getlocality: Some(io_getlocality),
            io_getphysicalpresence: Some(io_getphysicalpresence),
        };
        // SAFETY: `callbacks` is a valid, fully initialized struct laid out
        // as libtpms's `struct libtpms_callbacks`; libtpms copies it.
        check(unsafe { (self.fns.register_callbacks)(&mut callbacks) })?;
        // SAFETY: 1 is TPMLIB_TPM_VERSION_2; takes no pointers.
        check(unsafe { (self.fns.choose_tpm_version)(1) })
    }

    /// Sets the I/O buffer size (0 queries); returns (size, min, max).
    pub fn set_buffer_size(&mut self, wanted: u32) -> (u32, u32, u32) {
        let (mut min, mut max) = (0u32, 0u32);
        // SAFETY: both out-pointers point to live locals.
        let size = unsafe { (self.fns.set_buffer_size)(wanted, &mut min, &mut max) };
        (size, min, max)
    }

    /// `TPMLIB_MainInit`: loads the state through the callbacks and starts the TPM.
    pub fn main_init(&mut self) -> Result<(), TpmResult> {
        // SAFETY: takes no arguments; callbacks run on this thread.
        check(unsafe { (self.fns.main_init)() })
    }

    /// `TPMLIB_Terminate`: stops the TPM (its state stays in the NVRAM).
    pub fn terminate(&mut self) {
        // SAFETY: takes no arguments; safe to call whether or not initialized.
        unsafe { (self.fns.terminate)() }
    }

    /// Runs one TPM command; returns the response bytes.
    pub fn process(&mut self, command: &[u8]) -> Result<&[u8], TpmResult> {
        let mut command = command.to_vec();
        let len = u32::try_from(command.len()).map_err(|_| TPM_BAD_PARAMETER)?;
        let mut resp_size = 0u32;
        // SAFETY: `response` is null or a buffer libtpms malloc'ed with
        // `response_capacity` bytes, which it may realloc (updating both);
        // `command` is a live buffer of `len` bytes.
        let rc = unsafe {
            (self.fns.process)(
                &mut self.response,
                &mut resp_size,
                &mut self.response_capacity,
                command.as_mut_ptr(),
                len,
            )
        };
        check(rc)?;
        if self.response.is_null() || resp_size > self.response_capacity {
            return Err(TPM_FAIL);
        }
        // SAFETY: libtpms wrote `resp_size` bytes, at most its capacity
        // (checked above), into `response`, which stays allocated until
        // the next call through `&mut self`.
        Ok(unsafe { std::slice::from_raw_parts(self.response, resp_size as usize) })
    }

    /// `TPMLIB_VolatileAll_Store`: the volatile state, serialized.
    pub fn volatile_all_store(&mut self) -> Result<Vec<u8>, TpmResult> {
        let mut buf: *mut c_uchar = std::ptr::null_mut();
        let mut len = 0u32;
        // SAFETY: both out-pointers point to live locals.
        let rc = unsafe { (self.fns.volatile_all_store)(&mut buf, &mut len) };
        // SAFETY: on success `buf` holds `len` bytes malloc'ed by libtpms.
        let data = unsafe { take_malloced(buf, len) };
        check(rc).map(|_| data)
    }

    /// `TPMLIB_CancelCommand`.
    pub fn cancel_command(&mut self) -> TpmResult {
        // SAFETY: takes no arguments.
        unsafe { (self.fns.cancel_command)() }
    }

    /// `TPMLIB_GetInfo`: JSON text describing the TPM (flags: 1 spec, 2 attributes, 4 features).
    pub fn get_info(&mut self, flags: u32) -> Option<String> {
        let flags = c_int::try_from(flags).ok()?;
        // SAFETY: takes a plain integer; returns null or a malloc'ed C string.
        let p = unsafe { (self.fns.get_info)(flags) };
        if p.is_null() {
            return None;
        }
        // SAFETY: `p` is a NUL-terminated string libtpms malloc'ed for us,
        // read once and then freed exactly once.
        let text = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: see above: ours to free.
        unsafe { libc::free(p.cast()) };
        Some(text)
    }

    /// `TPMLIB_GetState`: blob `st` of the running TPM, from its memory.
    pub fn get_state(&mut self, st: StateType) -> Result<Vec<u8>, TpmResult> {
        let mut buf: *mut c_uchar = std::ptr::null_mut();
        let mut len = 0u32;
        // SAFETY: both out-pointers point to live locals.
        let rc = unsafe { (self.fns.get_state)(st as c_int, &mut buf, &mut len) };
        // SAFETY: on return `buf` is null or holds `len` bytes libtpms
        // malloc'ed for us.
        let data = unsafe { take_malloced(buf, len) };
        check(rc).map(|_| data)
    }

    /// `TPM_IO_Hash_Start`.
    pub fn hash_start(&mut self) -> TpmResult {
        // SAFETY: takes no arguments.
        unsafe { (self.fns.hash_start)() }
    }

    /// `TPM_IO_Hash_Data`.
    pub fn hash_data(&mut self, data: &[u8]) -> TpmResult {
        let Ok(len) = u32::try_from(data.len()) else {
            return TPM_BAD_PARAMETER;
        };
        // SAFETY: `data` is `len` live bytes, only read.
        unsafe { (self.fns.hash_data)(data.as_ptr(), len) }
    }

    /// `TPM_IO_Hash_End`.
    pub fn hash_end(&mut self) -> TpmResult {
        // SAFETY: takes no arguments.
        unsafe { (self.fns.hash_end)() }
    }

    /// `TPM_IO_TpmEstablished_Get`.
    pub fn established(&mut self) -> Result<bool, TpmResult> {
        let mut bit: c_uchar = 0;
        // SAFETY: the out-pointer points to a live local.
        check(unsafe { (self.fns.established_get)(&mut bit) }).map(|_| bit != 0)
    }

    /// `TPM_IO_TpmEstablished_Reset`.
    pub fn reset_established(&mut self) -> TpmResult {
        // SAFETY: takes no arguments.
        unsafe { (self.fns.established_reset)() }
    }
}

impl Drop for Libtpms {
    fn drop(&mut self) {
        // SAFETY: `response` is null or malloc'ed by libtpms, freed once.
        unsafe { libc::free(self.response.cast()) };
        NVRAM.with(|slot| slot.borrow_mut().take());
    }
}

fn check(rc: TpmResult) -> Result<(), TpmResult> {
    match rc {
        TPM_SUCCESS => Ok(()),
        e => Err(e),
    }
}

/// Copies a buffer libtpms `malloc`ed and frees it.
///
/// # Safety
/// `buf` is null, or points to at least `len` bytes from C `malloc` that
/// nothing else frees.
unsafe fn take_malloced(buf: *mut c_uchar, len: u32) -> Vec<u8> {
    if buf.is_null() {
        return Vec::new();
    }
    // SAFETY: the caller guarantees `len` readable bytes at `buf`.
    let data = unsafe { std::slice::from_raw_parts(buf, len as usize) }.to_vec();
    // SAFETY: the caller guarantees the buffer is ours to free, once.
    unsafe { libc::free(buf.cast()) };
    data
}

/// Runs `f` on the registered NVRAM; `TPM_FAIL` if there is none, it is
/// busy (libtpms called back while the host was using it) or `f` panicked:
/// a panic must not unwind into C.
fn with_nvram(f: impl FnOnce(&mut dyn Host) -> TpmResult) -> TpmResult {
    let run = || {
        NVRAM.with(|slot| {
            let Some(nvram) = slot.borrow().clone() else {
                return TPM_FAIL;
            };
            let Ok(mut nvram) = nvram.try_borrow_mut() else {
                return TPM_FAIL;
            };
            f(&mut *nvram)
        })
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or(TPM_FAIL)
}

/// The blob name libtpms passes, if it is valid UTF-8.
///
/// # Safety
/// `name` is null or a NUL-terminated string that outlives the call.
unsafe fn name_of<'a>(name: *const c_char) -> Option<&'a str> {
    if name.is_null() {
        return None;
    }
    // SAFETY: guaranteed by the caller.
    unsafe { CStr::from_ptr(name) }.to_str().ok()
}

extern "C" fn nvram_init() -> TpmResult {
    TPM_SUCCESS
}

extern "C" fn io_init() -> TpmResult {
    TPM_SUCCESS
}

extern "C" fn nvram_loaddata(
    data: *mut *mut c_uchar,
    length: *mut u32,
    _tpm_number: u32,
    name: *const c_char,
) -> TpmResult {
    // SAFETY: libtpms passes a NUL-terminated blob name it keeps alive.
    let Some(name) = (unsafe { name_of(name) }) else {
        return TPM_FAIL;
    };
    if data.is_null() || length.is_null() {
        return TPM_FAIL;
    }
    with_nvram(|nv| match nv.load(name) {
        Ok(None) => TPM_RETRY,
        Err(rc) => rc,
        Ok(Some(blob)) => {
            let Ok(len) = u32::try_from(blob.len()) else {
                return TPM_FAIL;
            };
            // libtpms free()s the buffer: it must come from C malloc.
            // SAFETY: malloc of a positive size; checked for null below.
            let buf = unsafe { libc::malloc(blob.len().max(1)) }.cast::<c_uchar>();
            if buf.is_null() {
                return TPM_FAIL;
            }
            // SAFETY: `buf` has room for `blob.len()` bytes and does not
            // overlap `blob`; `data` and `length` are libtpms's non-null
            // out-pointers (checked above).
            unsafe {
                std::ptr::copy_nonoverlapping(blob.as_ptr(), buf, blob.len());
                *data = buf;
                *length = len;
            }
            TPM_SUCCESS
        }
    })
}

extern "C" fn nvram_storedata(
    data: *const c_uchar,
    length: u32,
    _tpm_number: u32,
    name: *const c_char,
) -> TpmResult {
    // SAFETY: libtpms passes a NUL-terminated blob name it keeps alive.
    let Some(name) = (unsafe { name_of(name) }) else {
        return TPM_FAIL;
    };
    if data.is_null() && length != 0 {
        return TPM_FAIL;
    }
    let blob: &[u8] = match length {
        0 => &[],
        // SAFETY: libtpms passes `length` readable bytes at `data`, owned
        // by it and alive for the call; we only read them.
        n => unsafe { std::slice::from_raw_parts(data, n as usize) },
    };
    with_nvram(|nv| match nv.store(name, blob) {
        Ok(()) => TPM_SUCCESS,
        Err(rc) => rc,
    })
}

extern "C" fn nvram_deletename(
    _tpm_number: u32,
    name: *const c_char,
    must_exist: c_uchar,
) -> TpmResult {
    // SAFETY: libtpms passes a NUL-terminated blob name it keeps alive.
    let Some(name) = (unsafe { name_of(name) }) else {
        return TPM_FAIL;
    };
    with_nvram(|nv| match nv.delete(name, must_exist != 0) {
        Ok(()) => TPM_SUCCESS,
        Err(rc) => rc,
    })
}

extern "C" fn io_getlocality(locality: *mut u32, _tpm_number: u32) -> TpmResult {
    if locality.is_null() {
        return TPM_FAIL;
    }
    with_nvram(|nv| {
        // SAFETY: libtpms's non-null out-pointer (checked above).
        unsafe { *locality = u32::from(nv.locality()) };
        TPM_SUCCESS
    })
}

extern "C" fn io_getphysicalpresence(present: *mut c_uchar, _tpm_number: u32) -> TpmResult {
    if present.is_null() {
        return TPM_FAIL;
    }
    // SAFETY: libtpms's non-null out-pointer (checked above). A virtual
    // TPM has no physical presence switch, as in swtpm.
    unsafe { *present = 0 };
    TPM_SUCCESS
}
