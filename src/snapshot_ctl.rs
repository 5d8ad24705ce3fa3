//! Online snapshots: how `tpmstate snapshot` reaches the emulator that holds
//! an image's lock (and so keeps `qemu-img snapshot` and the CLI out).
//!
//! The emulator listens on an abstract Unix socket named after the image
//! file's device and inode and its own process id,
//! `tpmstate-snapshot/<dev>/<inode>/<pid>`: nothing is left in the file
//! system, and the name dies with the process. The CLI finds it from the
//! image path: it looks up which processes hold the image's lock bytes
//! (`crate::lock::holders_of`) and connects to each one's name, and takes
//! an answer only from a peer whose process id (from the kernel, not the
//! name) is the one that holds the lock, so a process that merely took the
//! name cannot answer for the image. Each connection carries one JSON
//! request and one JSON reply. The emulator serves it between two TPM
//! commands, so a snapshot always holds a committed generation, and waits
//! at most half a second for a request. Only the emulator's own user and
//! root are served (the peer's credentials are checked), since an abstract
//! socket has no file permissions.

use crate::image::SnapshotEntry;
use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest request or reply read.
const MAX_MESSAGE: u64 = 1 << 20;
/// How long the CLI waits for the emulator's reply.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// How long the emulator waits for a request or for its reply to be taken:
/// it serves TPM commands on the same thread, so a client that connects
/// and says nothing may hold the TPM up for no longer than this. The CLI
/// sends its request as soon as it connects.
const SERVE_TIMEOUT: Duration = Duration::from_millis(500);

/// What the CLI asks of the emulator.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// The image's snapshots.
    List,
    /// Take a snapshot now.
    Create {
        /// Its name.
        name: String,
    },
    /// Delete one.
    Delete {
        /// Its name or ID.
        name: String,
    },
    /// Apply one (always refused by a running emulator: the VM must be off).
    Apply {
        /// Its name or ID.
        name: String,
    },
}

/// The emulator's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    /// The CLI exit code the outcome maps to (0: done).
    pub exit: u8,
    /// What happened, for people.
    pub message: String,
    /// The image's snapshots, for a list.
    pub snapshots: Vec<SnapshotSummary>,
}

/// One snapshot, as listed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotSummary {
    /// QEMU's numeric ID.
    pub id: String,
    /// The name.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Bytes of saved VM state (0 for a disk-only snapshot).
    pub vm_state_size: u64,
}

impl From<&SnapshotEntry> for SnapshotSummary {
    fn from(s: &SnapshotEntry) -> Self {
        SnapshotSummary {
            id: s.id.clone(),
            name: s.name.clone(),
            date_sec: s.date_sec,
            vm_state_size: s.vm_state_size,
        }
    }
}

/// Why the emulator could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// A system call failed.
    #[error("{}: snapshot socket: {op} failed", path.display())]
    Io {
        /// The image.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The other side sent something that is not a message.
    #[error("{}: snapshot socket: {reason}", path.display())]
    Protocol {
        /// The image.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

impl CtlError {
    /// The broad class of this error.
    pub fn kind(&self) -> crate::ErrorKind {
        crate::ErrorKind::Io
    }
}

/// A maker of [`CtlError::Io`] for `op` on the image at `image`.
fn io_error<'a>(image: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> CtlError + 'a {
    move |source| CtlError::Io {
        path: image.to_path_buf(),
        op,
        source,
    }
}

/// The socket address process `pid` listens on for the image at `image`.
fn address(image: &Path, pid: u32) -> std::io::Result<SocketAddr> {
    let m = std::fs::metadata(image)?;
    let name = format!("tpmstate-snapshot/{:x}/{}/{pid}", m.dev(), m.ino());
    SocketAddr::from_abstract_name(name.as_bytes())
}

/// Listens for snapshot requests on the image at `image` (non-blocking, for
/// a poll loop). Fails with `AddrInUse` if the name is taken.
pub fn listen(image: &Path) -> std::io::Result<UnixListener> {
    let listener = UnixListener::bind_addr(&address(image, std::process::id())?)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Asks the process that holds the image at `image` and listens for it;
/// `Ok(None)` when no holder listens.
pub fn ask(image: &Path, request: &Request) -> Result<Option<Reply>, CtlError> {
    let io = |op| io_error(image, op);
    let mut pids: Vec<u32> = crate::lock::holders_of(image)
        .map_err(|e| CtlError::Protocol {
            path: image.to_path_buf(),
            reason: format!(
                "cannot tell who holds the image: {}",
                crate::kind::chain(&e)
            ),
        })?
        .iter()
        .filter_map(|h| u32::try_from(h.pid).ok())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    for pid in pids {
        let addr = address(image, pid).map_err(io("stat"))?;
        match UnixStream::connect_addr(&addr) {
            Ok(conn) => return exchange(image, conn, pid, request).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(io("connect")(e)),
        }
    }
    Ok(None)
}

/// Sends `request` to lock holder `pid` over `conn` and reads its reply,
/// once the kernel confirms the peer is that process.
fn exchange(
    image: &Path,
    mut conn: UnixStream,
    pid: u32,
    request: &Request,
) -> Result<Reply, CtlError> {
    let io = |op| io_error(image, op);
    let peer = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| io("getsockopt")(e.into()))?;
    if u32::try_from(peer.pid()).ok() != Some(pid) {
        return Err(CtlError::Protocol {
            path: image.to_path_buf(),
            reason: format!(
                "process {} answers in the name of process {pid}, which holds the image: \
                 its answer is not taken",
                peer.pid()
            ),
        });
    }
    let bytes = serde_json::to_vec(request).map_err(|e| CtlError::Protocol {
        path: image.to_path_buf(),
        reason: e.to_string(),
    })?;
    conn.write_all(&bytes).map_err(io("send"))?;
    conn.shutdown(std::net::Shutdown::Write)
        .map_err(io("shutdown"))?;
    let reply = read_message(&mut conn, TIMEOUT).map_err(io("receive"))?;
    serde_json::from_slice(&reply).map_err(|e| CtlError::Protocol {
        path: image.to_path_buf(),
        reason: format!("the emulator's reply is not understood: {e}"),
    })
}

/// What serving one connection came to.
#[derive(Debug)]
pub enum Served {
    /// No connection was waiting.
    Nothing,
    /// A request was answered.
    Answered,
    /// The connection failed: the client said nothing in time, closed
    /// early, or did not take the reply. The listener is fine.
    Failed(std::io::Error),
}

/// Serves one connection waiting on `listener`: checks the peer is this
/// process's user or root, reads its request, and sends what `handle`
/// answers. `Err`: accepting failed (the listener's trouble).
pub fn serve_one(
    listener: &UnixListener,
    handle: impl FnOnce(Request) -> Reply,
) -> std::io::Result<Served> {
    let conn = match listener.accept() {
        Ok((c, _)) => c,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Served::Nothing),
        Err(e) => return Err(e),
    };
    Ok(match answer(conn, handle) {
        Ok(()) => Served::Answered,
        Err(e) => Served::Failed(e),
    })
}

/// Reads the request on `conn` and sends what `handle` answers.
fn answer(mut conn: UnixStream, handle: impl FnOnce(Request) -> Reply) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_write_timeout(Some(SERVE_TIMEOUT))?;
    let creds = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)?;
    let reply = if creds.uid() != 0 && creds.uid() != nix::unistd::geteuid().as_raw() {
        Reply {
            exit: crate::ErrorKind::Usage.exit_code(),
            message: "permission denied: only the emulator's user or root may ask".into(),
            snapshots: Vec::new(),
        }
    } else {
        match serde_json::from_slice(&read_message(&mut conn, SERVE_TIMEOUT)?) {
            Ok(request) => handle(request),
            Err(e) => Reply {
                exit: crate::ErrorKind::Usage.exit_code(),
                message: format!("request not understood: {e}"),
                snapshots: Vec::new(),
            },
        }
    };
    let bytes = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    conn.write_all(&bytes)
}

/// Reads until the other side shuts its end (at most [`MAX_MESSAGE`]
/// bytes), within `within` in all.
fn read_message(conn: &mut UnixStream, within: Duration) -> std::io::Result<Vec<u8>> {
    let deadline = std::time::Instant::now() + within;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || buf.len() as u64 > MAX_MESSAGE {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        conn.set_read_timeout(Some(left))?;
        match conn.read(&mut chunk) {
            Ok(0) => return Ok(buf),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // A socket read that times out reports EAGAIN.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::ErrorKind::TimedOut.into())
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_reaches_the_listener_for_the_same_file_and_its_reply_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("i");
        std::fs::write(&image, b"x").unwrap();
        let listener = listen(&image).unwrap();
        assert!(
            listen(&image).is_err(),
            "one listener per image and process"
        );
        // The asker only talks to a holder of the image's lock.
        let (lock, _) = crate::lock::ImageLock::open(&image, false, crate::Locking::Auto).unwrap();
        let _held = lock.acquire(crate::LockMode::Shared, None).unwrap();
        let asker = {
            let image = image.clone();
            std::thread::spawn(move || {
                ask(
                    &image,
                    &Request::Create {
                        name: "a\nb\"c".into(),
                    },
                )
            })
        };
        loop {
            let served = serve_one(&listener, |r| Reply {
                exit: 0,
                message: format!("{r:?}"),
                snapshots: Vec::new(),
            })
            .unwrap();
            if let Served::Answered = served {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let reply = asker.join().unwrap().unwrap().unwrap();
        assert_eq!(reply.message, r#"Create { name: "a\nb\"c" }"#);
        drop(listener);
        let other = dir.path().join("other");
        std::fs::write(&other, b"y").unwrap();
        assert!(ask(&other, &Request::List).unwrap().is_none());
    }

    #[test]
    fn a_client_that_says_nothing_holds_the_server_for_half_a_second_at_most() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("i");
        std::fs::write(&image, b"x").unwrap();
        let listener = listen(&image).unwrap();
        let _silent =
            UnixStream::connect_addr(&address(&image, std::process::id()).unwrap()).unwrap();
        let started = std::time::Instant::now();
        let served = serve_one(&listener, |_| Reply::default()).unwrap();
        match served {
            Served::Failed(e) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut),
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
