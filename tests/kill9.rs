//! Real power-cut-like interruptions: a child process commits in a loop and is
//! killed with SIGKILL at random moments; every time, the image must reopen at
//! the last commit the child saw returned (or the one it was writing), with
//! exactly that content, and `qemu-img check` must stay clean.

mod common;
use common::*;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::Duration;
use tpmstate::{KeySource, OpenOptions, ReadOnlyStore, Store};

const CHILD_ENV: &str = "TPMSTATE_KILL9_CHILD";

/// The content generation `g` commits: both blobs derived from `g`.
fn content(g: u64) -> (Vec<u8>, Vec<u8>) {
    let len = 1000 + (g as usize * 7919) % 60_000;
    let permall = (0..len).map(|i| (g as usize * 31 + i) as u8).collect();
    let volatile = g.to_le_bytes().repeat(100);
    (permall, volatile)
}

fn key(dir: &Path) -> KeySource {
    KeySource::from_key_file(&dir.join("key")).unwrap()
}

/// Child mode: commit forever, announcing each generation after commit returns.
#[test]
#[ignore = "child-process entry point: its parent test runs it with --ignored"]
fn kill9_child_commit_loop() {
    let Ok(image) = std::env::var(CHILD_ENV) else {
        return;
    };
    let image = Path::new(&image);
    // A process restarting after being killed: the commit it was writing
    // may be torn, which it accepts (and nothing more).
    let opts = OpenOptions {
        key: Some(key(image.parent().unwrap())),
        lock_timeout: Some(Duration::from_secs(5)),
        rollback: tpmstate::RollbackPolicy::AcceptTorn,
        ..Default::default()
    };
    let mut store = Store::open(image, opts).unwrap();
    loop {
        let g = store.generation() + 1;
        let (p, v) = content(g);
        let mut t = store.transaction();
        t.put("permall", &p).unwrap();
        t.put("volatilestate", &v).unwrap();
        assert_eq!(t.commit().unwrap(), g);
        println!("committed {g}");
    }
}

#[test]
fn store_survives_100_sigkills_during_commits() {
    let dir = scratch();
    std::fs::write(dir.path().join("key"), hex::encode([0x5a; 32])).unwrap();
    let image = dir.path().join("nvram.qcow2");
    assert_eq!(
        cli(&[
            "create",
            path_str(&image),
            "--key-file",
            path_str(&dir.path().join("key"))
        ])
        .0,
        0
    );
    // Generation 2 before any kill: a restart accepts a torn commit but
    // never falls back to the empty store, so the first commit must land.
    {
        let opts = OpenOptions {
            key: Some(key(dir.path())),
            ..Default::default()
        };
        let mut store = Store::open(&image, opts).unwrap();
        let (p, v) = content(2);
        let mut t = store.transaction();
        t.put("permall", &p).unwrap();
        t.put("volatilestate", &v).unwrap();
        assert_eq!(t.commit().unwrap(), 2);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b696c6c);
    let mut known = 2u64;
    let mut advanced = 0;
    for round in 0..100 {
        let child = child_test("kill9_child_commit_loop", CHILD_ENV, &image);
        let delay = Duration::from_micros(rng.gen_range(2_000..60_000));
        let announced = kill_after(child, delay, "committed").unwrap_or(known);
        // As a process restarting after a crash opens it: the commit being
        // written when the kill came may be served as torn.
        let opts = OpenOptions {
            key: Some(key(dir.path())),
            rollback: tpmstate::RollbackPolicy::AcceptTorn,
            ..Default::default()
        };
        let store =
            ReadOnlyStore::open(&image, opts).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let g = store.generation();
        // Never older than a commit the child saw return; at most one commit
        // returned-but-unannounced plus the one being written beyond it.
        assert!(
            (announced..=announced + 2).contains(&g),
            "round {round}: opened at {g}, child announced {announced}"
        );
        if g > 1 {
            let (p, v) = content(g);
            assert_eq!(
                &**store.get_required("permall").unwrap(),
                &p[..],
                "round {round}"
            );
            assert_eq!(
                &**store.get_required("volatilestate").unwrap(),
                &v[..],
                "round {round}"
            );
        }
        store.check().unwrap();
        drop(store);
        assert_qemu_check_clean(&image);
        advanced += usize::from(g > known);
        known = g;
    }
    assert!(
        advanced > 50,
        "the child must commit in most rounds ({advanced})"
    );
}
