//! From a parsed command line to a serving emulator: the image opened (or
//! made) under the writer lock, libtpms loaded, the channels bound, the
//! process daemonized and its privileges dropped, then the event loop; at
//! the end the TPM stops and the lock is released.

use crate::args::{Config, Startup};
use crate::image::{ImageHandle, HANDOVER_WAIT};
use crate::libtpms::Libtpms;
use crate::log::Log;
use crate::server::{Channels, Exit, Server};
use crate::tpm::Tpm;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use tpmstate::store::FormatOptions;
use tpmstate::{KeySource, OpenOptions, RollbackPolicy, Store, StoreError};

/// `--help`.
pub const USAGE: &str = "\
Usage: tpmstate-emu socket --tpm2 [options]

A TPM 2 emulator on libtpms, driven like `swtpm socket --tpm2`, whose state
lives in a qcow2 image: every state write is one durable commit.

--tpmstate backend-uri=qcow2://PATH[,mode=0640][,lock]
                 the image (made if missing; a blank qemu-img image is formatted)
--tpmstate dir=DIR[,mode=0640][,lock]
                 the image DIR/tpmstate.qcow2; swtpm's state files in DIR are
                 imported into a new one, then moved to DIR/swtpm-imported/
--server type=tcp,port=N[,bindaddr=A][,disconnect] | type=unixio,path=P[,mode=M] | fd=N
                 the data channel (or -p N, -f FD)
--ctrl type=tcp,port=N[,bindaddr=A] | type=unixio,path=P[,mode=M] | fd=N | clientfd=N[,terminate]
                 the control channel
--key file=K|fd=N[,format=hex|binary][,mode=aes-cbc|aes-256-cbc][,remove]
--key pwdfile=P|pwdfd=N[,kdf=pbkdf2|sha512][,remove]
                 encrypt the store (always AES-256-GCM; see docs/emulator.md)
--flags [not-need-init][,startup-clear|startup-state|startup-deactivated|startup-none]
--locality [reject-locality-4][,allow-set-locality]
--pid file=F|fd=N   --log file=F|fd=N[,level=N][,prefix=P][,truncate]
-t|--terminate   end when the data connection closes
-d|--daemon      run in the background
-r|--runas USER  drop to USER once the image and sockets are open
--print-capabilities, --version, -h|--help
";

/// `--print-capabilities`: swtpm's JSON shape, naming what works here.
pub fn capabilities_json() -> String {
    let features = [
        "tpm-2.0",
        "tpm-send-command-header",
        "flags-opt-startup",
        "cmdarg-key-fd",
        "cmdarg-pwd-fd",
        "tpmstate-opt-lock",
        "cmdarg-migration",
    ];
    serde_json::json!({
        "type": "swtpm",
        "features": features,
        "version": env!("CARGO_PKG_VERSION"),
    })
    .to_string()
}

/// Runs the emulator to its end.
pub fn run(cfg: &Config) -> Result<(), String> {
    let log = Log::open(&cfg.log)?;
    let lib = Libtpms::load().map_err(|e| crate::chain(&e))?;
    let keys = cfg.key.as_ref().map(crate::keys::load).transpose()?;
    let (key, swtpm_key) = match keys {
        Some(k) => (Some(k.store), Some(k.swtpm)),
        None => (None, None),
    };
    if let Some(dir) = cfg.swtpm_dir.as_ref().filter(|_| !cfg.incoming) {
        let (image, mode) = (&cfg.image, cfg.image_mode);
        crate::swtpm_dir::adopt(dir, image, key.clone(), swtpm_key.as_ref(), mode, &log)?;
    }
    // swtpm's form of the key served the import only.
    drop(swtpm_key);
    let migration_key = cfg
        .migration_key
        .as_ref()
        .map(crate::keys::load_migration_key)
        .transpose()?;
    let image = open_image(cfg, key, &log)?;
    log.info(&format!(
        "{}: {}, libtpms {}",
        cfg.image.display(),
        match image.view() {
            Some(v) => format!("generation {}", v.generation()),
            None => "to be claimed when the incoming migration's state arrives".into(),
        },
        lib.version()
    ));
    let data = cfg
        .server
        .as_ref()
        .map(|e| crate::channel::open(e, "--server"))
        .transpose()?;
    let ctrl = cfg
        .ctrl
        .as_ref()
        .map(|e| crate::channel::open(e, "--ctrl"))
        .transpose()?;
    let (signals, signal_writer) = UnixStream::pair().map_err(|e| format!("signal pipe: {e}"))?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let w = signal_writer
            .try_clone()
            .map_err(|e| format!("signal pipe: {e}"))?;
        signal_hook::low_level::pipe::register(sig, w)
            .map_err(|e| format!("signal handler: {e}"))?;
    }
    // The TPM starts before the process daemonizes, so that a state
    // libtpms refuses is reported to the caller, not lost with its stderr.
    let mut tpm = Tpm::new(lib, image, log.clone())?;
    if cfg.not_need_init {
        if tpm.make_writable("the start", HANDOVER_WAIT) != 0 || tpm.init(false) != 0 {
            return Err(format!(
                "the TPM in {} did not start (see the log)",
                cfg.image.display()
            ));
        }
        send_startup(&mut tpm, cfg.startup, &log);
    }
    if let Some(user) = &cfg.runas {
        drop_privileges(user)?;
    }
    if cfg.daemon {
        nix::unistd::daemon(true, false).map_err(|e| format!("--daemon: {e}"))?;
    }
    write_pid(cfg)?;
    let channels = Channels {
        data,
        ctrl,
        signals,
        migration_key,
    };
    let mut server = Server::new(tpm, log.clone(), channels, cfg);
    let exit = server.run();
    log.info(&format!("ending ({exit:?}); the state is committed"));
    let failed = server.tpm.host().failed.clone();
    {
        // What `benches/emulator.rs` reads to tell libtpms's time from the store's.
        let host = server.tpm.host();
        log.info(&format!(
            "{} state commits took {:.3} ms in the store",
            host.commits,
            host.commit_time.as_secs_f64() * 1000.0
        ));
    }
    drop(server);
    if let Some(path) = &cfg.pid_file {
        let _ = std::fs::remove_file(path);
    }
    match (exit, failed) {
        (Exit::Terminated, Some(why)) => {
            Err(format!("stopped: storing the TPM state failed: {why}"))
        }
        _ => Ok(()),
    }
}

/// Opens the image under the writer lock for the emulator's life; a
/// missing image is created, a blank one formatted. A restart after a
/// crash serves the last complete commit (a torn newer one is the crash's).
fn open_image(cfg: &Config, key: Option<KeySource>, log: &Log) -> Result<ImageHandle, String> {
    let path = &cfg.image;
    let fmt = || FormatOptions {
        key: key.clone(),
        ..Default::default()
    };
    if std::fs::symlink_metadata(path).is_err() {
        Store::create(path, Default::default(), fmt()).map_err(|e| crate::chain(&e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(cfg.image_mode))
            .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    }
    if cfg.incoming {
        // Nothing is locked or read until the migration's state arrives (a
        // blank image of the target's own is formatted then, in the claim).
        return Ok(ImageHandle::incoming(path, key, log.clone()));
    }
    let opts = OpenOptions {
        key: key.clone(),
        rollback: RollbackPolicy::AcceptTorn,
        ..Default::default()
    };
    let store = match Store::open(path, opts.clone()) {
        Err(StoreError::NotAStore {
            first_data: None, ..
        }) => {
            Store::format(path, fmt()).map_err(|e| crate::chain(&e))?;
            Store::open(path, opts)
        }
        other => other,
    }
    .map_err(|e| match e {
        StoreError::KeyMissing { .. } => {
            format!("{} (give its key with --key)", crate::chain(&e))
        }
        e => crate::chain(&e),
    })?;
    if store.has_held_state() && !store.contains("permall") {
        return Err(format!(
            "{} has held TPM state, but its permall blob is gone: refusing to make a new TPM \
             (a new identity) over it; restore the image, or delete its blobs with `tpmstate` first",
            path.display()
        ));
    }
    Ok(ImageHandle::writer(store, key, log.clone()))
}

fn drop_privileges(user: &str) -> Result<(), String> {
    use nix::unistd::{setgid, setgroups, setuid, User};
    let u = User::from_name(user)
        .map_err(|e| format!("--runas {user}: {e}"))?
        .ok_or_else(|| format!("--runas: no user named {user}"))?;
    setgroups(&[u.gid]).map_err(|e| format!("--runas {user}: setgroups: {e}"))?;
    setgid(u.gid).map_err(|e| format!("--runas {user}: setgid: {e}"))?;
    setuid(u.uid).map_err(|e| format!("--runas {user}: setuid: {e}"))
}

fn write_pid(cfg: &Config) -> Result<(), String> {
    let pid = format!("{}", std::process::id());
    if let Some(path) = &cfg.pid_file {
        std::fs::write(path, &pid)
            .map_err(|e| format!("--pid: writing {}: {e}", path.display()))?;
    }
    if let Some(fd) = cfg.pid_fd {
        let fd = crate::fds::take(fd).map_err(|e| format!("--pid: {e}"))?;
        std::fs::File::from(fd)
            .write_all(pid.as_bytes())
            .map_err(|e| format!("--pid fd: {e}"))?;
    }
    Ok(())
}

/// `--flags startup-clear|startup-state`: the TPM2_Startup swtpm sends itself.
fn send_startup(tpm: &mut Tpm, startup: Option<Startup>, log: &Log) {
    let su: u16 = match startup {
        Some(Startup::Clear) => 0,
        Some(Startup::State) => 1,
        None => return,
    };
    let mut cmd = vec![0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44];
    cmd.extend_from_slice(&su.to_be_bytes());
    let resp = tpm.process(&cmd, 0);
    let rc = resp
        .get(6..10)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    if rc != Some(0) {
        log.error(&format!("TPM2_Startup at start answered {rc:x?}"));
    }
}
