//! The emulator's sockets: listeners for the data and control channels, and
//! the one connection each serves at a time (as swtpm: a second client
//! waits in the backlog until the first leaves).

use crate::args::Endpoint;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a client may take to send the rest of a message it started:
/// the emulator serves one message at a time, so a slow sender must not
/// hold the others (or a SIGTERM) for longer.
pub const MESSAGE_DEADLINE: Duration = Duration::from_secs(1);
/// How long a client may leave an answer unread before it is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A listening socket.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A unix socket; `path` is removed when the emulator ends (None: inherited).
    Unix(UnixListener, Option<PathBuf>),
}

/// A connected client.
pub enum Conn {
    /// TCP.
    Tcp(TcpStream),
    /// A unix socket (also QEMU's SET_DATAFD socket).
    Unix(UnixStream),
}

/// What an endpoint opens to.
pub enum Opened {
    /// A listener, to accept clients from.
    Listening(Listener),
    /// A client connection handed over already.
    Connected(Conn),
}

/// Opens `endpoint` (binding a listener, or taking an inherited descriptor).
pub fn open(endpoint: &Endpoint, what: &str) -> Result<Opened, String> {
    match endpoint {
        Endpoint::Tcp { addr, port } => TcpListener::bind((*addr, *port))
            .map(|l| Opened::Listening(Listener::Tcp(l)))
            .map_err(|e| format!("{what}: cannot listen on {addr} port {port}: {e}")),
        Endpoint::Unix {
            path,
            mode,
            uid,
            gid,
        } => {
            use std::os::unix::fs::FileTypeExt;
            // A stale socket from an earlier run is replaced; anything else
            // at the path is left alone.
            if let Ok(m) = std::fs::symlink_metadata(path) {
                if !m.file_type().is_socket() {
                    return Err(format!(
                        "{what}: {} exists and is not a socket",
                        path.display()
                    ));
                }
            }
            // The socket appears at `path` only once it listens, with its
            // mode and owner set: a caller that waits for the file (QEMU's,
            // libvirt) can neither connect too early nor see it writable.
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            let listening = (|| {
                let l = UnixListener::bind(&tmp)
                    .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
                if let Some(mode) = mode {
                    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(*mode))
                        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
                }
                if uid.is_some() || gid.is_some() {
                    nix::unistd::chown(&tmp, uid.map(Into::into), gid.map(Into::into))
                        .map_err(|e| format!("chown {}: {e}", path.display()))?;
                }
                std::fs::rename(&tmp, path)
                    .map_err(|e| format!("rename to {}: {e}", path.display()))?;
                Ok::<_, String>(l)
            })();
            let _ = std::fs::remove_file(&tmp);
            let l = listening.map_err(|e| format!("{what}: {e}"))?;
            Ok(Opened::Listening(Listener::Unix(l, Some(path.clone()))))
        }
        Endpoint::ListenFd(fd) => {
            let fd = crate::fds::take(*fd).map_err(|e| format!("{what}: {e}"))?;
            listener_from_fd(fd)
                .map(Opened::Listening)
                .map_err(|e| format!("{what}: {e}"))
        }
        Endpoint::ClientFd(fd) => {
            let owned = crate::fds::take(*fd).map_err(|e| format!("{what}: {e}"))?;
            let conn = Conn::Unix(UnixStream::from(owned)).with_write_timeout();
            conn.map(Opened::Connected)
                .map_err(|e| format!("{what}: fd {fd} is not a socket ({e})"))
        }
    }
}

fn listener_from_fd(fd: OwnedFd) -> Result<Listener, String> {
    use nix::sys::socket::{
        getsockname, getsockopt, sockopt, AddressFamily, SockaddrLike, SockaddrStorage,
    };
    let addr: SockaddrStorage = getsockname(fd.as_raw_fd())
        .map_err(|e| format!("fd {} is not a socket ({e})", fd.as_raw_fd()))?;
    if !getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false) {
        return Err(format!("fd {} is not a listening socket", fd.as_raw_fd()));
    }
    match addr.family() {
        Some(AddressFamily::Unix) => Ok(Listener::Unix(UnixListener::from(fd), None)),
        Some(AddressFamily::Inet) | Some(AddressFamily::Inet6) => {
            Ok(Listener::Tcp(TcpListener::from(fd)))
        }
        other => Err(format!(
            "fd {} is a socket of an unsupported family ({other:?})",
            fd.as_raw_fd()
        )),
    }
}

impl Listener {
    /// Accepts one client.
    pub fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                // TPM commands are small request/response pairs.
                s.set_nodelay(true)?;
                Conn::Tcp(s).with_write_timeout()
            }
            Listener::Unix(l, _) => Conn::Unix(l.accept()?.0).with_write_timeout(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, Some(path)) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::Tcp(s) => s.as_fd(),
            Conn::Unix(s) => s.as_fd(),
        }
    }
}

impl Conn {
    /// Reads what has arrived (at most `buf.len()` bytes), with the
    /// descriptors passed along (SCM_RIGHTS, unix sockets only). 0 bytes:
    /// the peer closed.
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        match self {
            Conn::Tcp(s) => s.read(buf).map(|n| (n, Vec::new())),
            Conn::Unix(s) => crate::fds::recv_with_fds(s.as_raw_fd(), buf),
        }
    }

    /// Reads exactly `buf.len()` more bytes of a message begun at
    /// `started`, all of them within [`MESSAGE_DEADLINE`] of it.
    pub fn read_rest(&mut self, buf: &mut [u8], started: Instant) -> io::Result<()> {
        let deadline = started + MESSAGE_DEADLINE;
        let mut at = 0;
        let mut result = Ok(());
        while at < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                result = Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "message not complete in time",
                ));
                break;
            }
            if let Err(e) = self.set_read_timeout(Some(left)) {
                result = Err(e);
                break;
            }
            let n = match self {
                Conn::Tcp(s) => s.read(&mut buf[at..]),
                Conn::Unix(s) => s.read(&mut buf[at..]),
            };
            match n {
                Ok(0) => {
                    result = Err(io::ErrorKind::UnexpectedEof.into());
                    break;
                }
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.set_read_timeout(None)?;
        result
    }

    /// A connection whose answers may wait at most [`WRITE_TIMEOUT`] for
    /// the peer to read them.
    pub fn with_write_timeout(self) -> io::Result<Conn> {
        match &self {
            Conn::Tcp(s) => s.set_write_timeout(Some(WRITE_TIMEOUT))?,
            Conn::Unix(s) => s.set_write_timeout(Some(WRITE_TIMEOUT))?,
        }
        Ok(self)
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Writes a whole response.
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.write_all(data),
            Conn::Unix(s) => s.write_all(data),
        }
    }
}
