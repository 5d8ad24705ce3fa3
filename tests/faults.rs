//! Faults through the `Disk` trait: EIO, ENOSPC and short writes at every
//! write, sync and growth of a commit (one that grows the area included)
//! and of a rekey; EIO and torn sectors at every read of an open. The store
//! reports the error and never panics; a later commit works or is refused
//! (the writer poisoned itself); and the disk, reopened after power loss
//! or with every write landed, opens at a committed state, never a mix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tpmstate::image::{CrashDisk, CrashPlan, Disk, ImageError, SharedDisk};
use tpmstate::{Key, KeySource, Store};

type Model = BTreeMap<String, Vec<u8>>;

const AREA: u64 = 64 * 1024;
const MAX_AREA: u64 = 1024 * 1024;

fn mem() -> &'static Path {
    Path::new("<memory>")
}

/// What goes wrong at a write, sync or growth.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// The call fails with EIO, having done nothing.
    Eio,
    /// The call fails with ENOSPC, having done nothing.
    Enospc,
    /// A write lands half of its bytes, then fails with EIO.
    Short,
}

/// What goes wrong at a read.
#[derive(Debug, Clone, Copy)]
enum ReadFault {
    /// The read fails with EIO.
    Eio,
    /// The read returns a sector torn inside itself: its second half
    /// holds other bytes.
    Torn,
}

/// A disk that fails one chosen call, over a [`SharedDisk`].
struct FaultDisk {
    inner: SharedDisk,
    ops: u64,
    reads: Arc<AtomicU64>,
    fault: Option<(u64, Fault)>,
    read_fault: Option<(u64, ReadFault)>,
}

impl FaultDisk {
    fn new(inner: SharedDisk) -> FaultDisk {
        FaultDisk {
            inner,
            ops: 0,
            reads: Arc::default(),
            fault: None,
            read_fault: None,
        }
    }

    fn error(errno: i32, op: &'static str) -> ImageError {
        ImageError::Io {
            path: PathBuf::from("<memory>"),
            op,
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    /// The fault due at this write, sync or growth, if any.
    fn next(&mut self) -> Option<Fault> {
        let n = self.ops;
        self.ops += 1;
        self.fault.filter(|(at, _)| *at == n).map(|(_, f)| f)
    }
}

impl Disk for FaultDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let n = self.reads.fetch_add(1, Ordering::SeqCst);
        match self.read_fault.filter(|(at, _)| *at == n).map(|(_, f)| f) {
            Some(ReadFault::Eio) => Err(FaultDisk::error(libc::EIO, "read")),
            Some(ReadFault::Torn) => {
                self.inner.read_at(offset, buf)?;
                let sector = buf.len().min(512);
                buf[sector / 2..sector].iter_mut().for_each(|b| *b ^= 0xa5);
                Ok(())
            }
            None => self.inner.read_at(offset, buf),
        }
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        match self.next() {
            Some(Fault::Eio) => Err(FaultDisk::error(libc::EIO, "write")),
            Some(Fault::Enospc) => Err(FaultDisk::error(libc::ENOSPC, "write")),
            Some(Fault::Short) => {
                self.inner.write_at(offset, &data[..data.len() / 2])?;
                Err(FaultDisk::error(libc::EIO, "write"))
            }
            None => self.inner.write_at(offset, data),
        }
    }

    fn sync(&mut self) -> Result<(), ImageError> {
        match self.next() {
            Some(Fault::Enospc) => Err(FaultDisk::error(libc::ENOSPC, "fdatasync")),
            Some(_) => Err(FaultDisk::error(libc::EIO, "fdatasync")),
            None => self.inner.sync(),
        }
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn max_len(&self) -> u64 {
        self.inner.max_len()
    }

    fn grow(&mut self, min_len: u64) -> Result<(), ImageError> {
        match self.next() {
            Some(Fault::Enospc) => Err(FaultDisk::error(libc::ENOSPC, "grow")),
            Some(_) => Err(FaultDisk::error(libc::EIO, "grow")),
            None => self.inner.grow(min_len),
        }
    }
}

fn contents(store: &Store) -> Model {
    store
        .names()
        .map(|n| (n.to_string(), store.get(n).unwrap().unwrap().to_vec()))
        .collect()
}

/// Makes the store hold exactly `model`, in one commit.
fn commit(store: &mut Store, model: &Model) -> Result<u64, tpmstate::StoreError> {
    let gone: Vec<String> = store
        .names()
        .filter(|n| !model.contains_key(*n))
        .map(str::to_string)
        .collect();
    let mut t = store.transaction();
    for name in &gone {
        t.delete(name)?;
    }
    for (name, data) in model {
        t.put(name, data)?;
    }
    t.commit()
}

/// A model in a line: each blob's name, length and first byte.
fn brief(m: &Model) -> String {
    m.iter()
        .map(|(n, d)| format!("{n}:{}x{}", d.len(), d.first().copied().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(",")
}

fn model(entries: &[(&str, usize, u8)]) -> Model {
    entries
        .iter()
        .map(|(n, len, fill)| (n.to_string(), vec![*fill; *len]))
        .collect()
}

/// A formatted disk holding `first`, committed.
fn base(key: Option<&KeySource>, first: &Model) -> CrashDisk {
    let mut d = CrashDisk::new(AREA, MAX_AREA);
    Store::format_disk(&mut d, mem(), AREA, key).unwrap();
    let shared = SharedDisk::new(d);
    let mut store = Store::open_disk(Box::new(shared.clone()), mem(), key).unwrap();
    commit(&mut store, first).unwrap();
    drop(store);
    shared.with(|d| d.clone())
}

/// The writes, syncs and growths `change` makes on a store over `disk`.
fn ops_of(disk: &CrashDisk, key: Option<&KeySource>, change: &dyn Fn(&mut Store)) -> u64 {
    let shared = SharedDisk::new(disk.clone());
    let mut store = Store::open_disk(Box::new(shared.clone()), mem(), key).unwrap();
    let before = shared.with(|d| d.ops());
    change(&mut store);
    shared.with(|d| d.ops()) - before
}

/// Runs `change` with `fault` at its call `at`, then a further commit of
/// `after`; checks the results and that both crash images open at one of
/// `allowed` (the state before, the change's, or `after` once committed).
fn fault_one(
    disk: &CrashDisk,
    key: Option<&KeySource>,
    reopen_key: &dyn Fn(&Model) -> Option<KeySource>,
    (at, fault): (u64, Fault),
    change: &dyn Fn(&mut Store) -> Result<(), tpmstate::StoreError>,
    allowed: &[Model],
    after: &Model,
) {
    let shared = SharedDisk::new(disk.clone());
    let mut faulty = FaultDisk::new(shared.clone());
    faulty.fault = Some((at, fault));
    let mut store = Store::open_disk(Box::new(faulty), mem(), key).unwrap();
    let what = format!("{fault:?} at call {at}");
    let err = change(&mut store).expect_err(&format!("{what}: the change reported no error"));
    // A full disk is no room; a failing one an I/O error.
    let want = match fault {
        Fault::Enospc => tpmstate::ErrorKind::NoSpace,
        _ => tpmstate::ErrorKind::Io,
    };
    assert_eq!(err.kind(), want, "{what}: {}", tpmstate::kind::chain(&err));
    let later = commit(&mut store, after);
    drop(store);
    let mut states = allowed.to_vec();
    if later.is_ok() {
        states = vec![after.clone()];
    }
    for plan in [CrashPlan::DurableOnly, CrashPlan::AllWritten] {
        let image = shared.with(|d| d.after_crash(plan));
        let mut opened = None;
        for state in &states {
            let k = reopen_key(state);
            if let Ok(s) = Store::open_disk(Box::new(image.clone()), mem(), k.as_ref()) {
                opened = Some(contents(&s));
                break;
            }
        }
        let got = opened.unwrap_or_else(|| panic!("{what}, {plan:?}: the store does not open"));
        assert!(
            states.contains(&got),
            "{what}, {plan:?}: a state never committed: {}",
            brief(&got)
        );
    }
}

#[test]
fn every_fault_at_every_call_of_a_commit_is_reported_and_loses_nothing() {
    let key = KeySource::Key(Key::from_bytes(&[9u8; 32]).unwrap());
    for key in [None, Some(key)] {
        let first = model(&[("permall", 3000, 1), ("volatilestate", 500, 2)]);
        let disk = base(key.as_ref(), &first);
        // A small change, and one that outgrows the area.
        for second in [
            model(&[("permall", 3100, 3), ("volatilestate", 500, 2)]),
            model(&[("permall", 200_000, 4), ("savestate", 10, 5)]),
        ] {
            let change = |s: &mut Store| commit(s, &second).map(|_| ());
            let n = ops_of(&disk, key.as_ref(), &|s| change(s).unwrap());
            assert!(n >= 2, "a commit writes and syncs");
            let after = model(&[("permall", 100, 6)]);
            for at in 0..n {
                for fault in [Fault::Eio, Fault::Enospc, Fault::Short] {
                    fault_one(
                        &disk,
                        key.as_ref(),
                        &|_| key.clone(),
                        (at, fault),
                        &change,
                        &[first.clone(), second.clone()],
                        &after,
                    );
                }
            }
        }
    }
}

#[test]
fn every_fault_at_every_call_of_a_rekey_is_reported_and_loses_nothing() {
    let old = KeySource::Key(Key::from_bytes(&[9u8; 32]).unwrap());
    let new = KeySource::Key(Key::from_bytes(&[10u8; 32]).unwrap());
    let first = model(&[("permall", 3000, 1), ("volatilestate", 500, 2)]);
    let after = model(&[("permall", 100, 6)]);
    let disk = base(Some(&old), &first);
    let n = ops_of(&disk, Some(&old), &|s| {
        let _ = s.rekey(&new).unwrap();
    });
    for at in 0..n {
        for fault in [Fault::Eio, Fault::Enospc, Fault::Short] {
            let shared = SharedDisk::new(disk.clone());
            let mut faulty = FaultDisk::new(shared.clone());
            faulty.fault = Some((at, fault));
            let mut store = Store::open_disk(Box::new(faulty), mem(), Some(&old)).unwrap();
            let what = format!("{fault:?} at call {at}");
            // The fault is reported: as the rekey's error, or, once the new
            // key is committed, as its scrub's failure.
            match store.rekey(&new) {
                Err(_) => {}
                Ok(r) => assert!(r.scrub_failed.is_some(), "{what}: no error reported"),
            }
            let later = commit(&mut store, &after);
            drop(store);
            for plan in [CrashPlan::DurableOnly, CrashPlan::AllWritten] {
                let image = shared.with(|d| d.after_crash(plan));
                let got = [&old, &new].iter().find_map(|k| {
                    Store::open_disk(Box::new(image.clone()), mem(), Some(k))
                        .ok()
                        .map(|s| contents(&s))
                });
                let got =
                    got.unwrap_or_else(|| panic!("{what}, {plan:?}: opens under neither key"));
                match later {
                    Ok(_) => assert_eq!(got, after, "{what}, {plan:?}"),
                    Err(_) => {
                        let ok = got == first || got == after;
                        assert!(ok, "{what}, {plan:?}: {}", brief(&got))
                    }
                }
            }
        }
    }
}

#[test]
fn read_errors_and_torn_sectors_at_open_are_reported_never_served() {
    let key = KeySource::Key(Key::from_bytes(&[9u8; 32]).unwrap());
    for key in [None, Some(key)] {
        let first = model(&[("permall", 3000, 1), ("volatilestate", 500, 2)]);
        let disk = base(key.as_ref(), &first);
        // Count the reads of an open and of reading every blob once.
        let probe = FaultDisk::new(SharedDisk::new(disk.clone()));
        let reads = Arc::clone(&probe.reads);
        let store = Store::open_disk(Box::new(probe), mem(), key.as_ref()).unwrap();
        assert_eq!(contents(&store), first);
        drop(store);
        let n = reads.load(Ordering::SeqCst);
        assert!(n >= 3, "an open reads: {n}");
        for at in 0..n {
            for fault in [ReadFault::Eio, ReadFault::Torn] {
                let mut faulty = FaultDisk::new(SharedDisk::new(disk.clone()));
                faulty.read_fault = Some((at, fault));
                let what = format!("{fault:?} at read {at}");
                let Ok(store) = Store::open_disk(Box::new(faulty), mem(), key.as_ref()) else {
                    continue;
                };
                // An older generation is served only with the newer one
                // reported as skipped, never silently.
                assert!(
                    store.generation() == 2 || !store.skipped().is_empty(),
                    "{what}: generation {} served silently",
                    store.generation()
                );
                for name in store.names().map(str::to_string).collect::<Vec<_>>() {
                    // A blob served is the committed one; anything else is an error.
                    if let Ok(Some(data)) = store.get(&name) {
                        assert_eq!(Some(&data.to_vec()), first.get(&name), "{what}: {name}");
                    }
                }
            }
        }
    }
}

#[test]
fn every_fault_at_every_call_of_a_format_is_reported_and_leaves_no_half_store() {
    let key = KeySource::Key(Key::from_bytes(&[9u8; 32]).unwrap());
    for key in [None, Some(key)] {
        let count = SharedDisk::new(CrashDisk::new(AREA, MAX_AREA));
        let mut probe = FaultDisk::new(count.clone());
        Store::format_disk(&mut probe, mem(), AREA, key.as_ref()).unwrap();
        let n = probe.ops;
        assert!(n >= 2, "a format writes and syncs: {n}");
        for at in 0..n {
            for fault in [Fault::Eio, Fault::Enospc, Fault::Short] {
                let shared = SharedDisk::new(CrashDisk::new(AREA, MAX_AREA));
                let mut faulty = FaultDisk::new(shared.clone());
                faulty.fault = Some((at, fault));
                let what = format!("{fault:?} at call {at}");
                let result = Store::format_disk(&mut faulty, mem(), AREA, key.as_ref());
                assert!(result.is_err(), "{what}: the format reported no error");
                for plan in [CrashPlan::DurableOnly, CrashPlan::AllWritten] {
                    let image = shared.with(|d| d.after_crash(plan));
                    // No store yet, or the whole empty one: never half of one.
                    match Store::open_disk(Box::new(image), mem(), key.as_ref()) {
                        Ok(s) => assert_eq!(s.names().count(), 0, "{what}, {plan:?}"),
                        Err(e) => assert_eq!(
                            e.kind(),
                            tpmstate::ErrorKind::NotAStore,
                            "{what}, {plan:?}: {}",
                            tpmstate::kind::chain(&e)
                        ),
                    }
                }
            }
        }
    }
}
