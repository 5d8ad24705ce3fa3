//! `tpmstate snapshot`: internal snapshots, taken under the image's lock,
//! or, while `tpmstate-emu` holds that lock, by the emulator itself between
//! two commits (see `tpmstate::snapshot_ctl`).

use super::args::SnapshotAction;
use super::commands::Failure;
use std::path::Path;
use tpmstate::snapshot_ctl::{self, Reply, Request, SnapshotSummary};
use tpmstate::{ErrorKind, Locking, OpenOptions, ReadOnlyStore, Store};

/// Runs one snapshot action.
pub fn run(action: SnapshotAction, locking: Locking) -> Result<(), Failure> {
    let opts = || OpenOptions {
        locking,
        ..OpenOptions::default()
    };
    match action {
        SnapshotAction::List { image } => {
            let local = ReadOnlyStore::open(&image, opts()).and_then(|s| s.snapshots());
            let list = match through_emulator(&image, local, Request::List)? {
                Done::Here(list) => list.iter().map(SnapshotSummary::from).collect(),
                Done::There(reply) => reply.snapshots,
            };
            print_list(&image, &list);
        }
        SnapshotAction::Create { image, name } => {
            let local = Store::open(&image, opts()).and_then(|mut s| {
                s.create_snapshot(&name)?;
                Ok(s.generation())
            });
            match through_emulator(&image, local, Request::Create { name: name.clone() })? {
                Done::Here(generation) => eprintln!(
                    "created snapshot {name:?} of {} at generation {generation}",
                    image.display()
                ),
                Done::There(reply) => eprintln!("{}", reply.message),
            }
        }
        SnapshotAction::Delete { image, name } => {
            let local = Store::open(&image, opts()).and_then(|mut s| s.delete_snapshot(&name));
            match through_emulator(&image, local, Request::Delete { name: name.clone() })? {
                Done::Here(()) => eprintln!("deleted snapshot {name:?} of {}", image.display()),
                Done::There(reply) => eprintln!("{}", reply.message),
            }
        }
        SnapshotAction::Apply { image, name } => {
            let local = Store::apply_snapshot(&image, &name, locking);
            through_emulator(&image, local, Request::Apply { name: name.clone() })?;
            let served = tpmstate::ReadOnlyStore::open(&image, opts())
                .map(|s| format!(": the store is at generation {}", s.generation()))
                .unwrap_or_default();
            eprintln!("applied snapshot {name:?} to {}{served}", image.display());
        }
    }
    Ok(())
}

/// Where an action was done.
enum Done<T> {
    /// By this process, under the image's lock.
    Here(T),
    /// By the emulator holding the image, which answered this.
    There(Reply),
}

/// `local`'s outcome; when it failed on the image's lock, the answer of
/// the emulator holding the image to `request` instead (if one listens).
fn through_emulator<T>(
    image: &Path,
    local: Result<T, tpmstate::StoreError>,
    request: Request,
) -> Result<Done<T>, Failure> {
    let error = match local {
        Ok(done) => return Ok(Done::Here(done)),
        Err(e) if e.kind() == ErrorKind::Locked => e,
        Err(e) => return Err(e.into()),
    };
    let Some(reply) = snapshot_ctl::ask(image, &request)? else {
        // Held by something else (QEMU, another tpmstate): its lock error.
        return Err(error.into());
    };
    if reply.exit != 0 {
        let kind = ErrorKind::from_exit_code(reply.exit).unwrap_or(ErrorKind::Internal);
        return Err(Failure {
            kind,
            error: reply.message.into(),
        });
    }
    Ok(Done::There(reply))
}

fn print_list(image: &Path, list: &[SnapshotSummary]) {
    if list.is_empty() {
        println!("{} has no snapshots", image.display());
        return;
    }
    println!("{:<6} {:<24} {:>12}  CREATED", "ID", "NAME", "VM STATE");
    for s in list {
        let when = super::report::utc(u64::from(s.date_sec));
        println!("{:<6} {:<24} {:>12}  {when}", s.id, s.name, s.vm_state_size);
    }
}
