//! Snapshots with the tools people use: qemu-img's internal snapshots,
//! `tpmstate snapshot` (offline, and through a running emulator while
//! tpm2-tools writes NV data), and overlays as libvirt makes them, with
//! `qemu-img commit` back into the base. Every step ends with
//! `qemu-img check` clean; kill -9 across the unshare and the copy-up
//! leaves a committed state, intact snapshots and an unchanged backing file.

mod common;
use common::emu::*;
use common::*;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `tpmstate put IMAGE permall` of `bytes`, with `extra` options; asserts success.
fn put(image: &Path, bytes: &[u8], extra: &[&str]) {
    let blob = image.with_extension("blob");
    std::fs::write(&blob, bytes).unwrap();
    let mut args = vec!["put", path_str(image), "permall", path_str(&blob)];
    args.extend_from_slice(extra);
    let (code, _, err) = cli(&args);
    assert_eq!(code, 0, "put: {err}");
}

/// `tpmstate get IMAGE permall` with `extra` options.
fn get(image: &Path, extra: &[&str]) -> Vec<u8> {
    let mut args = vec!["get", path_str(image), "permall"];
    args.extend_from_slice(extra);
    let out = tpmstate().args(&args).output().unwrap();
    assert!(out.status.success(), "get: {out:?}");
    out.stdout
}

fn snapshot_names(image: &Path) -> Vec<String> {
    let (code, out, err) = qemu_img(&["snapshot", "-l", path_str(image)]);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

fn qemu_snapshot(flag: &str, name: &str, image: &Path) {
    let (code, out, err) = qemu_img(&["snapshot", flag, name, path_str(image)]);
    assert_eq!(code, 0, "qemu-img snapshot {flag} {name}: {out}{err}");
}

#[test]
fn qemu_img_snapshots_hold_older_states_that_apply_brings_back() {
    for encrypted in [false, true] {
        let dir = scratch();
        let image = dir.path().join("nvram.qcow2");
        let key = key_file(dir.path(), "key", 0x5a);
        let k: &[&str] = if encrypted {
            &["--key-file", path_str(&key)]
        } else {
            &[]
        };
        let mut create = vec!["create", path_str(&image)];
        create.extend_from_slice(k);
        assert_eq!(cli(&create).0, 0);
        let state = |i: u8| vec![i; 3000 + usize::from(i) * 100];
        for i in 1..=3u8 {
            put(&image, &state(i), k);
            qemu_snapshot("-c", &format!("s{i}"), &image);
        }
        put(&image, &state(4), k);
        assert_qemu_check_clean(&image);
        assert_eq!(snapshot_names(&image), ["s1", "s2", "s3"]);
        assert_eq!(get(&image, k), state(4));
        for i in [2u8, 1, 3] {
            qemu_snapshot("-a", &format!("s{i}"), &image);
            assert_qemu_check_clean(&image);
            assert_eq!(get(&image, k), state(i), "encrypted {encrypted}: s{i}");
            // A commit after the apply unshares the area; the snapshot keeps its state.
            put(&image, &state(10 + i), k);
            assert_qemu_check_clean(&image);
        }
        for i in 1..=3u8 {
            qemu_snapshot("-d", &format!("s{i}"), &image);
            assert_qemu_check_clean(&image);
        }
        assert!(snapshot_names(&image).is_empty());
        assert_eq!(get(&image, k), state(13));
    }
}

#[test]
fn tpmstate_snapshot_commands_make_snapshots_qemu_img_lists_and_applies() {
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    let i = path_str(&image);
    assert_eq!(cli(&["create", i]).0, 0);
    put(&image, b"first", &[]);
    let (code, _, err) = cli(&["snapshot", "create", i, "before-update"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("generation 2"), "{err}");
    put(&image, b"second", &[]);
    assert_qemu_check_clean(&image);
    assert_eq!(
        snapshot_names(&image),
        ["before-update"],
        "qemu-img lists it"
    );
    let (code, out, _) = cli(&["snapshot", "list", i]);
    assert_eq!(code, 0);
    assert!(out.contains("before-update"), "{out}");

    let (code, _, err) = cli(&["snapshot", "create", i, "before-update"]);
    assert_eq!(code, 1, "a taken name is refused: {err}");
    assert!(err.contains("exists"), "{err}");
    let (code, _, err) = cli(&["snapshot", "apply", i, "nope"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no such snapshot") && err.contains(i), "{err}");

    // qemu-img applies what tpmstate took, and tpmstate what qemu-img took.
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&image, &copy).unwrap();
    qemu_snapshot("-a", "1", &copy);
    assert_eq!(get(&copy, &[]), b"first");
    qemu_snapshot("-c", "by-qemu", &image);
    put(&image, b"third", &[]);
    let (code, _, err) = cli(&["snapshot", "apply", i, "by-qemu"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(get(&image, &[]), b"second");
    let (code, _, err) = cli(&["snapshot", "apply", i, "before-update"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(get(&image, &[]), b"first");
    for name in ["before-update", "by-qemu"] {
        let (code, _, err) = cli(&["snapshot", "delete", i, name]);
        assert_eq!(code, 0, "{err}");
    }
    assert_qemu_check_clean(&image);
    assert!(snapshot_names(&image).is_empty());
    assert_eq!(get(&image, &[]), b"first");
}

/// A base with a store holding `base-state`, read-only, and an overlay on it.
fn base_and_overlay(dir: &Path, k: &[&str]) -> (PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    let mut create = vec!["create", path_str(&base)];
    create.extend_from_slice(k);
    assert_eq!(cli(&create).0, 0);
    put(&base, b"base-state", k);
    let overlay = dir.join("overlay.qcow2");
    qemu_img_overlay("base.qcow2", &overlay, "");
    (base, overlay)
}

#[test]
fn an_overlay_reads_through_copies_up_once_and_commits_back_into_its_base() {
    use std::os::unix::fs::PermissionsExt;
    for encrypted in [false, true] {
        let dir = scratch();
        let key = key_file(dir.path(), "key", 0x3c);
        let k: &[&str] = if encrypted {
            &["--key-file", path_str(&key)]
        } else {
            &[]
        };
        let (base, overlay) = base_and_overlay(dir.path(), k);
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o444)).unwrap();
        let before = sha(&base);
        assert_eq!(get(&overlay, k), b"base-state", "read through");
        put(&overlay, b"overlay-1", k);
        put(&overlay, b"overlay-2", k);
        assert_eq!(sha(&base), before, "the backing file is never written");
        assert_qemu_check_clean(&overlay);
        assert_eq!(get(&overlay, k), b"overlay-2");
        assert_eq!(get(&base, k), b"base-state");
        // A writer of the base is kept out while the overlay is open.
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (code, out, err) = qemu_img(&["commit", path_str(&overlay)]);
        assert_eq!(code, 0, "{out}{err}");
        assert_qemu_check_clean(&base);
        assert_eq!(
            get(&base, k),
            b"overlay-2",
            "the base opens at the overlay's state"
        );
        put(&base, b"after-commit", k);
        assert_qemu_check_clean(&base);
    }
}

#[test]
fn a_backing_file_in_use_by_a_writer_keeps_the_overlay_closed() {
    let dir = scratch();
    let (base, overlay) = base_and_overlay(dir.path(), &[]);
    // `tpmstate lock IMAGE --mode writer -- CMD` holds the base as a writer would.
    let out = tpmstate()
        .args(["lock", path_str(&base), "--mode", "writer", "--"])
        .args([
            env!("CARGO_BIN_EXE_tpmstate"),
            "get",
            path_str(&overlay),
            "permall",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(path_str(&base)),
        "names the backing file: {err}"
    );
}

const COUNTER: u32 = 0x0150_0040;

/// Increments the counter with tpm2-tools until `stop`; counts the acknowledged ones.
fn stream_increments(emu_port: u16, acked: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let out = std::process::Command::new("tpm2_nvincrement")
            .args([&format!("{COUNTER:#x}"), "-C", "o"])
            .env(
                "TPM2TOOLS_TCTI",
                format!("swtpm:host=127.0.0.1,port={emu_port}"),
            )
            .output()
            .unwrap();
        assert!(out.status.success(), "tpm2_nvincrement: {out:?}");
        acked.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn online_snapshots_taken_under_nv_writes_hold_committed_states() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    let i = path_str(&image).to_string();
    let emu = Emu::start(&image, &[]);
    define_counter(&emu, COUNTER);
    emu.tpm2_ok("tpm2_nvincrement", &[&format!("{COUNTER:#x}"), "-C", "o"]);
    let (acked, stop) = (
        Arc::new(AtomicU64::new(1)),
        Arc::new(AtomicBool::new(false)),
    );
    let writer = {
        let (port, acked, stop) = (emu.port, acked.clone(), stop.clone());
        std::thread::spawn(move || stream_increments(port, acked, stop))
    };
    let mut bounds = Vec::new();
    for n in 0..5 {
        std::thread::sleep(Duration::from_millis(150));
        let low = acked.load(Ordering::SeqCst);
        let (code, _, err) = cli(&["snapshot", "create", &i, &format!("online{n}")]);
        let high = acked.load(Ordering::SeqCst);
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("by the running emulator"), "{err}");
        bounds.push((low, high + 1));
    }
    let (code, out, err) = cli(&["snapshot", "list", &i]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("online4"),
        "listed through the emulator: {out}"
    );
    let (code, _, err) = cli(&["snapshot", "apply", &i, "online0"]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("needs the VM off"), "{err}");
    let (code, _, err) = cli(&["snapshot", "delete", &i, "online4"]);
    assert_eq!(code, 0, "{err}");
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let last = counter_of(&emu.command(&nv_read8(COUNTER)));
    assert_eq!(emu.stop().code(), Some(0));
    assert_qemu_check_clean(&image);

    let mut previous = 0;
    for (n, (low, high)) in bounds.iter().enumerate().take(4) {
        let copy = dir.path().join(format!("applied{n}.qcow2"));
        std::fs::copy(&image, &copy).unwrap();
        qemu_snapshot("-a", &format!("online{n}"), &copy);
        // Opens with no rollback accepted: the snapshot holds no torn commit.
        let emu = Emu::start(&copy, &[]);
        let value = counter_of(&emu.command(&nv_read8(COUNTER)));
        assert!(
            (*low..=*high).contains(&value) && value >= previous && value <= last,
            "snapshot {n}: counter {value}, acknowledged {low}..{high} around it"
        );
        previous = value;
        emu.stop();
    }
}

/// Kills a `tpmstate put` of `new` into `image` after `delay`; returns
/// whether it finished first.
fn put_killed_after(image: &Path, blob: &Path, delay: Duration) -> bool {
    let mut child = tpmstate()
        .args(["put", path_str(image), "permall", path_str(blob)])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let finished = child.try_wait().unwrap().is_some();
    let _ = child.kill();
    let _ = child.wait();
    finished
}

/// kill -9 at random points of the first write into a snapshotted image
/// (the unshare) and into an overlay (the copy-up): `kills` rounds each.
#[test]
fn kill_9_during_an_unshare_or_a_copy_up_leaves_a_committed_state() {
    let kills: usize = std::env::var("TPMSTATE_SNAPSHOT_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let dir = scratch();
    let d = dir.path();
    let snapped = d.join("snapped.qcow2");
    assert_eq!(cli(&["create", path_str(&snapped)]).0, 0);
    put(&snapped, b"old", &[]);
    qemu_snapshot("-c", "s1", &snapped);
    let (_, overlay) = base_and_overlay(d, &[]);
    let base = d.join("base.qcow2");
    let base_sha = sha(&base);
    let new = d.join("new.blob");
    std::fs::write(&new, b"new").unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5_4a9);
    let mut finished = 0;
    for round in 0..kills * 2 {
        let (template, old): (&Path, &[u8]) = match round % 2 {
            0 => (&snapped, b"old"),
            _ => (&overlay, b"base-state"),
        };
        let image = d.join("victim.qcow2");
        std::fs::copy(template, &image).unwrap();
        let delay = Duration::from_micros(rng.gen_range(0..40_000));
        finished += usize::from(put_killed_after(&image, &new, delay));
        let what = format!("round {round}, killed after {delay:?}");
        assert_qemu_check_clean(&image);
        let got = get(&image, &[]);
        assert!(got == old || got == b"new", "{what}: {got:?}");
        if round % 2 == 0 {
            assert_eq!(snapshot_names(&image), ["s1"], "{what}");
            qemu_snapshot("-a", "s1", &image);
            assert_eq!(get(&image, &[]), b"old", "{what}: the snapshot's state");
        }
        assert_eq!(
            sha(&base),
            base_sha,
            "{what}: the backing file is unchanged"
        );
    }
    assert!(
        finished < kills * 2,
        "every put finished before its kill: the kills hit nothing"
    );
}

/// A migration target's claim on a snapshotted image and on an overlay
/// checks the active state, with the key, and writes nothing: a wrong key
/// fails the claim and leaves every file byte-identical.
#[test]
fn a_claim_validates_the_active_state_of_snapshotted_and_overlay_images_writing_nothing() {
    let dir = scratch();
    let d = dir.path();
    let key = key_file(d, "key", 0x11);
    let wrong = key_file(d, "wrong", 0x22);
    let k = ["--key-file", path_str(&key)];
    let snapped = d.join("snapped.qcow2");
    assert_eq!(cli(&["create", path_str(&snapped), k[0], k[1]]).0, 0);
    put(&snapped, b"one", &k);
    qemu_snapshot("-c", "s1", &snapped);
    put(&snapped, b"two", &k);
    qemu_snapshot("-c", "s2", &snapped);
    let (base, overlay) = base_and_overlay(d, &k);
    for image in [&snapped, &overlay] {
        let before = (sha(image), sha(&base));
        let i = path_str(image);
        let (code, _, err) = cli(&["validate-incoming", i, "--key-file", path_str(&wrong)]);
        assert_eq!(code, 5, "{i}: {err}");
        assert_eq!(
            (sha(image), sha(&base)),
            before,
            "{i}: a failed claim writes nothing"
        );
        let (code, _, err) = cli(&["validate-incoming", i, k[0], k[1], "--require", "permall"]);
        assert_eq!(code, 0, "{i}: {err}");
        assert_eq!(
            (sha(image), sha(&base)),
            before,
            "{i}: a claim writes nothing"
        );
    }
    assert_eq!(snapshot_names(&snapped), ["s1", "s2"]);
}

/// Runs QEMU, stopped before the guest starts, with `image` as a drive and
/// `extra` arguments, feeding `monitor` to its human monitor; its output.
fn qemu_stopped(image: &Path, extra: &[&str], monitor: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("qemu-system-x86_64")
        .args([
            "-nodefaults",
            "-nographic",
            "-S",
            "-machine",
            "pc,accel=tcg",
            "-m",
            "64",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=nvram,format=qcow2",
            image.display()
        ))
        .args(["-monitor", "stdio"])
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 is installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(monitor.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "qemu: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// QEMU's `savevm` on a stopped VM stores its VM state in the image, in a
/// snapshot whose L1 table reaches past the virtual disk; tpmstate commits
/// after it, and QEMU still loads that VM state (`-loadvm`, which also takes
/// the disk back to the snapshot).
#[test]
fn a_savevm_snapshot_with_vm_state_survives_commits_and_loads() {
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    assert_eq!(cli(&["create", path_str(&image)]).0, 0);
    put(&image, b"at-savevm", &[]);
    qemu_stopped(&image, &[], "savevm s1\nquit\n");
    let (_, list, _) = qemu_img(&["snapshot", "-l", path_str(&image)]);
    assert!(!list.contains(" 0 B "), "savevm stored VM state: {list}");
    put(&image, b"later", &[]);
    assert_qemu_check_clean(&image);
    assert_eq!(get(&image, &[]), b"later");
    let out = qemu_stopped(&image, &["-loadvm", "s1"], "info status\nquit\n");
    assert!(out.contains("VM status: paused"), "{out}");
    assert_qemu_check_clean(&image);
    assert_eq!(get(&image, &[]), b"at-savevm", "loadvm took the disk back");
    let (code, _, err) = cli(&["snapshot", "delete", path_str(&image), "s1"]);
    assert_eq!(code, 0, "{err}");
    assert_qemu_check_clean(&image);
}

/// A snapshot taken while a writer is released (a migration source that
/// handed the image over, say) moves the area to new clusters; the writer,
/// taking the image back, maps it anew: its commit lands in the active
/// image, and the snapshot keeps its own state.
#[test]
fn a_writer_taking_the_image_back_after_a_snapshot_writes_the_active_image() {
    use tpmstate::{OpenOptions, Store};
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    assert_eq!(cli(&["create", path_str(&image)]).0, 0);
    let mut store = Store::open(&image, OpenOptions::default()).unwrap();
    store.put("permall", b"before").unwrap();
    let released = store.release();
    let (code, _, err) = cli(&["snapshot", "create", path_str(&image), "while-released"]);
    assert_eq!(code, 0, "{err}");
    let mut store = match released.reclaim(Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => panic!("reclaim: {}", e.error()),
    };
    store.put("permall", b"after").unwrap();
    drop(store);
    assert_qemu_check_clean(&image);
    assert_eq!(get(&image, &[]), b"after");
    qemu_snapshot("-a", "while-released", &image);
    assert_eq!(get(&image, &[]), b"before");
}

/// A snapshot refused before anything is written (here: 1-bit refcounts
/// cannot count the second reference to data outside the store area)
/// leaves the writer as it was: it
/// commits on, and the image has no snapshot.
#[test]
fn a_refused_snapshot_leaves_the_writer_committing() {
    use tpmstate::{OpenOptions, Store};
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    qemu_img_create(&image, "refcount_bits=1", "4M");
    assert_eq!(cli(&["format", path_str(&image), "--area", "1M"]).0, 0);
    // Data outside the store area stays shared with a snapshot.
    let (code, out, err) = decode(
        std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 1 3M 64k", path_str(&image)])
            .output()
            .unwrap(),
    );
    assert_eq!(code, 0, "{out}{err}");
    let mut store = Store::open(&image, OpenOptions::default()).unwrap();
    store.put("permall", b"one").unwrap();
    let err = store.create_snapshot("s1").unwrap_err();
    assert_eq!(err.kind(), tpmstate::ErrorKind::Unsupported, "{err}");
    store.put("permall", b"two").unwrap();
    drop(store);
    assert_qemu_check_clean(&image);
    assert!(snapshot_names(&image).is_empty());
    assert_eq!(get(&image, &[]), b"two");
}

/// Overlays on version 2 (compat=0.10) images, and a chain of two.
#[test]
fn version_2_overlays_and_a_chain_of_two_open_and_copy_up() {
    let dir = scratch();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_img_create(&base, "compat=0.10", "4M");
    assert_eq!(cli(&["format", path_str(&base)]).0, 0);
    put(&base, b"base-state", &[]);
    let mut below = base.clone();
    for (name, compat) in [("mid.qcow2", "0.10"), ("top.qcow2", "1.1")] {
        let image = d.join(name);
        let below_name = below.file_name().unwrap().to_str().unwrap().to_string();
        qemu_img_overlay(&below_name, &image, &format!("compat={compat}"));
        assert_eq!(get(&image, &[]), b"base-state", "{name} reads through");
        below = image;
    }
    let before = (sha(&base), sha(&d.join("mid.qcow2")));
    put(&below, b"top-state", &[]);
    assert_eq!(get(&below, &[]), b"top-state");
    assert_eq!((sha(&base), sha(&d.join("mid.qcow2"))), before);
    assert_qemu_check_clean(&below);
}

/// A copy-up copies each of the overlay's clusters whole, with what the
/// backing file holds past its store area too (here: data written at
/// 1040 KiB, behind an unallocated cluster, under 64 KiB overlay clusters
/// over 4 KiB base clusters).
#[test]
fn a_copy_up_keeps_backing_data_past_the_store_area() {
    let dir = scratch();
    let base = dir.path().join("base.qcow2");
    qemu_img_create(&base, "cluster_size=4k", "4M");
    assert_eq!(cli(&["format", path_str(&base), "--area", "1028K"]).0, 0);
    put(&base, b"base-state", &[]);
    let (code, out, err) = decode(
        std::process::Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0xab 1040k 4k",
                path_str(&base),
            ])
            .output()
            .unwrap(),
    );
    assert_eq!(code, 0, "{out}{err}");
    let overlay = dir.path().join("overlay.qcow2");
    qemu_img_overlay("base.qcow2", &overlay, "cluster_size=64k");
    put(&overlay, b"overlay-state", &[]);
    let (code, out, err) = decode(
        std::process::Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-r",
                "-c",
                "read -P 0xab 1040k 4k",
                path_str(&overlay),
            ])
            .output()
            .unwrap(),
    );
    assert!(code == 0 && !out.contains("fail"), "{out}{err}");
    assert_qemu_check_clean(&overlay);
}
