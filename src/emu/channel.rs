//! The emulator's sockets: listeners for the data and control channels, and
//! the one connection each serves at a time (as swtpm: a second client
//! waits in the backlog until the first leaves).

use crate::args::Endpoint;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// How long a client may take to send the rest of a message it started.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

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
            // A stale socket from an earlier run would make bind fail;
            // anything else at the path is left alone (bind then says so).
            if std::fs::symlink_metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                let _ = std::fs::remove_file(path);
            }
            let l = UnixListener::bind(path)
                .map_err(|e| format!("{what}: cannot listen on {}: {e}", path.display()))?;
            if let Some(mode) = mode {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))
                    .map_err(|e| format!("{what}: chmod {}: {e}", path.display()))?;
            }
            if uid.is_some() || gid.is_some() {
                nix::unistd::chown(path, uid.map(Into::into), gid.map(Into::into))
                    .map_err(|e| format!("{what}: chown {}: {e}", path.display()))?;
            }
            Ok(Opened::Listening(Listener::Unix(l, Some(path.clone()))))
        }
        Endpoint::ListenFd(fd) => {
            let fd = crate::fds::take(*fd).map_err(|e| format!("{what}: {e}"))?;
            listener_from_fd(fd)
                .map(Opened::Listening)
                .map_err(|e| format!("{what}: {e}"))
        }
        Endpoint::ClientFd(fd) => {
            let fd = crate::fds::take(*fd).map_err(|e| format!("{what}: {e}"))?;
            Ok(Opened::Connected(Conn::Unix(UnixStream::from(fd))))
        }
    }
}

fn listener_from_fd(fd: OwnedFd) -> Result<Listener, String> {
    use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};
    let addr: SockaddrStorage = getsockname(fd.as_raw_fd())
        .map_err(|e| format!("fd {} is not a socket ({e})", fd.as_raw_fd()))?;
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
                Ok(Conn::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Conn::Unix(l.accept()?.0)),
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
            Conn::Unix(s) => recv_with_fds(s.as_raw_fd(), buf),
        }
    }

    /// Reads exactly `buf.len()` more bytes of a message already started,
    /// waiting at most [`MESSAGE_TIMEOUT`] for each part.
    pub fn read_rest(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.set_read_timeout(Some(MESSAGE_TIMEOUT))?;
        let result = match self {
            Conn::Tcp(s) => s.read_exact(buf),
            Conn::Unix(s) => s.read_exact(buf),
        };
        self.set_read_timeout(None)?;
        result
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

fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            fds.extend(received.into_iter().map(crate::fds::take_received));
        }
    }
    Ok((msg.bytes, fds))
}
