//! Two hosts, one image. Locally: two writers that both believe they hold
//! the image (locking off, as after a lost lock) cannot both commit: the
//! second is refused before it writes. On a real GlusterFS volume mounted
//! by two simulated hosts (network namespaces, see `common::gluster`):
//! locks exclude across hosts, reads after a lock see the other host's
//! commits, migration crosses hosts, a partitioned writer never commits
//! beside the new one, and kill -9 mid-commit leaves a committed state.

mod common;
use common::*;
use std::path::Path;
use tpmstate::{ErrorKind, Locking, OpenOptions, Store};

fn writer(image: &Path, locking: Locking) -> Store {
    Store::open(
        image,
        OpenOptions {
            locking,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

#[test]
fn a_second_writer_that_missed_a_commit_is_refused_before_it_writes() {
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    assert_eq!(cli(&["create", path_str(&image)]).0, 0);
    let mut a = writer(&image, Locking::Off);
    let mut b = writer(&image, Locking::Off);
    a.put("permall", b"from a").unwrap();
    let before = sha(&image);
    let err = b.put("permall", b"from b").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("image changed under us") && text.contains(path_str(&image)),
        "{text}"
    );
    assert_eq!(sha(&image), before, "nothing was written");
    let again = b.put("permall", b"again").unwrap_err();
    assert_eq!(again.kind(), ErrorKind::Io, "poisoned: {again}");
    // A chain of commits, and an anchored one, are seen the same way.
    for _ in 0..40 {
        a.put("permall", b"more from a").unwrap();
    }
    let mut c = writer(&image, Locking::Off);
    for _ in 0..40 {
        a.put("permall", b"and more").unwrap();
        let err = c.put("permall", b"from c").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
        c = writer(&image, Locking::Off);
    }
    drop((a, b, c));
    assert_qemu_check_clean(&image);
    assert_eq!(
        cli(&["get", path_str(&image), "permall"]).1.as_bytes(),
        b"and more"
    );
}

/// What another writer does to the image while this one believes it holds
/// it: commits a blob, takes a snapshot (which moves the area's clusters),
/// or formats a new store. This writer's next commit, even one that must
/// first grow the area, is refused before anything is written.
#[test]
fn a_writer_that_missed_any_change_is_refused_before_it_writes_even_a_growth() {
    type Change = fn(&Path, &mut Store);
    let changes: [(&str, Change); 3] = [
        ("a commit", |_, other| {
            other.put("permall", b"from the other").unwrap();
        }),
        ("a snapshot", |_, other| {
            other.create_snapshot("s1").unwrap();
            other.put("permall", b"after the snapshot").unwrap();
        }),
        ("a new store", |image, _| {
            let (code, _, err) = cli(&["format", path_str(image), "--force", "--locking", "off"]);
            assert_eq!(code, 0, "{err}");
        }),
    ];
    for (what, change) in changes {
        let dir = scratch();
        let image = dir.path().join("nvram.qcow2");
        qemu_img_create(&image, "cluster_size=64k", "16M");
        assert_eq!(cli(&["format", path_str(&image), "--area", "1M"]).0, 0);
        let mut a = writer(&image, Locking::Off);
        a.put("permall", b"from a").unwrap();
        {
            let mut other = writer(&image, Locking::Off);
            change(&image, &mut other);
        }
        let before = sha(&image);
        // 2 MiB: more than the 1 MiB area, so the commit must grow it first.
        let err = a.put("big", &vec![7u8; 2 << 20]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Locked, "{what}: {err}");
        assert!(
            err.to_string().contains("image changed under us"),
            "{what}: {err}"
        );
        assert_eq!(
            sha(&image),
            before,
            "{what}: nothing was written, not even a growth"
        );
        drop(a);
        assert_qemu_check_clean(&image);
    }
}

use common::gluster::{Bed, OPTIONS};
use std::time::{Duration, Instant};
use tpmstate::migration::{self, ClaimOptions, Incoming};
use tpmstate::{KeySource, RollbackPolicy};

const CHILD: &str = "TPMSTATE_SHARED_CHILD";

fn key(dir: &Path) -> KeySource {
    KeySource::from_key_file(&key_file(dir, "key", 0x61)).unwrap()
}

fn open_with(
    image: &Path,
    key: Option<KeySource>,
    timeout: Duration,
) -> Result<Store, tpmstate::StoreError> {
    Store::open(
        image,
        OpenOptions {
            key,
            lock_timeout: Some(timeout),
            rollback: RollbackPolicy::AcceptTorn,
            ..OpenOptions::default()
        },
    )
}

/// Child mode: a writer on the image in `TPMSTATE_SHARED_CHILD` that
/// commits the numbers 1, 2, ... as `permall` and announces each
/// (`committed N`) until it is killed.
#[test]
#[ignore = "child mode of the shared-storage tests"]
fn child_writer() {
    let Some(image) = std::env::var_os(CHILD) else {
        return;
    };
    let dir = Path::new(&image).parent().unwrap().to_path_buf();
    let mut store = open_with(Path::new(&image), Some(key(&dir)), Duration::from_secs(10)).unwrap();
    for n in 1u64.. {
        store.put("permall", n.to_string().as_bytes()).unwrap();
        println!("committed {n}");
    }
}

/// The file's hash, read past this host's page cache (which a FUSE mount
/// does not invalidate when the other host writes).
fn fresh_sha(path: &Path) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    nix::fcntl::posix_fadvise(
        file.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
    drop(file);
    sha(path)
}

/// Flips bit 2 of the byte at `at` of `path`, durably.
fn flip_synced(path: &Path, at: u64) {
    flip(path, at, 0x04);
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .sync_all()
        .unwrap();
}

fn permall(store: &tpmstate::StoreView) -> String {
    String::from_utf8(store.get("permall").unwrap().unwrap().to_vec()).unwrap()
}

#[test]
fn two_hosts_on_one_glusterfs_volume() {
    let Some(bed) = Bed::up(&OPTIONS) else {
        return;
    };
    let (on_a, on_b) = store_on(&bed, "nvram.qcow2");
    let key_on_b = || Some(KeySource::from_key_file(&bed.b.join("key")).unwrap());
    locks_exclude_across_hosts(&on_a, &on_b, &bed.b.join("key"));
    reads_after_a_lock_see_the_other_hosts_commits(&on_a, &on_b, &key_on_b);
    migration_crosses_hosts(&on_a, &on_b, &key_on_b);
    kill_9_on_a_leaves_b_a_committed_state(&on_a, &on_b, &key_on_b);
    a_partitioned_writer_never_commits_beside_the_new_one(&bed, true);
    drop(bed);
    // The volume without strict locks: what tpmstate itself detects.
    let loose: Vec<_> = OPTIONS
        .into_iter()
        .filter(|(o, _)| *o != "client.strict-locks")
        .collect();
    let Some(bed) = Bed::up(&loose) else {
        return;
    };
    a_partitioned_writer_never_commits_beside_the_new_one(&bed, false);
}

/// A new encrypted store on the volume, as host A and host B name it.
fn store_on(bed: &Bed, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (on_a, on_b) = (bed.a.join(name), bed.b.join(name));
    let k = key_file(&bed.a, "key", 0x61);
    assert_eq!(
        cli(&["create", path_str(&on_a), "--key-file", path_str(&k)]).0,
        0
    );
    (on_a, on_b)
}

fn locks_exclude_across_hosts(on_a: &Path, on_b: &Path, key_b: &Path) {
    let mut holder = tpmstate()
        .args([
            "lock",
            path_str(on_a),
            "--mode",
            "writer",
            "--",
            "sleep",
            "60",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let b = path_str(on_b);
    for args in [
        vec![
            "put",
            b,
            "permall",
            "/dev/null",
            "--key-file",
            path_str(key_b),
        ],
        vec!["info", b],
        vec![
            "validate-incoming",
            b,
            "--key-file",
            path_str(key_b),
            "--timeout-ms",
            "300",
        ],
    ] {
        let (code, _, err) = cli(&args);
        assert_eq!(code, 6, "{args:?} on host B: {err}");
        assert!(err.contains(b), "{err}");
    }
    let (code, _, err) = qemu_img(&["info", b]);
    assert_ne!(code, 0, "qemu-img on host B: {err}");
    assert!(err.contains("lock"), "{err}");
    let _ = holder.kill();
    let _ = holder.wait();
    let (code, _, err) = cli(&[
        "validate-incoming",
        b,
        "--key-file",
        path_str(key_b),
        "--timeout-ms",
        "5000",
    ]);
    assert_eq!(code, 0, "after A let go, B claims: {err}");
}

fn reads_after_a_lock_see_the_other_hosts_commits(
    on_a: &Path,
    on_b: &Path,
    key_b: &dyn Fn() -> Option<KeySource>,
) {
    let mut a = open_with(
        on_a,
        Some(key(on_a.parent().unwrap())),
        Duration::from_secs(5),
    )
    .unwrap();
    let mut a_released;
    for n in 0..20 {
        a.put("permall", format!("stale-check {n}").as_bytes())
            .unwrap();
        a_released = migration::release_outgoing(a).unwrap();
        // The hand-over may settle the image with one more commit.
        let g = a_released.generation();
        let b = tpmstate::ReadOnlyStore::open(
            on_b,
            OpenOptions {
                key: key_b(),
                lock_timeout: Some(Duration::from_secs(5)),
                ..OpenOptions::default()
            },
        )
        .unwrap();
        assert_eq!(b.generation(), g, "B right after A's commit {n}");
        assert_eq!(permall(&b), format!("stale-check {n}"));
        drop(b);
        a = match a_released.reclaim(Duration::from_secs(5)) {
            Ok(s) => s,
            Err(e) => panic!("A reclaims: {}", e.error()),
        };
    }
}

fn migration_crosses_hosts(on_a: &Path, on_b: &Path, key_b: &dyn Fn() -> Option<KeySource>) {
    let mut source = open_with(
        on_a,
        Some(key(on_a.parent().unwrap())),
        Duration::from_secs(5),
    )
    .unwrap();
    source.put("permall", b"migrating").unwrap();
    let released = migration::release_outgoing(source).unwrap();
    let before = fresh_sha(on_b);
    let wrong = KeySource::from_key_file(&key_file(on_b.parent().unwrap(), "wrong", 0x62)).unwrap();
    let failed = Incoming::open_deferred(on_b, tpmstate::Locking::Auto)
        .unwrap()
        .claim(ClaimOptions {
            key: Some(wrong),
            ..ClaimOptions::default()
        })
        .unwrap_err();
    assert_eq!(failed.kind(), ErrorKind::WrongKey, "{failed}");
    let missing = Incoming::open_deferred(on_b, tpmstate::Locking::Auto)
        .unwrap()
        .claim(ClaimOptions {
            key: key_b(),
            required: vec!["volatilestate".into()],
            ..ClaimOptions::default()
        })
        .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::Corrupt, "{missing}");
    assert_eq!(fresh_sha(on_b), before, "failed claims write nothing");
    // A corrupt image: one bit of permall's ciphertext, flipped on host A,
    // fails host B's claim and is put back for the source.
    let blob = released
        .list()
        .into_iter()
        .find(|b| b.name == "permall")
        .unwrap()
        .area_offset;
    let at = host_offset(on_a, blob + 3);
    flip_synced(on_a, at);
    let damaged = fresh_sha(on_b);
    assert_ne!(damaged, before, "host B sees host A's flip");
    let corrupt = Incoming::open_deferred(on_b, tpmstate::Locking::Auto)
        .unwrap()
        .claim(ClaimOptions {
            key: key_b(),
            ..ClaimOptions::default()
        })
        .unwrap_err();
    assert_eq!(corrupt.kind(), ErrorKind::Corrupt, "{corrupt}");
    assert_eq!(fresh_sha(on_b), damaged, "a failed claim writes nothing");
    flip_synced(on_a, at);
    assert_eq!(fresh_sha(on_b), before);
    let source = match released.reclaim(Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => panic!("the source reclaims after failed claims: {}", e.error()),
    };
    let released = migration::release_outgoing(source).unwrap();
    let target = Incoming::open_deferred(on_b, tpmstate::Locking::Auto)
        .unwrap()
        .claim(ClaimOptions {
            key: key_b(),
            required: vec!["permall".into()],
            ..ClaimOptions::default()
        })
        .unwrap();
    assert_eq!(permall(&target), "migrating");
    drop(released);
    drop(target);
    assert_qemu_check_clean(on_b);
}

fn kill_9_on_a_leaves_b_a_committed_state(
    on_a: &Path,
    on_b: &Path,
    key_b: &dyn Fn() -> Option<KeySource>,
) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6c_75_73);
    let kills = std::env::var("TPMSTATE_SHARED_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let mut landed = 0;
    for round in 0..kills {
        let child = child_test("child_writer", CHILD, on_a);
        let delay = Duration::from_millis(rng.gen_range(100..400));
        let acked = kill_after(child, delay, "committed");
        let b = open_with(on_b, key_b(), Duration::from_secs(10)).unwrap();
        let text = permall(&b);
        let found: u64 = text.parse().unwrap_or(0);
        if let Some(acked) = acked {
            assert!(
                found == acked || found == acked + 1,
                "round {round}: B finds {text:?}, A acknowledged {acked}"
            );
            landed += 1;
        }
        drop(b);
        assert_qemu_check_clean(on_b);
    }
    assert!(
        landed * 2 >= kills,
        "most rounds committed something before the kill"
    );
    eprintln!("kill -9 on host A: {kills} rounds, {landed} with acknowledged commits");
}

/// Host A holds the image as a writer and commits; A's link is cut; B
/// claims the image once the server has let A's lock go, and commits; A's
/// link comes back, and A's next commit is refused: by the file system
/// (strict locks: the descriptor that held the lock is dead), or by
/// tpmstate's check before each commit (a newer generation on disk: "image
/// changed under us"). Never two writers committing.
fn a_partitioned_writer_never_commits_beside_the_new_one(bed: &Bed, strict: bool) {
    let (on_a, on_b) = store_on(bed, "partitioned.qcow2");
    let mut a = open_with(&on_a, Some(key(&bed.a)), Duration::from_secs(5)).unwrap();
    a.put("permall", b"before the cut").unwrap();
    bed.link('a', false);
    let cut = Instant::now();
    let mut b = Incoming::open_deferred(&on_b, tpmstate::Locking::Auto)
        .unwrap()
        .claim(ClaimOptions {
            key: Some(KeySource::from_key_file(&bed.b.join("key")).unwrap()),
            timeout: Some(Duration::from_secs(60)),
            ..ClaimOptions::default()
        })
        .unwrap_or_else(|e| panic!("B claims once A's lock is gone: {e}"));
    let waited = cut.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "B got the lock only once A's was gone: {waited:?}"
    );
    b.put("permall", b"from b after the cut").unwrap();
    bed.link('a', true);
    // A's client reconnects: A's commit must then be refused for what it
    // is, not for a link that is still down.
    std::thread::sleep(Duration::from_secs(12));
    let late = a.put("permall", b"from a after the cut");
    eprintln!(
        "strict locks {strict}: B claimed {waited:?} after the cut; A's next commit: {late:?}"
    );
    let err = late.expect_err("A committed beside B");
    if !strict {
        assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
        assert!(err.to_string().contains("image changed under us"), "{err}");
    }
    drop(a);
    assert_eq!(permall(&b), "from b after the cut");
    drop(b);
    assert_qemu_check_clean(&on_b);
}
