//! The event loop: one thread polls the signal pipe, the listeners and the
//! two connections, and runs every TPM call itself (libtpms is a
//! single-threaded singleton). A command is processed, its state committed
//! and only then answered, so an answered command is durable.

use crate::channel::{Conn, Listener, Opened};
use crate::control;
use crate::log::Log;
use crate::tpm::Tpm;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

/// `TPM_SEND_COMMAND`: the optional header before a data-channel command.
const SEND_COMMAND: u32 = 8;

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
    /// Locality set by SET_LOCALITY.
    pub locality: u8,
}

/// What the server is built from.
pub struct Channels {
    /// The data channel, if any.
    pub data: Option<Opened>,
    /// The control channel, if any.
    pub ctrl: Option<Opened>,
    /// The read end of the signal pipe.
    pub signals: UnixStream,
}

impl Server {
    /// A server over opened channels.
    pub fn new(tpm: Tpm, log: Log, ch: Channels, cfg: &crate::args::Config) -> Server {
        let split = |o: Option<Opened>| match o {
            None => (None, None),
            Some(Opened::Listening(l)) => (Some(l), None),
            Some(Opened::Connected(c)) => (None, Some(c)),
        };
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
            locality: 0,
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
        #[derive(Clone, Copy)]
        enum Src {
            Signal,
            DataListener,
            Data,
            CtrlListener,
            Ctrl,
        }
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
                None
            }
        }
    }

    /// Reads one TPM command (with or without the send-command header),
    /// runs it and answers.
    fn serve_data(&mut self) -> Option<Exit> {
        let conn = self.data.as_mut()?;
        let mut head = [0u8; 10];
        let closed = match conn.recv(&mut head[..1]) {
            Ok((0, _)) | Err(_) => true,
            Ok(_) => conn.read_rest(&mut head[1..]).is_err(),
        };
        if closed {
            return self.data_closed();
        }
        let first = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let (locality, command, framed) = if first == SEND_COMMAND {
            let size = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) as usize;
            if size > crate::tpm::MAX_COMMAND {
                return self.drop_data(&format!("send-command header claims {size} bytes"));
            }
            let mut cmd = vec![0u8; size];
            cmd[..1].copy_from_slice(&head[9..]);
            if size > 1 && conn.read_rest(&mut cmd[1..]).is_err() {
                return self.data_closed();
            }
            // The header's locality holds for later commands too (as swtpm).
            self.locality = head[4];
            (head[4], cmd, true)
        } else {
            let size = u32::from_be_bytes([head[2], head[3], head[4], head[5]]) as usize;
            if !(10..=crate::tpm::MAX_COMMAND).contains(&size) {
                return self.drop_data(&format!("TPM command header claims {size} bytes"));
            }
            let mut cmd = head.to_vec();
            cmd.resize(size, 0);
            if size > 10 && conn.read_rest(&mut cmd[10..]).is_err() {
                return self.data_closed();
            }
            (self.locality, cmd, false)
        };
        if let Some(cc) = command.get(6..10) {
            let cc = u32::from_be_bytes([cc[0], cc[1], cc[2], cc[3]]);
            self.log.debug(&format!(
                "TPM command 0x{cc:x} ({} bytes, locality {locality})",
                command.len()
            ));
        }
        let response = match command.get(6..10) {
            Some(&[0x20, 0x00, 0x10, 0x00]) => self.set_locality_command(&command),
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
        if self.disconnect {
            self.data = None;
        }
        self.check_failed()
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
        self.terminate.then_some(Exit::Terminated)
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
        let conn = self.ctrl.as_mut()?;
        let mut buf = vec![0u8; control::MAX_MESSAGE];
        let (n, fds) = match conn.recv(&mut buf) {
            Ok((0, _)) | Err(_) => {
                self.ctrl = None;
                return self.ctrl_terminate.then_some(Exit::Terminated);
            }
            Ok(r) => r,
        };
        buf.truncate(n);
        let outcome = control::handle(self, &buf, fds);
        let conn = self.ctrl.as_mut()?;
        let sent = conn.send(&outcome.response);
        if sent.is_err() {
            self.ctrl = None;
        }
        outcome.exit.or_else(|| self.check_failed())
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
