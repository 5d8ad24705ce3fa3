//! QEMU's image-locking protocol against real QEMU tools, and the counting
//! rules of lock acquisitions, checked against the bytes the kernel reports.

mod common;
use common::*;
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tpmstate::lock::{Flavour, ImageLock, LockGuard};
use tpmstate::{LockMode, Locking, OpenOptions, Store};

fn new_image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("nvram.qcow2");
    assert_eq!(cli(&["create", path_str(&img)]).0, 0);
    img
}

/// Protocol bytes (100..=104, 200..=204) held by descriptor `fd` of this process.
fn held_bytes(fd: i32) -> BTreeSet<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    let mut out = BTreeSet::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("lock:")) {
        let t: Vec<&str> = line.split_whitespace().collect();
        let (s, e): (u64, u64) = (
            t[t.len() - 2].parse().unwrap(),
            t[t.len() - 1].parse().unwrap_or(u64::MAX),
        );
        out.extend((100..=104).chain(200..=204).filter(|b| (s..=e).contains(b)));
    }
    out
}

fn expected_bytes(mode: Option<LockMode>) -> BTreeSet<u64> {
    match mode {
        None => BTreeSet::new(),
        Some(LockMode::ForceShareRead) => [100].into(),
        Some(LockMode::Shared) => [100, 201, 203].into(),
        Some(LockMode::Writer) => [100, 101, 103, 201, 203].into(),
        Some(LockMode::Exclusive) => [100, 101, 103, 200, 201, 202, 203].into(),
    }
}

fn open_lock(img: &Path) -> (ImageLock, i32) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let fd = file.as_raw_fd();
    let (lock, _) = ImageLock::new(img, Arc::new(file), Locking::On).unwrap();
    (lock, fd)
}

/// Starts a QEMU tool holding the image and waits until its locks show.
fn hold_with(cmd: &mut Command, img: &Path) -> Child {
    let child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let key = tpmstate::lock::file_key(&std::fs::File::open(img).unwrap()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tpmstate::lock::scan_holders(&key, None)
        .iter()
        .all(|h| h.pid != child.id() as i32)
    {
        assert!(
            Instant::now() < deadline,
            "QEMU tool never locked the image"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn qemu_tools_are_kept_out_while_tpmstate_holds_writer_mode() {
    let dir = scratch();
    let img = new_image(dir.path());
    let i = path_str(&img);
    let store = Store::open(&img, OpenOptions::default()).unwrap();
    for args in [vec!["info", i], vec!["check", i]] {
        let (code, out, err) = qemu_img(&args);
        assert_ne!(code, 0, "{args:?} must fail: {out}");
        assert!(
            err.contains("Failed to get shared \"write\" lock"),
            "{args:?}: {err}"
        );
    }
    let out = Command::new("qemu-io")
        .args(["-c", "write 0 4k", i])
        .output()
        .unwrap();
    let (code, _, err) = decode(out);
    assert_ne!(code, 0);
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    let (code, out, err) = qemu_img(&["info", "-U", i]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("qcow2"));
    drop(store);
    assert_eq!(qemu_img(&["check", i]).0, 0, "released on drop");
}

#[test]
fn posix_fallback_locks_keep_qemu_tools_out_and_are_kept_out_by_them() {
    // Linux makes OFD and POSIX locks conflict, so QEMU (OFD) and a tpmstate
    // that fell back to POSIX locks still exclude each other.
    let dir = scratch();
    let img = new_image(dir.path());
    let i = path_str(&img);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let fd = file.as_raw_fd();
    let lock = ImageLock::with_flavour(&img, Arc::new(file), Some(Flavour::Posix));
    let guard = lock.acquire(LockMode::Writer, None).unwrap();
    assert_eq!(held_bytes(fd), expected_bytes(Some(LockMode::Writer)));
    let (code, _, err) = qemu_img(&["info", i]);
    assert_ne!(code, 0);
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    drop(guard);
    assert!(
        held_bytes(fd).is_empty(),
        "released with the last acquisition"
    );
    assert_eq!(qemu_img(&["check", i]).0, 0);

    let _qemu = Kill(hold_with(
        Command::new("qemu-io").args(["-f", "qcow2", i]),
        &img,
    ));
    let err = lock.acquire(LockMode::Writer, None).unwrap_err();
    assert_eq!(err.kind(), tpmstate::ErrorKind::Locked, "{err}");
    assert!(
        held_bytes(fd).is_empty(),
        "a refused acquisition holds nothing"
    );
    assert!(lock.acquire(LockMode::ForceShareRead, None).is_ok());
}

#[test]
fn tpmstate_is_kept_out_while_qemu_io_holds_the_image_read_write() {
    let dir = scratch();
    let img = new_image(dir.path());
    let i = path_str(&img);
    let holder = Kill(hold_with(
        Command::new("qemu-io").args(["-c", "sleep 60000", i]),
        &img,
    ));
    let pid = holder.0.id().to_string();
    let blob = dir.path().join("b");
    std::fs::write(&blob, b"x").unwrap();
    for args in [
        vec!["put", i, "permall", path_str(&blob)],
        vec!["info", i],
        vec!["get", i, "permall"],
    ] {
        let (code, _, err) = cli(&args);
        assert_eq!(code, 6, "{args:?}: {err}");
        assert!(
            err.contains(&pid) && err.contains("qemu-io"),
            "{args:?} must name the holder: {err}"
        );
    }
    let (code, _, err) = cli(&["info", "-U", i]);
    assert_eq!(code, 0, "force-share read works: {err}");
    let (code, out, _) = cli(&["locks", i]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&pid)
            && out.contains("uses [consistent read, write, resize]")
            && out.contains("unshares [write, resize]"),
        "{out}"
    );
}

#[test]
fn read_only_qemu_io_admits_shared_but_not_writer() {
    let dir = scratch();
    let img = new_image(dir.path());
    let i = path_str(&img);
    let _holder = Kill(hold_with(
        Command::new("qemu-io").args(["-r", "-c", "sleep 60000", i]),
        &img,
    ));
    assert_eq!(cli(&["info", i]).0, 0);
    let blob = dir.path().join("b");
    std::fs::write(&blob, b"x").unwrap();
    let (code, _, err) = cli(&["put", i, "permall", path_str(&blob)]);
    assert_eq!(code, 6, "{err}");
}

#[test]
fn qemu_nbd_read_write_export_keeps_tpmstate_out() {
    let dir = scratch();
    let img = new_image(dir.path());
    let sock = dir.path().join("nbd.sock");
    let _holder = Kill(hold_with(
        Command::new("qemu-nbd").args([
            "--persistent",
            "-f",
            "qcow2",
            "-k",
            path_str(&sock),
            path_str(&img),
        ]),
        &img,
    ));
    let blob = dir.path().join("b");
    std::fs::write(&blob, b"x").unwrap();
    let (code, _, err) = cli(&["put", path_str(&img), "permall", path_str(&blob)]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("qemu-nbd"), "{err}");
}

#[test]
fn second_handle_in_the_same_process_conflicts_like_another_process() {
    let dir = scratch();
    let img = new_image(dir.path());
    let _first = Store::open(&img, OpenOptions::default()).unwrap();
    let second = Store::open(&img, OpenOptions::default());
    assert_eq!(second.unwrap_err().kind(), tpmstate::ErrorKind::Locked);
}

#[test]
fn failed_upgrade_leaves_the_held_mode_exactly_as_it_was() {
    let dir = scratch();
    let img = new_image(dir.path());
    let (a, fd) = open_lock(&img);
    let (b, _) = open_lock(&img);
    let _ga = a.acquire(LockMode::Shared, None).unwrap();
    let _gb = b.acquire(LockMode::Shared, None).unwrap();
    let err = a.acquire(LockMode::Writer, None).unwrap_err();
    assert!(
        err.to_string().contains("Failed to get \"write\" lock"),
        "{err}"
    );
    assert_eq!(a.held(), Some(LockMode::Shared));
    assert_eq!(held_bytes(fd), expected_bytes(Some(LockMode::Shared)));
}

#[test]
fn timeout_waits_for_the_holder_and_gives_up_after_it() {
    let dir = scratch();
    let img = new_image(dir.path());
    let (a, _) = open_lock(&img);
    let (b, _) = open_lock(&img);
    let held = a.acquire(LockMode::Writer, None).unwrap();
    let t = Instant::now();
    assert!(b
        .acquire(LockMode::Writer, Some(Duration::from_millis(200)))
        .is_err());
    assert!(t.elapsed() >= Duration::from_millis(200));
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        drop(held);
    });
    let _acquired = b
        .acquire(LockMode::Writer, Some(Duration::from_secs(5)))
        .expect("acquired once the holder let go");
    releaser.join().unwrap();
}

#[test]
fn lock_command_runs_the_command_under_the_lock_and_passes_its_status() {
    let dir = scratch();
    let img = new_image(dir.path());
    let i = path_str(&img);
    let (code, _, _) = cli(&[
        "lock",
        i,
        "--",
        "sh",
        "-c",
        "qemu-img info x 2>/dev/null; exit 3",
    ]);
    assert_eq!(code, 3);
    let (code, out, _) = cli(&["lock", i, "--mode", "writer", "--", "qemu-img", "info", i]);
    assert_eq!(code, 1, "qemu-img must be locked out inside: {out}");
    let _holder = Store::open(&img, OpenOptions::default()).unwrap();
    // tpmstate's own failure is 125, as timeout(1) and env(1) say it, so a
    // command that itself exits 6 is not mistaken for "locked".
    let (code, _, err) = cli(&["lock", i, "--timeout-ms", "50", "--", "true"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("Failed to get"), "{err}");
    let (code, _, _) = cli(&["lock", i, "--mode", "shared", "--", "sh", "-c", "exit 6"]);
    assert_eq!(code, 125, "the shared lock conflicts with the writer too");
}

#[test]
fn lock_command_exits_127_for_a_missing_command_and_126_for_one_that_cannot_run() {
    let dir = scratch();
    let img = new_image(dir.path());
    let i = path_str(&img);
    let (code, _, err) = cli(&["lock", i, "--", "/nonexistent/tpmstate-no-such-command"]);
    assert_eq!(code, 127, "{err}");
    let not_executable = dir.path().join("script");
    std::fs::write(&not_executable, "#!/bin/sh\nexit 0\n").unwrap();
    let (code, _, err) = cli(&["lock", i, "--", path_str(&not_executable)]);
    assert_eq!(code, 126, "{err}");
    let (code, _, _) = cli(&["lock", i, "--", "sh", "-c", "exit 6"]);
    assert_eq!(code, 6, "the command's own status passes through");
}

#[test]
fn locking_off_takes_no_bytes() {
    let dir = scratch();
    let img = new_image(dir.path());
    let file = std::fs::File::open(&img).unwrap();
    let fd = file.as_raw_fd();
    let (lock, _) = ImageLock::new(&img, Arc::new(file), Locking::Off).unwrap();
    let _g = lock.acquire(LockMode::Exclusive, None).unwrap();
    assert!(held_bytes(fd).is_empty());
}

#[derive(Debug, Clone)]
enum Op {
    Acquire(usize),
    /// Drop the guard at this index (modulo the live count) on another thread.
    Release(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..4).prop_map(Op::Acquire),
        any::<usize>().prop_map(Op::Release)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn counted_acquisitions_hold_exactly_the_strongest_live_mode(ops in prop::collection::vec(op(), 1..40)) {
        let dir = scratch();
        let img = new_image(dir.path());
        let (lock, fd) = open_lock(&img);
        let mut live: Vec<LockGuard> = Vec::new();
        for op in ops {
            match op {
                Op::Acquire(m) => live.push(lock.acquire(LockMode::ALL[m], None).unwrap()),
                Op::Release(i) if !live.is_empty() => {
                    let g = live.remove(i % live.len());
                    std::thread::spawn(move || drop(g)).join().unwrap();
                }
                Op::Release(_) => {}
            }
            let strongest = live.iter().map(|g| g.mode()).max();
            prop_assert_eq!(lock.held(), strongest);
            prop_assert_eq!(held_bytes(fd), expected_bytes(strongest));
        }
        drop(live);
        prop_assert!(held_bytes(fd).is_empty());
    }
}

#[test]
fn concurrent_nested_acquisitions_from_many_threads_balance_out() {
    let dir = scratch();
    let img = new_image(dir.path());
    let (lock, fd) = open_lock(&img);
    let outer = lock.acquire(LockMode::Shared, None).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let lock = lock.clone();
            std::thread::spawn(move || {
                for i in 0..2000 {
                    let g = lock
                        .acquire(
                            if (t + i) % 3 == 0 {
                                LockMode::Writer
                            } else {
                                LockMode::Shared
                            },
                            None,
                        )
                        .unwrap();
                    drop(g);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(held_bytes(fd), expected_bytes(Some(LockMode::Shared)));
    drop(outer);
    assert!(held_bytes(fd).is_empty());
}
