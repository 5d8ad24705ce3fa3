//! The event loop: one thread polls the signal pipe, the listeners and the
//! two connections, and runs every TPM call itself (libtpms is a
//! single-threaded singleton). A command is processed, its state committed
//! and only then answered, so an answered command is durable.

use crate::channel::{Conn, Listener, Opened};
use crate::control;
use crate::image::HANDOVER_WAIT;
use crate::log::Log;
use crate::snapshots::SnapshotSocket;
use crate::tpm::Tpm;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;
use tpmstate::swtpm::ctrl;
use tpmstate::swtpm::key::SwtpmKey;

/// `TPM_SEND_COMMAND`: the optional header before a data-channel command.
const SEND_COMMAND: u32 = 8;
/// The first read of a command: the largest one libtpms takes (4096
/// bytes) behind a send-command header.
const FIRST_READ: usize = 4096 + 9;

/// Why the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// CMD_SHUTDOWN.
    Shutdown,
    /// SIGTERM or SIGINT.
    Signal,
    /// A connection closed under `--terminate` (or `--ctrl ...,terminate`).
    Terminated,
}

/// The emulator's channels and its TPM.
pub struct Server {
    /// The TPM.
    pub tpm: Tpm,
    /// The log.
    pub log: Log,
    data_listener: Option<Listener>,
    data: Option<Conn>,
    ctrl_listener: Option<Listener>,
    ctrl: Option<Conn>,
    signals: UnixStream,
    /// `--terminate`.
    terminate: bool,
    /// `--ctrl ...,terminate`.
    ctrl_terminate: bool,
    /// `--server ...,disconnect`.
    disconnect: bool,
    /// `--locality reject-locality-4`.
    pub reject_locality_4: bool,
    /// `--locality allow-set-locality`.
    allow_set_locality: bool,
    /// `--migration release-lock-outgoing`.
    pub release_lock_outgoing: bool,
    /// `--migration-key`: state blobs on the control channel are encrypted.
    pub migration_key: Option<SwtpmKey>,
    /// Locality set by SET_LOCALITY or the last send-command header.
    pub locality: u8,
    /// Bytes received beyond the command being served.
    data_pending: Vec<u8>,
    /// When the control message being served began to arrive.
    ctrl_started: Instant,
    /// The data channel is a connection handed over (`--server fd=`): its
    /// end is the emulator's, as in swtpm.
    data_fd_ends: bool,
    /// Where `tpmstate snapshot` reaches this emulator.
    snapshots: SnapshotSocket,
}

/// What the server is built from.
pub struct Channels {
    /// The data channel, if any.
    pub data: Option<Opened>,
    /// The control channel, if any.
    pub ctrl: Option<Opened>,
    /// The read end of the signal pipe.
    pub signals: UnixStream,
    /// The migration key, loaded.
    pub migration_key: Option<SwtpmKey>,
}

impl Server {
    /// A server over opened channels.
    pub fn new(tpm: Tpm, log: Log, ch: Channels, cfg: &crate::args::Config) -> Server {
        let split = |o: Option<Opened>| match o {
            None => (None, None),
            Some(Opened::Listening(l)) => (Some(l), None),
            Some(Opened::Connected(c)) => (None, Some(c)),
        };
        let data_fd_ends = matches!(ch.data, Some(Opened::Connected(_)));
        let migration_key = ch.migration_key;
        let (data_listener, data) = split(ch.data);
        let (ctrl_listener, ctrl) = split(ch.ctrl);
        Server {
            tpm,
            log,
            data_listener,
            data,
            ctrl_listener,
            ctrl,
            signals: ch.signals,
            terminate: cfg.terminate,
            ctrl_terminate: cfg.ctrl_terminate,
            disconnect: cfg.disconnect,
            reject_locality_4: cfg.reject_locality_4,
            allow_set_locality: cfg.allow_set_locality,
            release_lock_outgoing: cfg.release_lock_outgoing,
            migration_key,
            locality: 0,
            data_pending: Vec::new(),
            data_fd_ends,
            ctrl_started: Instant::now(),
            snapshots: SnapshotSocket::default(),
        }
    }

    /// Serves until SHUTDOWN, a signal, or a closed connection under `--terminate`.
    pub fn run(&mut self) -> Exit {
        loop {
            match self.poll_once() {
                Ok(None) => {}
                Ok(Some(exit)) => return exit,
                Err(e) => {
                    self.log.error(&format!("waiting for clients: {e}"));
                    return Exit::Signal;
                }
            }
        }
    }

    /// Takes the data connection QEMU passed with SET_DATAFD.
    pub fn set_data_conn(&mut self, conn: Conn) {
        self.data = Some(conn);
    }

    fn poll_once(&mut self) -> Result<Option<Exit>, nix::Error> {
        if !self.data_pending.is_empty() && self.data.is_some() {
            return Ok(self.serve_data());
        }
        #[derive(Clone, Copy)]
        enum Src {
            Signal,
            DataListener,
            Data,
            CtrlListener,
            Ctrl,
            Snapshots,
        }
        self.snapshots.follow(self.tpm.host().image(), &self.log);
        let mut srcs = vec![Src::Signal];
        let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
        let mut add = |fd, src| {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
            srcs.push(src);
        };
        match (&self.data, &self.data_listener) {
            (Some(c), _) => add(c.as_fd(), Src::Data),
            (None, Some(l)) => add(l.as_fd(), Src::DataListener),
            (None, None) => {}
        }
        match (&self.ctrl, &self.ctrl_listener) {
            (Some(c), _) => add(c.as_fd(), Src::Ctrl),
            (None, Some(l)) => add(l.as_fd(), Src::CtrlListener),
            (None, None) => {}
        }
        if let Some(fd) = self.snapshots.fd() {
            add(fd, Src::Snapshots);
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::Error::EINTR) => return Ok(None),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        let ready: Vec<Src> = fds
            .iter()
            .zip(&srcs)
            .filter(|(f, _)| f.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, s)| *s)
            .collect();
        drop(fds);
        for src in ready {
            let exit = match src {
                Src::Signal => Some(Exit::Signal),
                Src::DataListener => {
                    self.data = self.accept(true);
                    None
                }
                Src::CtrlListener => {
                    self.ctrl = self.accept(false);
                    None
                }
                Src::Data => self.serve_data(),
                Src::Ctrl => self.serve_ctrl(),
                Src::Snapshots => {
                    let log = self.log.clone();
                    self.snapshots.serve(self.tpm.host().image(), &log);
                    self.check_failed()
                }
            };
            if exit.is_some() {
                return Ok(exit);
            }
        }
        Ok(None)
    }

    fn accept(&mut self, data: bool) -> Option<Conn> {
        let l = match data {
            true => self.data_listener.as_ref(),
            false => self.ctrl_listener.as_ref(),
        }?;
        match l.accept() {
            Ok(c) => Some(c),
            Err(e) => {
                self.log.error(&format!("accepting a client: {e}"));
                // Out of descriptors, say: do not spin on the listener.
                std::thread::sleep(std::time::Duration::from_millis(50));
                None
            }
        }
    }

    /// Reads one TPM command: its bytes and, when it came with the
    /// send-command header, the header's locality. One read serves a
    /// whole command in the common case; a command split across reads is
    /// completed, and bytes beyond it are kept for the next one.
    fn read_command(&mut self) -> Result<(Vec<u8>, Option<u8>), String> {
        let conn = self.data.as_mut().ok_or("no data connection")?;
        let mut buf = std::mem::take(&mut self.data_pending);
        let started = Instant::now();
        if buf.is_empty() {
            buf.resize(FIRST_READ, 0);
            let n = match conn.recv(&mut buf) {
                Ok((0, _)) | Err(_) => return Err(String::new()),
                Ok((n, _)) => n,
            };
            buf.truncate(n);
        }
        let mut fill = |buf: &mut Vec<u8>, to: usize| {
            let have = buf.len();
            if have < to {
                buf.resize(to, 0);
                conn.read_rest(&mut buf[have..], started)
                    .map_err(|_| String::new())?;
            }
            Ok::<(), String>(())
        };
        fill(&mut buf, 10)?;
        let be32 = |at: usize| {
            u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize
        };
        let (start, locality) = match be32(0) as u32 {
            SEND_COMMAND => (9, Some(buf[4])),
            _ => (0, None),
        };
        let size = match locality {
            Some(_) => be32(5),
            None => be32(2),
        };
        if !(10..=crate::tpm::MAX_COMMAND).contains(&size) {
            return Err(format!("a TPM command of {size} bytes"));
        }
        fill(&mut buf, start + size)?;
        self.data_pending = buf.split_off(start + size);
        buf.drain(..start);
        Ok((buf, locality))
    }

    /// Runs one TPM command from the data channel and answers it.
    fn serve_data(&mut self) -> Option<Exit> {
        let (command, header_locality) = match self.read_command() {
            Ok(c) => c,
            Err(why) if why.is_empty() => return self.data_closed(),
            Err(why) => return self.drop_data(&why),
        };
        let framed = header_locality.is_some();
        if let Some(l) = header_locality {
            // The header's locality holds for later commands too (as swtpm).
            self.locality = l;
        }
        let locality = self.locality;
        if let Some(cc) = command.get(6..10) {
            let cc = u32::from_be_bytes([cc[0], cc[1], cc[2], cc[3]]);
            self.log.debug(&format!(
                "TPM command 0x{cc:x} ({} bytes, locality {locality})",
                command.len()
            ));
        }
        let response = match command.get(6..10) {
            Some(&[0x20, 0x00, 0x10, 0x00]) => self.set_locality_command(&command),
            // A handed-over image is taken back (a migration target's
            // claimed) before a command that reaches the TPM and may write.
            // A stopped TPM answers without touching state: QEMU's probe at
            // start claims nothing.
            _ if self.tpm.running()
                && self.tpm.make_writable("a TPM command", HANDOVER_WAIT) != 0 =>
            {
                crate::tpm::failure_response()
            }
            _ => self.tpm.process(&command, locality),
        };
        let mut out = Vec::with_capacity(response.len() + 8);
        if framed {
            out.extend_from_slice(&(response.len() as u32).to_be_bytes());
        }
        out.extend_from_slice(&response);
        if framed {
            out.extend_from_slice(&0u32.to_be_bytes());
        }
        let conn = self.data.as_mut()?;
        if conn.send(&out).is_err() {
            return self.data_closed();
        }
        if let Some(exit) = self.check_failed() {
            return Some(exit);
        }
        match self.disconnect {
            // A handed-over connection's end is the emulator's.
            true if self.data_fd_ends => self.data_closed(),
            true => {
                self.data = None;
                self.data_pending.clear();
                None
            }
            false => None,
        }
    }

    /// TPM2_SetLocality (vendor command 0x20001000), which swtpm answers
    /// itself when started with `--locality allow-set-locality`.
    fn set_locality_command(&mut self, command: &[u8]) -> Vec<u8> {
        if !self.allow_set_locality {
            return crate::tpm::failure_response();
        }
        match command.get(10) {
            None => crate::tpm::error_response(0x9a),
            Some(&l) if l > 4 || (l == 4 && self.reject_locality_4) => {
                crate::tpm::locality_response()
            }
            Some(&l) => {
                self.locality = l;
                crate::tpm::error_response(0)
            }
        }
    }

    fn drop_data(&mut self, why: &str) -> Option<Exit> {
        self.log
            .error(&format!("data channel: {why}; closing the connection"));
        self.data_closed()
    }

    fn data_closed(&mut self) -> Option<Exit> {
        self.data = None;
        self.data_pending.clear();
        (self.terminate || self.data_fd_ends).then_some(Exit::Terminated)
    }

    /// A failed store write leaves the TPM's memory ahead of its image:
    /// the emulator must not go on answering as if it had persisted.
    fn check_failed(&mut self) -> Option<Exit> {
        let failed = self.tpm.host().failed.clone()?;
        self.log.error(&format!(
            "stopping: the TPM state could not be stored ({failed}); the image keeps the last state stored"
        ));
        Some(Exit::Terminated)
    }

    /// Reads one control message and answers it.
    fn serve_ctrl(&mut self) -> Option<Exit> {
        self.ctrl_started = Instant::now();
        let conn = self.ctrl.as_mut()?;
        let mut buf = vec![0u8; control::MAX_MESSAGE];
        let (n, fds) = match conn.recv(&mut buf) {
            Ok((0, _)) | Err(_) => return self.ctrl_closed(),
            Ok(r) => r,
        };
        buf.truncate(n);
        // The command's fixed body may come in more than one piece.
        loop {
            let need = ctrl::needed(&buf).min(control::MAX_MESSAGE);
            let have = buf.len();
            if have >= need {
                break;
            }
            buf.resize(need, 0);
            if conn.read_rest(&mut buf[have..], self.ctrl_started).is_err() {
                // Its remaining bytes, if they come, could not be told from
                // the next command's: answer, and close the connection.
                self.log.error(&format!(
                    "control channel: a message of {have} bytes, {need} needed, did not complete in time"
                ));
                let _ = conn.send(&ctrl::response(&[crate::libtpms::TPM_BAD_PARAMETER], &[]));
                return self.ctrl_closed();
            }
        }
        let outcome = control::handle(self, &buf, fds);
        let conn = self.ctrl.as_mut()?;
        let sent = conn.send(&outcome.response);
        if sent.is_err() || outcome.close {
            if let Some(exit) = self.ctrl_closed() {
                return Some(outcome.exit.unwrap_or(exit));
            }
        }
        outcome.exit.or_else(|| self.check_failed())
    }

    fn ctrl_closed(&mut self) -> Option<Exit> {
        self.ctrl = None;
        (self.ctrl_terminate || self.terminate).then_some(Exit::Terminated)
    }

    /// When the control message being served began to arrive.
    pub fn ctrl_started(&self) -> Instant {
        self.ctrl_started
    }

    /// The control connection, for a command that reads more of its body.
    pub fn ctrl_conn(&mut self) -> Option<&mut Conn> {
        self.ctrl.as_mut()
    }

    /// Whether there is a data channel (a listener or a connection).
    pub fn has_data_channel(&self) -> bool {
        self.data.is_some() || self.data_listener.is_some()
    }
}
