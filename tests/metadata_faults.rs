//! Faults at every call of a qcow2 metadata change: EIO, ENOSPC and a short
//! write at each read, write and sync of a format's zero-fill, an area
//! growth, an unshare after an internal snapshot, an overlay's copy-up, and
//! a snapshot created or deleted. Each is reported with its error class; the
//! disk stays usable (a fault before the switch) or refuses further writes
//! (after it, its map may be stale); and
//! the image, reopened, is the old one or the new one: `qemu-img check`
//! clean, the area's bytes, the snapshot list, and the backing file as they
//! were.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tpmstate::image::{CreateOptions, Disk, MetaFault, Qcow2Disk, SnapshotOp};
use tpmstate::ErrorKind;

const AREA: u64 = 256 << 10;
const PATTERN: u8 = 0xa5;

fn open(path: &Path) -> Qcow2Disk {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    Qcow2Disk::open_unlocked(path, Arc::new(file)).unwrap()
}

fn snapshot_names(path: &Path) -> Vec<String> {
    open(path)
        .snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect()
}

/// The images the operations start from, in `d`: a blank one, a formatted
/// area holding the pattern, the same with a qemu-img snapshot, and an
/// overlay over the formatted one.
fn templates(d: &Path) -> [PathBuf; 4] {
    let blank = d.join("blank.qcow2");
    let opts = CreateOptions {
        size: 4 << 20,
        cluster_bits: 14,
    };
    Qcow2Disk::create_file(&blank, opts).unwrap();
    let filled = d.join("filled.qcow2");
    std::fs::copy(&blank, &filled).unwrap();
    let mut disk = open(&filled);
    disk.zero_fill(AREA).unwrap();
    disk.write_at(0, &vec![PATTERN; AREA as usize]).unwrap();
    disk.sync().unwrap();
    let snapped = d.join("snapped.qcow2");
    std::fs::copy(&filled, &snapped).unwrap();
    let (code, _, err) = qemu_img(&["snapshot", "-c", "s1", path_str(&snapped)]);
    assert_eq!(code, 0, "{err}");
    let overlay = d.join("overlay.qcow2");
    qemu_img_overlay("filled.qcow2", &overlay, "");
    [blank, filled, snapped, overlay]
}

/// An operation: its name, the template it starts from, what it does, the
/// area size and snapshot list before and after it.
struct Op {
    name: &'static str,
    template: usize,
    run: fn(&mut Qcow2Disk) -> Result<(), tpmstate::image::ImageError>,
    sizes: [u64; 2],
    snapshots: [&'static [&'static str]; 2],
}

fn ops() -> Vec<Op> {
    vec![
        Op {
            name: "format's zero-fill",
            template: 0,
            run: |d| d.zero_fill(AREA),
            sizes: [0, AREA],
            snapshots: [&[], &[]],
        },
        Op {
            name: "area growth",
            template: 1,
            run: |d| d.grow(2 * AREA),
            sizes: [AREA, 2 * AREA],
            snapshots: [&[], &[]],
        },
        Op {
            name: "unshare",
            template: 2,
            run: |d| d.make_own(),
            sizes: [AREA, AREA],
            snapshots: [&["s1"], &["s1"]],
        },
        Op {
            name: "copy-up",
            template: 3,
            run: |d| d.make_own(),
            sizes: [AREA, AREA],
            snapshots: [&[], &[]],
        },
        Op {
            name: "snapshot create",
            template: 2,
            run: |d| d.change_snapshot(SnapshotOp::Create("s2")),
            sizes: [AREA, AREA],
            snapshots: [&["s1"], &["s1", "s2"]],
        },
        Op {
            name: "snapshot delete",
            template: 2,
            run: |d| d.change_snapshot(SnapshotOp::Delete("s1")),
            sizes: [AREA, AREA],
            snapshots: [&["s1"], &[]],
        },
    ]
}

#[test]
fn every_fault_at_every_call_of_a_metadata_change_is_reported_and_leaves_the_old_or_new_image() {
    let dir = scratch();
    let d = dir.path();
    let templates = templates(d);
    let backing = sha(&templates[1]);
    let victim = d.join("victim.qcow2");
    let faults = [
        (MetaFault::Errno(libc::EIO), ErrorKind::Io),
        (MetaFault::Errno(libc::ENOSPC), ErrorKind::NoSpace),
        (MetaFault::ShortWrite, ErrorKind::NoSpace),
    ];
    for op in ops() {
        std::fs::copy(&templates[op.template], &victim).unwrap();
        let mut probe = open(&victim);
        probe.inject_metadata_fault(usize::MAX, MetaFault::ShortWrite);
        (op.run)(&mut probe).unwrap();
        let calls = probe.metadata_calls();
        drop(probe);
        assert!(calls >= 3, "{}: {calls} calls", op.name);
        eprintln!("{}: {calls} metadata calls, 3 faults at each", op.name);
        for call in 0..calls {
            for (fault, kind) in faults {
                // A short write of a read or a sync is an EIO.
                let kind = match fault {
                    MetaFault::ShortWrite if !writes_at(&templates[op.template], &op, call) => {
                        ErrorKind::Io
                    }
                    _ => kind,
                };
                let what = format!("{}, call {call} of {calls}, {fault:?}", op.name);
                std::fs::copy(&templates[op.template], &victim).unwrap();
                let mut disk = open(&victim);
                disk.inject_metadata_fault(call, fault);
                let err = (op.run)(&mut disk).expect_err(&what);
                assert_eq!(err.kind(), kind, "{what}: {err}");
                assert!(err.to_string().contains(path_str(&victim)), "{what}: {err}");
                // Usable (a fault before the switch changed nothing the
                // image uses), or refusing writes until reopened (after it).
                if op.template > 0 {
                    match disk.write_at(0, &[PATTERN; 512]).and_then(|()| disk.sync()) {
                        Ok(()) => {}
                        Err(e) => {
                            assert!(e.to_string().contains("reopen the image"), "{what}: {e}")
                        }
                    }
                }
                drop(disk);
                assert_qemu_check_clean(&victim);
                let reopened = open(&victim);
                let switched = usize::from(
                    reopened.size() == op.sizes[1] && op.sizes[0] != op.sizes[1]
                        || snapshot_names(&victim) == op.snapshots[1]
                            && op.snapshots[0] != op.snapshots[1],
                );
                assert_eq!(reopened.size(), op.sizes[switched], "{what}");
                assert_eq!(snapshot_names(&victim), op.snapshots[switched], "{what}");
                if op.template > 0 {
                    let mut area = vec![0u8; AREA as usize];
                    reopened.read_at(0, &mut area).unwrap();
                    assert!(area.iter().all(|&b| b == PATTERN), "{what}: the area");
                }
                assert_eq!(sha(&templates[1]), backing, "{what}: the backing file");
            }
        }
    }
}

/// Whether metadata call `call` of `op` is a write (so a short write
/// happens there), found by running the op with an EIO at that call and
/// seeing whether the error names a write.
fn writes_at(template: &Path, op: &Op, call: usize) -> bool {
    let probe_path = template.with_extension("probe");
    std::fs::copy(template, &probe_path).unwrap();
    let mut disk = open(&probe_path);
    disk.inject_metadata_fault(call, MetaFault::Errno(libc::EIO));
    let err = (op.run)(&mut disk).unwrap_err();
    let text = err.to_string();
    text.contains("write failed")
}

/// EIO at every read a migration target's claim makes: the claim fails
/// with an I/O error, writes nothing, and lets the image go (an exclusive
/// lock is free again right after); past the last read it succeeds.
#[test]
fn a_read_fault_at_every_read_of_a_claim_fails_it_writes_nothing_and_lets_go() {
    use tpmstate::lock::{ImageLock, LockMode};
    use tpmstate::migration::{ClaimOptions, Incoming};
    use tpmstate::{KeySource, Locking};
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    let key = key_file(dir.path(), "key", 0x42);
    let blob = dir.path().join("blob");
    std::fs::write(&blob, vec![7u8; 40_000]).unwrap();
    create_encrypted_with_permall(&image, &key, &blob);
    let before = sha(&image);
    let mut reads = 0;
    loop {
        assert!(reads < 10_000, "the claim never got past its reads");
        Qcow2Disk::inject_fault_into_next_open(reads, MetaFault::Errno(libc::EIO));
        let incoming = Incoming::open_deferred(&image, Locking::Auto).unwrap();
        let opts = ClaimOptions {
            key: Some(KeySource::from_key_file(&key).unwrap()),
            required: vec!["permall".into()],
            ..ClaimOptions::default()
        };
        match incoming.claim(opts) {
            Ok(store) => {
                drop(store);
                break;
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Io, "read {reads}: {e}");
                assert_eq!(
                    sha(&image),
                    before,
                    "read {reads}: a failed claim writes nothing"
                );
                let (lock, _) = ImageLock::open(&image, false, Locking::Auto).unwrap();
                let _free = lock
                    .acquire(LockMode::Exclusive, None)
                    .unwrap_or_else(|e| panic!("read {reads}: the claim let go: {e}"));
            }
        }
        reads += 1;
    }
    eprintln!("a claim: {reads} reads, EIO at each");
    assert!(reads >= 3, "{reads} reads");
    assert_eq!(sha(&image), before);
}
