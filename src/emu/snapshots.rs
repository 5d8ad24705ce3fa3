//! Online snapshots: the emulator answers `tpmstate snapshot` on the
//! image's snapshot socket (`tpmstate::snapshot_ctl`) while it holds the
//! image. Requests are served by the event loop between two TPM commands,
//! so a snapshot holds a committed generation, never a commit half written.

use crate::image::ImageHandle;
use crate::log::Log;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};
use tpmstate::snapshot_ctl::{self, Reply, Request, Served, SnapshotSummary};
use tpmstate::ErrorKind;

/// How often a listener that could not be bound (another process listens
/// for the same image: a migration source on this host) is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// The snapshot socket, listening while the emulator holds the image.
#[derive(Default)]
pub struct SnapshotSocket {
    listener: Option<UnixListener>,
    last_try: Option<Instant>,
}

impl SnapshotSocket {
    /// Listens while `image` is held as a writer, and stops when it is not
    /// (released to a migration target, or not yet claimed).
    pub fn follow(&mut self, image: &mut ImageHandle, log: &Log) {
        let held = image.store().is_some();
        if !held {
            self.listener = None;
            return;
        }
        if self.listener.is_some() || self.last_try.is_some_and(|t| t.elapsed() < RETRY) {
            return;
        }
        self.last_try = Some(Instant::now());
        match snapshot_ctl::listen(image.path()) {
            Ok(l) => self.listener = Some(l),
            Err(e) => log.info(&format!(
                "{}: online snapshots not served yet: snapshot socket: {e}",
                image.path().display()
            )),
        }
    }

    /// The listener's descriptor, to poll.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.listener.as_ref().map(|l| l.as_fd())
    }

    /// Serves a waiting request on `image`.
    pub fn serve(&mut self, image: &mut ImageHandle, log: &Log) {
        let Some(listener) = &self.listener else {
            return;
        };
        match snapshot_ctl::serve_one(listener, |r| answer(image, r, log)) {
            Ok(Served::Nothing | Served::Answered) => {}
            Ok(Served::Failed(e)) => log.error(&format!(
                "{}: snapshot socket: a client: {e}",
                image.path().display()
            )),
            Err(e) => {
                log.error(&format!("{}: snapshot socket: {e}", image.path().display()));
                // accept() itself failed (out of descriptors?): a listener
                // left readable would wake the loop at once, again and
                // again. Listen afresh a second later.
                self.listener = None;
            }
        }
    }
}

/// Does what `request` asks of the held image.
fn answer(image: &mut ImageHandle, request: Request, log: &Log) -> Reply {
    let path = image.path().display().to_string();
    let refuse = |kind: ErrorKind, message: String| Reply {
        exit: kind.exit_code(),
        message,
        snapshots: Vec::new(),
    };
    let outcome = match (&request, image.store()) {
        (Request::Apply { .. }, _) => {
            return refuse(
                ErrorKind::Locked,
                format!(
                    "{path}: tpmstate-emu is running on this image: applying a snapshot \
                     needs the VM off (stop it, then run tpmstate snapshot apply)"
                ),
            )
        }
        (_, None) => {
            return refuse(
                ErrorKind::Locked,
                format!("{path}: the emulator does not hold the image now (a migration?)"),
            )
        }
        (Request::List, Some(store)) => store.snapshots().map(|list| Reply {
            snapshots: list.iter().map(SnapshotSummary::from).collect(),
            ..Reply::default()
        }),
        (Request::Create { name }, Some(store)) => store.create_snapshot(name).map(|()| Reply {
            message: format!(
                "created snapshot {name:?} of {path} at generation {} (by the running emulator)",
                store.generation()
            ),
            ..Reply::default()
        }),
        (Request::Delete { name }, Some(store)) => store.delete_snapshot(name).map(|()| Reply {
            message: format!("deleted snapshot {name:?} of {path} (by the running emulator)"),
            ..Reply::default()
        }),
    };
    match outcome {
        Ok(reply) => {
            if !reply.message.is_empty() {
                log.info(&reply.message);
            }
            reply
        }
        Err(e) => {
            let message = tpmstate::kind::chain(&e);
            log.error(&message);
            refuse(e.kind(), message)
        }
    }
}
