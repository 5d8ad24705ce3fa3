//! `tpmstate lock IMAGE -- CMD`: runs CMD while holding the image locked,
//! as `flock(1)` does for a lock file. Signals another process sends to
//! tpmstate (SIGTERM, SIGINT, SIGHUP) go on to CMD, and the lock is held
//! until CMD has exited: a service manager stopping the wrapper must not
//! free the image under a command still writing it. Signals the kernel
//! sends (the terminal's ^C, a hang-up) already reach CMD, which is in the
//! same process group, and are not forwarded. A signal another process
//! sends to the whole group (`kill -- -PGID`, systemd's control-group kill)
//! reaches CMD directly and once more through tpmstate: its sender cannot
//! be told from one aimed at tpmstate alone.

use super::commands::{usage, warn_lock, Failure};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::iterator::SignalsInfo;
use signal_hook::low_level::siginfo::Cause;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tpmstate::{LockMode, Locking};

/// Exit status of `tpmstate lock` when tpmstate itself fails (bad
/// arguments, the image cannot be opened or locked), as `timeout(1)` and
/// `env(1)` use 125: CMD's own statuses pass through unchanged, so a script
/// tells the two apart. The message on standard error names the cause.
pub const OWN_FAILURE: u8 = 125;
/// CMD was found but could not be run, as a shell says.
const CANNOT_RUN: u8 = 126;
/// CMD was not found, as a shell says.
const NOT_FOUND: u8 = 127;

/// Holds `mode` on `image` while `command` runs; returns its exit status
/// (128 + the signal that ended it, like a shell).
pub fn run(
    image: &Path,
    mode: LockMode,
    timeout: Option<Duration>,
    command: &[String],
    locking: Locking,
) -> Result<u8, Failure> {
    let (prog, args) = command
        .split_first()
        .ok_or_else(|| usage("no command given".into()))?;
    let (lock, warning) =
        tpmstate::lock::ImageLock::open(image, mode >= LockMode::Writer, locking)?;
    warn_lock(warning.as_deref());
    let _guard = lock.acquire(mode, timeout)?;
    // Handlers first: from here on a SIGTERM cannot end tpmstate (and so
    // free the lock) before the child it would be forwarded to exists.
    let child_pid = Arc::new(OnceLock::new());
    let mut signals = SignalsInfo::<WithOrigin>::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| super::commands::io(Path::new("signal handlers"), e))?;
    let handle = signals.handle();
    let forward_to = child_pid.clone();
    let forwarder = std::thread::spawn(move || {
        for origin in signals.forever() {
            if !matches!(origin.cause, Cause::Sent(_)) {
                continue;
            }
            if let Ok(sig) = Signal::try_from(origin.signal) {
                let _ = kill(Pid::from_raw(*forward_to.wait()), sig);
            }
        }
    });
    let mut child = match std::process::Command::new(prog).args(args).spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("tpmstate: {prog}: {e}");
            handle.close();
            return Ok(match e.kind() {
                std::io::ErrorKind::NotFound => NOT_FOUND,
                _ => CANNOT_RUN,
            });
        }
    };
    let pid = Pid::from_raw(child.id() as i32);
    let _ = child_pid.set(pid.as_raw());
    // Wait for CMD to end without reaping it, then stop forwarding, then
    // reap: no forward can reach its pid once another process may reuse it.
    let ended = waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT);
    handle.close();
    let _ = forwarder.join();
    ended.map_err(|e| super::commands::io(Path::new(prog), e.into()))?;
    let status = child
        .wait()
        .map_err(|e| super::commands::io(Path::new(prog), e))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)) as u8)
}
