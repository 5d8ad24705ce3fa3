//! Migration on shared storage: the source releases, the target claims under
//! an exclusive lock and validates everything; a failed claim writes nothing,
//! leaves no lock, and the source takes the image back.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tpmstate::migration::{self, ClaimOptions, Incoming, MigrationError};
use tpmstate::{
    ErrorKind, Key, KeySource, Locking, OpenOptions, ReclaimError, Store, StoreError, StoreView,
};

const TARGET_ENV: &str = "TPMSTATE_MIGRATION_TARGET";

fn key(byte: u8) -> KeySource {
    KeySource::Key(Key::from_bytes(&[byte; 32]).unwrap())
}

/// An encrypted image with permall/volatilestate/savestate, open as the source.
fn source(dir: &Path) -> (PathBuf, Store) {
    let img = dir.join("nvram.qcow2");
    let k = key_file(dir, "key", 0x42);
    assert_eq!(
        cli(&["create", path_str(&img), "--key-file", path_str(&k)]).0,
        0
    );
    let mut store = Store::open(
        &img,
        OpenOptions {
            key: Some(key(0x42)),
            ..Default::default()
        },
    )
    .unwrap();
    for round in 0..3u8 {
        let blobs = [
            ("permall", vec![round; 20_000]),
            ("volatilestate", vec![round + 1; 3000]),
            ("savestate", vec![round + 2; 100]),
        ];
        let mut t = store.transaction();
        for (name, data) in &blobs {
            t.put(name, data).unwrap();
        }
        t.commit().unwrap();
    }
    (img, store)
}

fn claim(img: &Path, opts: ClaimOptions<'_>) -> Result<Store, MigrationError> {
    Incoming::open_deferred(img, Locking::Auto)?.claim(opts)
}

fn holders(img: &Path) -> Vec<tpmstate::lock::Holder> {
    let key = tpmstate::lock::file_key(&std::fs::File::open(img).unwrap()).unwrap();
    tpmstate::lock::scan_holders(&key, None)
}

/// Child: claims the image as a migration target, commits, holds it until stdin closes.
#[test]
#[ignore = "child-process entry point: its parent test runs it with --ignored"]
fn migration_target_child() {
    let Ok(image) = std::env::var(TARGET_ENV) else {
        return;
    };
    let mut store = claim(
        Path::new(&image),
        ClaimOptions {
            key: Some(key(0x42)),
            ..Default::default()
        },
    )
    .unwrap();
    store.put("target-was-here", b"1").unwrap();
    println!("claimed");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

#[test]
fn target_process_claims_after_source_release_and_source_reclaim_then_names_it() {
    let dir = scratch();
    let (img, src) = source(dir.path());
    let src = migration::release_outgoing(src).unwrap();
    let mut target = child_test("migration_target_child", TARGET_ENV, &img)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(target.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.unwrap().contains("claimed")),
        "target did not claim"
    );
    let ReclaimError::StillReleased(src, err) =
        src.reclaim(Duration::from_millis(100)).unwrap_err()
    else {
        panic!("reclaim must leave the handle released while the target holds the image")
    };
    assert!(
        err.to_string().contains(&target.id().to_string()),
        "reclaim must name the target: {err}"
    );
    drop(target.stdin.take());
    assert!(target.wait().unwrap().success());
    // The target committed: the source's state is stale and it must not continue.
    let err = src.reclaim(Duration::from_millis(100)).unwrap_err();
    assert!(
        matches!(
            err,
            ReclaimError::StillReleased(_, StoreError::Diverged { .. })
        ),
        "{err:?}"
    );
    assert!(holders(&img).is_empty());
}

/// What the source can do after the failed claim.
#[derive(PartialEq)]
enum Aftermath {
    /// The image is as it left it: reclaim and continue.
    Continue,
    /// Its generation was damaged: reclaim reports it and keeps the lock; the
    /// source rewrites every blob from its TPM's memory and continues.
    Repair,
    /// The qcow2 file itself was cut short: reclaim reports the damage.
    Lost,
}

struct Case {
    name: &'static str,
    after: Aftermath,
    damage: fn(&Path, &StoreView),
    opts: fn() -> ClaimOptions<'static>,
    expect: fn(&MigrationError) -> bool,
}

fn with_key() -> ClaimOptions<'static> {
    ClaimOptions {
        key: Some(key(0x42)),
        timeout: Some(Duration::from_millis(200)),
        ..Default::default()
    }
}

fn blob_at(store: &StoreView, name: &str) -> u64 {
    store
        .list()
        .into_iter()
        .find(|b| b.name == name)
        .unwrap()
        .area_offset
}

fn current_slot(store: &StoreView) -> u64 {
    let s = store
        .info()
        .slots
        .into_iter()
        .find(|s| s.status.contains("current"))
        .unwrap();
    s.index as u64 * 4096
}

fn flip_guest(img: &Path, guest: u64) {
    flip(img, host_offset(img, guest), 0x10);
}

#[test]
fn every_failed_claim_has_its_own_error_writes_nothing_leaves_no_lock_and_source_reclaims() {
    let cases = [
        Case {
            name: "wrong key",
            after: Aftermath::Continue,
            damage: |_, _| {},
            opts: || ClaimOptions {
                key: Some(key(0x43)),
                ..with_key()
            },
            expect: |e| e.kind() == ErrorKind::WrongKey,
        },
        Case {
            name: "no key",
            after: Aftermath::Continue,
            damage: |_, _| {},
            opts: || ClaimOptions {
                key: None,
                ..with_key()
            },
            expect: |e| e.kind() == ErrorKind::KeyMissing,
        },
        Case {
            name: "flipped blob",
            after: Aftermath::Repair,
            damage: |img, s| flip_guest(img, blob_at(s, "permall") + 100),
            opts: with_key,
            expect: |e| matches!(e, MigrationError::Slot { status, .. } if status.contains("blob \"permall\"")),
        },
        Case {
            name: "flipped header",
            after: Aftermath::Repair,
            damage: |img, s| flip_guest(img, current_slot(s) + 20),
            opts: with_key,
            expect: |e| matches!(e, MigrationError::Slot { status, .. } if status.contains("header checksum")),
        },
        Case {
            name: "flipped directory",
            after: Aftermath::Repair,
            damage: |img, s| {
                let slot = tpmstate::store::dump_headers_of(s)
                    .into_iter()
                    .find(|x| x.generation == s.generation())
                    .unwrap();
                flip_guest(img, slot.directory.offset + 3)
            },
            opts: with_key,
            expect: |e| matches!(e, MigrationError::Slot { status, .. } if status.contains("directory")),
        },
        Case {
            name: "truncated image",
            after: Aftermath::Lost,
            damage: |img, _| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(img)
                    .unwrap()
                    .set_len(200_000)
                    .unwrap()
            },
            opts: with_key,
            expect: |e| e.kind() == ErrorKind::Corrupt,
        },
        Case {
            name: "required blob missing",
            after: Aftermath::Continue,
            damage: |_, _| {},
            opts: || ClaimOptions {
                required: vec!["permall".into(), "nvram-extra".into()],
                ..with_key()
            },
            expect: |e| matches!(e, MigrationError::MissingBlob { name, .. } if name == "nvram-extra"),
        },
        Case {
            name: "rejected by the caller's check",
            after: Aftermath::Continue,
            damage: |_, _| {},
            opts: || ClaimOptions {
                validate: Some(&|name, data| {
                    if name == "savestate" && data[0] == 4 {
                        Err("bad state".into())
                    } else {
                        Ok(())
                    }
                }),
                ..with_key()
            },
            expect: |e| matches!(e, MigrationError::Rejected { name, .. } if name == "savestate"),
        },
        Case {
            name: "newer format version",
            after: Aftermath::Repair,
            damage: |img, s| {
                let at = host_offset(img, current_slot(s));
                let mut bytes = std::fs::read(img).unwrap();
                let at = at as usize;
                bytes[at + 8] = 9;
                let crc = crc32c::crc32c(&bytes[at..at + 508]);
                bytes[at + 508..at + 512].copy_from_slice(&crc.to_le_bytes());
                std::fs::write(img, bytes).unwrap();
            },
            opts: with_key,
            expect: |e| e.kind() == ErrorKind::Unsupported && full_message(e).contains("newer"),
        },
    ];
    for case in cases {
        let dir = scratch();
        let (img, src) = source(dir.path());
        let src = migration::release_outgoing(src).unwrap();
        (case.damage)(&img, &src);
        let before = (
            sha(&img),
            std::fs::metadata(&img).unwrap().modified().unwrap(),
        );
        std::thread::sleep(Duration::from_millis(20));
        let err = claim(&img, (case.opts)()).map(|_| ()).unwrap_err();
        assert!(
            (case.expect)(&err),
            "{}: unexpected error: {err}",
            case.name
        );
        assert!(
            err.to_string().contains(path_str(&img)) || matches!(err, MigrationError::Store(_)),
            "{}: {err}",
            case.name
        );
        let after = (
            sha(&img),
            std::fs::metadata(&img).unwrap().modified().unwrap(),
        );
        assert!(
            before == after,
            "{}: the failed claim changed the image",
            case.name
        );
        assert!(
            holders(&img).is_empty(),
            "{}: a lock remains: {:?}",
            case.name,
            holders(&img)
        );
        match case.after {
            Aftermath::Continue => {
                let mut src = src
                    .reclaim(Duration::from_secs(1))
                    .unwrap_or_else(|e| panic!("{}: reclaim: {e:?}", case.name));
                src.put("permall", b"source keeps running").unwrap();
                assert_eq!(
                    &**src.get("permall").unwrap().unwrap(),
                    b"source keeps running"
                );
            }
            Aftermath::Repair => {
                let err = src.reclaim(Duration::from_secs(1)).unwrap_err();
                let ReclaimError::Damaged(mut src, StoreError::DamagedWhileReleased { .. }) = err
                else {
                    panic!("{}: {err:?}", case.name)
                };
                assert_eq!(
                    src.lock_held(),
                    Some(tpmstate::LockMode::Writer),
                    "{}: lock kept",
                    case.name
                );
                let names = ["permall", "volatilestate", "savestate"];
                let memory = names.map(|name| format!("{name} from the TPM's memory"));
                let mut t = src.transaction();
                for (name, data) in names.iter().zip(&memory) {
                    t.put(name, data.as_bytes()).unwrap();
                }
                t.commit().unwrap();
                src.put("volatilestate", b"and later commits").unwrap();
                drop(src);
                let reopened = Store::open(
                    &img,
                    OpenOptions {
                        key: Some(key(0x42)),
                        ..Default::default()
                    },
                )
                .unwrap_or_else(|e| panic!("{}: after repair: {e}", case.name));
                assert_eq!(
                    &**reopened.get_required("permall").unwrap(),
                    b"permall from the TPM's memory"
                );
                assert_eq!(
                    &**reopened.get_required("volatilestate").unwrap(),
                    b"and later commits"
                );
                reopened.check().unwrap();
                drop(reopened);
                assert_qemu_check_clean(&img);
            }
            Aftermath::Lost => {
                let err = src.reclaim(Duration::from_secs(1)).unwrap_err();
                assert!(
                    matches!(
                        err,
                        ReclaimError::Damaged(_, StoreError::DamagedWhileReleased { .. })
                    ),
                    "{}: {err:?}",
                    case.name
                );
            }
        }
    }
}

#[test]
fn claim_waits_for_the_source_and_names_it_after_the_timeout() {
    let dir = scratch();
    let (img, src) = source(dir.path());
    let t = Instant::now();
    let (code, _, err) = cli(&[
        "validate-incoming",
        path_str(&img),
        "--key-file",
        path_str(&dir.path().join("key")),
        "--timeout-ms",
        "300",
    ]);
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(code, 6, "{err}");
    assert!(
        err.contains(&std::process::id().to_string()),
        "must name the source pid: {err}"
    );
    drop(src);
}

#[test]
fn claim_succeeds_when_the_source_releases_during_the_wait() {
    let dir = scratch();
    let (img, src) = source(dir.path());
    let img2 = img.clone();
    let waiter = std::thread::spawn(move || {
        claim(
            &img2,
            ClaimOptions {
                timeout: Some(Duration::from_secs(3)),
                ..with_key()
            },
        )
        .map(|s| s.generation())
    });
    std::thread::sleep(Duration::from_millis(150));
    let src = migration::release_outgoing(src).unwrap();
    let generation = src.generation();
    assert_eq!(waiter.join().unwrap().unwrap(), generation);
}

#[test]
fn claimed_store_is_active_in_writer_mode_with_exactly_the_committed_content() {
    let dir = scratch();
    let (img, src) = source(dir.path());
    drop(migration::release_outgoing(src).unwrap());
    let mut store = claim(
        &img,
        ClaimOptions {
            required: vec!["permall".into(), "volatilestate".into(), "savestate".into()],
            ..with_key()
        },
    )
    .unwrap();
    assert_eq!(store.lock_held(), Some(tpmstate::LockMode::Writer));
    assert_eq!(
        &**store.get("permall").unwrap().unwrap(),
        &vec![2u8; 20_000][..]
    );
    store.put("permall", b"new host").unwrap();
    let (code, _, _) = qemu_img(&["info", path_str(&img)]);
    assert_ne!(code, 0, "the target holds the image like a read-write QEMU");
    drop(store);
    assert_qemu_check_clean(&img);
}

#[test]
fn validate_incoming_cli_reports_codes_and_releases() {
    let dir = scratch();
    let (img, src) = source(dir.path());
    let src = migration::release_outgoing(src).unwrap();
    let i = path_str(&img);
    let k = dir.path().join("key");
    let (code, out, err) = cli(&[
        "validate-incoming",
        i,
        "--key-file",
        path_str(&k),
        "--require",
        "permall,volatilestate",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"), "{out}");
    assert_eq!(cli(&["validate-incoming", i]).0, 4);
    let bad = key_file(dir.path(), "bad", 0x99);
    assert_eq!(
        cli(&["validate-incoming", i, "--key-file", path_str(&bad)]).0,
        5
    );
    assert_eq!(
        cli(&[
            "validate-incoming",
            i,
            "--key-file",
            path_str(&k),
            "--require",
            "nope"
        ])
        .0,
        3
    );
    assert!(holders(&img).is_empty());
    src.reclaim(Duration::from_secs(1)).unwrap();
}

mod property {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

        #[test]
        fn claim_returns_exactly_the_committed_content_or_fails(
            blobs in prop::collection::btree_map("[a-z]{1,8}", prop::collection::vec(any::<u8>(), 0..30_000), 1..5),
            in_store_area in any::<bool>(),
            position in any::<u64>(),
            mask in 1u8..=255,
        ) {
            let dir = scratch();
            let img = dir.path().join("p.qcow2");
            Store::create(&img, Default::default(), tpmstate::store::FormatOptions { key: Some(key(7)), ..Default::default() }).unwrap();
            let mut s = Store::open(&img, OpenOptions { key: Some(key(7)), ..Default::default() }).unwrap();
            let mut t = s.transaction();
            for (name, data) in &blobs {
                t.put(name, data).unwrap();
            }
            t.commit().unwrap();
            let used = s.info().used_bytes + 16 * 1024;
            drop(migration::release_outgoing(s).unwrap());
            let at = if in_store_area {
                host_offset(&img, position % used)
            } else {
                position % std::fs::metadata(&img).unwrap().len()
            };
            flip(&img, at, mask);
            match claim(&img, ClaimOptions { key: Some(key(7)), ..Default::default() }) {
                Ok(store) => {
                    let got: std::collections::BTreeMap<String, Vec<u8>> =
                        store.names().map(|n| (n.to_string(), store.get(n).unwrap().unwrap().to_vec())).collect();
                    prop_assert_eq!(got, blobs);
                }
                Err(_) => prop_assert!(holders(&img).is_empty()),
            }
        }
    }
}

#[test]
fn claim_refuses_an_image_whose_newest_chained_generation_does_not_verify() {
    let dir = scratch();
    let (img, src) = source(dir.path());
    // No hand-over: the newest generation is a chained commit.
    assert!(src.info().chained_commits > 0);
    let blob = blob_at(&src, "permall");
    drop(src);
    flip_guest(&img, blob + 100);
    let before = sha(&img);
    let err = claim(&img, with_key()).map(|_| ()).unwrap_err();
    assert!(
        matches!(&err, MigrationError::Unsettled { what, .. } if what.contains("does not verify")),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert_eq!(sha(&img), before, "a failed claim writes nothing");
    assert!(holders(&img).is_empty());
}
