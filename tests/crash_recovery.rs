//! Crash safety on the crash-simulating disk: every write and sync of random
//! transaction sequences is a crash point; after each crash the store must
//! open at the last commit whose sync returned or at the one being written.

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use tpmstate::image::{CrashDisk, CrashPlan, SharedDisk};
use tpmstate::{Key, KeySource, Store};

type Model = BTreeMap<String, Vec<u8>>;
type Txn = Vec<(u8, Option<(usize, u8)>)>;

const NAMES: [&str; 4] = ["permall", "volatilestate", "savestate", "extra"];
const AREA: u64 = 96 * 1024;
const MAX_AREA: u64 = 512 * 1024;

fn mem() -> &'static Path {
    Path::new("<memory>")
}

fn fresh(key: Option<&KeySource>) -> CrashDisk {
    fresh_with_area(key, AREA)
}

fn fresh_with_area(key: Option<&KeySource>, area: u64) -> CrashDisk {
    let mut d = CrashDisk::new(area, MAX_AREA);
    Store::format_disk(&mut d, mem(), area, key).unwrap();
    d
}

fn apply(model: &Model, txn: &Txn) -> Model {
    let mut m = model.clone();
    for (n, change) in txn {
        let name = NAMES[*n as usize % NAMES.len()].to_string();
        match change {
            Some((len, fill)) => m.insert(name, vec![*fill; *len]),
            None => m.remove(&name),
        };
    }
    m
}

fn contents(store: &Store) -> Model {
    store
        .names()
        .map(|n| (n.to_string(), store.get(n).unwrap().unwrap().to_vec()))
        .collect()
}

fn run_txn(store: &mut Store, txn: &Txn) -> Result<u64, tpmstate::StoreError> {
    let data: Vec<Option<Vec<u8>>> = txn
        .iter()
        .map(|(_, change)| change.map(|(len, fill)| vec![fill; len]))
        .collect();
    let mut t = store.transaction();
    for ((n, _), change) in txn.iter().zip(&data) {
        let name = NAMES[*n as usize % NAMES.len()];
        match change {
            Some(bytes) => t.put(name, bytes)?,
            None => t.delete(name)?,
        }
    }
    t.commit()
}

/// Runs `txns` on a copy of `base` (holding `start`) that crashes at
/// operation `crash_at`; returns the crashed disk, the last committed model
/// and the in-progress one.
fn run_until_crash(
    base: &CrashDisk,
    start: &Model,
    key: Option<&KeySource>,
    txns: &[Txn],
    crash_at: u64,
) -> (CrashDisk, Model, Option<Model>) {
    let mut disk = base.clone();
    disk.crash_at(crash_at);
    let mut committed = start.clone();
    let shared = SharedDisk::new(disk);
    let mut store = Store::open_disk(Box::new(shared.clone()), mem(), key).unwrap();
    let mut in_progress = None;
    for txn in txns {
        let next = apply(&committed, txn);
        match run_txn(&mut store, txn) {
            Ok(_) => committed = next,
            Err(_) => {
                in_progress = Some(next);
                break;
            }
        }
    }
    drop(store);
    let disk = shared.with(|d| d.clone());
    (disk, committed, in_progress)
}

fn txn_strategy() -> impl Strategy<Value = Txn> {
    prop::collection::vec(
        (
            0u8..4,
            prop::option::weighted(0.8, (0usize..40_000, any::<u8>())),
        ),
        1..4,
    )
}

fn check_all_crash_points(key: Option<KeySource>, txns: Vec<Txn>, seed: u64) {
    check_all_crash_points_from(&fresh(key.as_ref()), &Model::new(), key, txns, seed);
}

/// Operations `txns` issue on a copy of `base`, crash-free.
fn ops_of(base: &CrashDisk, start: &Model, key: Option<&KeySource>, txns: &[Txn]) -> u64 {
    let (d, _, _) = run_until_crash(base, start, key, txns, u64::MAX);
    d.ops() - base.ops()
}

fn check_all_crash_points_from(
    base: &CrashDisk,
    start: &Model,
    key: Option<KeySource>,
    txns: Vec<Txn>,
    seed: u64,
) {
    let total = ops_of(base, start, key.as_ref(), &txns);
    for crash_at in 0..=total {
        let (crashed, committed, in_progress) =
            run_until_crash(base, start, key.as_ref(), &txns, crash_at);
        for plan in [
            CrashPlan::DurableOnly,
            CrashPlan::AllWritten,
            CrashPlan::Random(seed ^ crash_at),
            CrashPlan::TornSectors(seed ^ crash_at),
        ] {
            let after = crashed.after_crash(plan);
            let mut store =
                Store::open_disk(Box::new(after), mem(), key.as_ref()).unwrap_or_else(|e| {
                    panic!("crash at op {crash_at} ({plan:?}): store does not open: {e}")
                });
            let got = contents(&store);
            assert!(
                got == committed || Some(&got) == in_progress.as_ref(),
                "crash at op {crash_at} ({plan:?}): content is neither the last commit nor the one in progress"
            );
            store.check().unwrap();
            // The recovered store keeps working.
            let mut t = store.transaction();
            t.put("after-crash", b"x").unwrap();
            t.commit().unwrap();
            assert_eq!(&**store.get("after-crash").unwrap().unwrap(), b"x");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn plaintext_store_opens_at_last_or_in_progress_commit_after_any_crash(
        txns in prop::collection::vec(txn_strategy(), 1..6), seed in any::<u64>()
    ) {
        check_all_crash_points(None, txns, seed);
    }

    #[test]
    fn encrypted_store_opens_at_last_or_in_progress_commit_after_any_crash(
        txns in prop::collection::vec(txn_strategy(), 1..5), seed in any::<u64>()
    ) {
        check_all_crash_points(Some(KeySource::Key(Key::generate())), txns, seed);
    }

    /// A crash, recovery, more commits and a second crash: what the first
    /// recovery dropped (a torn commit) must never come back.
    #[test]
    fn store_survives_a_second_crash_after_recovering_from_a_first(
        first in prop::collection::vec(txn_strategy(), 1..5),
        second in prop::collection::vec(txn_strategy(), 1..5),
        at in any::<(u64, u64)>(),
        seed in any::<u64>(),
        encrypted in any::<bool>(),
    ) {
        let key = encrypted.then(|| KeySource::Key(Key::generate()));
        let key = key.as_ref();
        let base = fresh(key);
        let empty = Model::new();
        let crash1 = at.0 % (ops_of(&base, &empty, key, &first) + 1);
        let (crashed, _, _) = run_until_crash(&base, &empty, key, &first, crash1);
        let recovered = crashed.after_crash(CrashPlan::Random(seed));
        let start = contents(&Store::open_disk(Box::new(recovered.clone()), mem(), key).unwrap());
        let crash2 = at.1 % (ops_of(&recovered, &start, key, &second) + 1);
        let (crashed, committed, in_progress) =
            run_until_crash(&recovered, &start, key, &second, crash2);
        let after = crashed.after_crash(CrashPlan::Random(seed.rotate_left(17)));
        let store = Store::open_disk(Box::new(after), mem(), key).unwrap();
        let got = contents(&store);
        prop_assert!(
            got == committed || Some(&got) == in_progress.as_ref(),
            "crashes at {crash1} then {crash2}: content is neither the last commit nor the one in progress"
        );
    }
}

/// On a store with room for a full chain (each chained header pins a block
/// until the next anchor), commits `initial` in one transaction if it is not
/// empty, then `commits` more, which must leave 30 chained commits, two
/// short of full; runs `inspect` on that store, then crashes at every point
/// of five more commits, the third of which anchors.
fn sweep_around_anchoring(
    initial: &Model,
    commits: usize,
    seed: u64,
    inspect: impl Fn(&Store, &SharedDisk),
) {
    for key in [None, Some(KeySource::Key(Key::generate()))] {
        let shared = SharedDisk::new(fresh_with_area(key.as_ref(), 1024 * 1024));
        let mut store = Store::open_disk(Box::new(shared.clone()), mem(), key.as_ref()).unwrap();
        if !initial.is_empty() {
            let mut t = store.transaction();
            for (name, data) in initial {
                t.put(name, data).unwrap();
            }
            t.commit().unwrap();
        }
        let mut model = initial.clone();
        let txn = |i: usize| -> Txn { vec![((i % 3) as u8, Some((1000 + i * 37, i as u8)))] };
        // The commit after the first one that stores a blob anchors too (it
        // marks the other slot as having held state): one more commit.
        for i in 0..commits + 1 {
            run_txn(&mut store, &txn(i)).unwrap();
            model = apply(&model, &txn(i));
        }
        assert_eq!(store.info().chained_commits, 30);
        // The anchor's report names the chain, the same after commits and
        // after recovery reads it back.
        let generation = store.generation();
        let anchor =
            format!("ok (anchor of the current generation {generation}, 30 chained commits on)");
        let reopened = Store::open_disk(Box::new(shared.clone()), mem(), key.as_ref()).unwrap();
        for s in [&store, &reopened] {
            let statuses: Vec<String> = s.info().slots.into_iter().map(|r| r.status).collect();
            assert!(statuses.contains(&anchor), "{statuses:?}");
        }
        drop(reopened);
        inspect(&store, &shared);
        drop(store);
        let base = shared.with(|d| d.after_crash(CrashPlan::DurableOnly));
        let txns: Vec<Txn> = (commits..commits + 5).map(txn).collect();
        check_all_crash_points_from(&base, &model, key, txns, seed);
    }
}

/// Commits chain until the chain is full, then one anchors in a slot and
/// frees the chain's blocks: crash at every point around that switch.
#[test]
fn crash_anywhere_around_a_full_chain_anchoring_is_recovered() {
    // The first commit anchors; the next 30 chain.
    sweep_around_anchoring(&Model::new(), 31, 7, |_, _| {});
}

/// A directory too large for its header's block (here 40 blobs) goes into
/// blocks of its own, chained or anchored: crash at every point of commits
/// that chain with it and of the one that anchors.
#[test]
fn crash_anywhere_with_a_directory_too_large_to_embed_is_recovered() {
    let blobs: Model = (0..40)
        .map(|i| format!("nvindex-{i:02}"))
        .map(|n| (n.clone(), n.into_bytes()))
        .collect();
    // The 40 blobs' commit anchors; the next 30 chain.
    sweep_around_anchoring(&blobs, 30, 11, |store, disk| {
        let header = store.info().header_offset as usize;
        let slot =
            disk.with(|d| tpmstate::format::Slot::decode(&d.live()[header..header + 512]).unwrap());
        assert!(!slot.directory.is_embedded(), "{slot:?}");
    });
}

/// Opening with `key` must fail as a wrong key.
fn assert_wrong_key(disk: &CrashDisk, key: Option<&KeySource>, what: &str) {
    match Store::open_disk(Box::new(disk.clone()), mem(), key) {
        Err(e) => assert_eq!(e.kind(), tpmstate::ErrorKind::WrongKey, "{what}: {e}"),
        Ok(_) => panic!("{what}: the store opened"),
    }
}

/// A rekey re-encrypts every blob in one commit, then zeroes the free space.
/// Crash at every write and sync of both: the store opens either at the old
/// generation, under the old key only, or at the rekey's, under the new key
/// only, and holds the same blobs either way.
#[test]
fn crash_anywhere_in_a_rekey_leaves_the_old_key_or_the_new_one_never_both_or_neither() {
    let new = KeySource::Key(Key::generate());
    for old in [None, Some(KeySource::Key(Key::generate()))] {
        let what = if old.is_some() {
            "rekey"
        } else {
            "encrypting a plaintext store"
        };
        let shared = SharedDisk::new(fresh(old.as_ref()));
        let mut store = Store::open_disk(Box::new(shared.clone()), mem(), old.as_ref()).unwrap();
        let model: Model = [("permall", 9000), ("volatilestate", 3000), ("savestate", 0)]
            .into_iter()
            .map(|(n, len)| (n.to_string(), vec![len as u8 ^ 0x5a; len]))
            .collect();
        let mut t = store.transaction();
        for (name, data) in &model {
            t.put(name, data).unwrap();
        }
        let old_gen = t.commit().unwrap();
        drop(store);
        let base = shared.with(|d| d.after_crash(CrashPlan::DurableOnly));
        let rekey_ops = |crash_at: u64| {
            let mut disk = base.clone();
            disk.crash_at(crash_at);
            let shared = SharedDisk::new(disk);
            let mut store =
                Store::open_disk(Box::new(shared.clone()), mem(), old.as_ref()).unwrap();
            let _ = store.rekey(&new);
            drop(store);
            shared.with(|d| d.clone())
        };
        let total = rekey_ops(u64::MAX).ops() - base.ops();
        let mut outcomes = [0; 2];
        for crash_at in 0..=total {
            let crashed = rekey_ops(crash_at);
            for plan in [
                CrashPlan::DurableOnly,
                CrashPlan::AllWritten,
                CrashPlan::Random(crash_at),
                CrashPlan::TornSectors(crash_at),
            ] {
                let after = crashed.after_crash(plan);
                let at = format!("{what}, crash at op {crash_at} of {total} ({plan:?})");
                let generation = Store::open_disk(Box::new(after.clone()), mem(), None)
                    .unwrap_or_else(|e| panic!("{at}: does not open: {e}"))
                    .generation();
                let (key, other) = match generation {
                    g if g == old_gen => (old.as_ref(), Some(&new)),
                    g if g == old_gen + 1 => (Some(&new), old.as_ref()),
                    g => panic!("{at}: generation {g}, neither {old_gen} nor the rekey's"),
                };
                outcomes[(generation - old_gen) as usize] += 1;
                let store = Store::open_disk(Box::new(after.clone()), mem(), key)
                    .unwrap_or_else(|e| panic!("{at}: generation {generation}: {e}"));
                assert_eq!(contents(&store), model, "{at}");
                store.check().unwrap();
                if generation == old_gen + 1 {
                    assert_next_commit_finishes_the_scrub(&after, &new, old.is_none(), &at);
                }
                match other {
                    Some(_) => assert_wrong_key(&after, other, &at),
                    None => {
                        // A plaintext store's old "key" is none: without a
                        // key the rekeyed store lists its blobs but reads none.
                        let keyless = Store::open_disk(Box::new(after), mem(), None).unwrap();
                        assert!(keyless.is_encrypted(), "{at}");
                        assert!(keyless.get("permall").is_err(), "{at}");
                    }
                }
            }
        }
        assert!(
            outcomes[0] > 0 && outcomes[1] > 0,
            "{what}: both outcomes must occur: {outcomes:?}"
        );
    }
}

/// After a rekey's commit landed, wherever its scrub was cut short: a writer
/// that opens the image knows the scrub is unfinished, its next commit
/// finishes it, and then no old plaintext (of a store that was plaintext)
/// is left anywhere in the area and no writer sees a scrub pending.
fn assert_next_commit_finishes_the_scrub(
    disk: &CrashDisk,
    key: &KeySource,
    was_plain: bool,
    at: &str,
) {
    let shared = SharedDisk::new(disk.clone());
    let mut writer = Store::open_disk(Box::new(shared.clone()), mem(), Some(key)).unwrap();
    // info and check report what the writer will finish.
    assert_eq!(writer.info().old_key_data, writer.scrub_pending(), "{at}");
    assert_eq!(
        writer.check().unwrap().old_key_data,
        writer.scrub_pending(),
        "{at}"
    );
    writer.put("after-the-rekey", b"1").unwrap();
    assert!(
        !writer.scrub_pending(),
        "{at}: scrub still pending after a commit"
    );
    drop(writer);
    let image = shared.with(|d| d.after_crash(CrashPlan::DurableOnly));
    let again = Store::open_disk(Box::new(image.clone()), mem(), Some(key)).unwrap();
    assert!(
        !again.scrub_pending(),
        "{at}: the next writer still sees old-key data"
    );
    if was_plain {
        // permall's plaintext is 9000 bytes of (9000 as u8) ^ 0x5a.
        let plain = [(9000u32 as u8) ^ 0x5a; 64];
        assert!(
            !image.live().windows(64).any(|w| w == plain),
            "{at}: old plaintext left after the next commit"
        );
    }
}

#[test]
fn steady_state_commit_issues_exactly_one_sync() {
    let key = KeySource::Key(Key::generate());
    let disk = SharedDisk::new(fresh(Some(&key)));
    let mut store = Store::open_disk(Box::new(disk.clone()), mem(), Some(&key)).unwrap();
    for i in 0..20u8 {
        let before = disk.with(|d| d.syncs());
        let (permall, volatile) = (vec![i; 4096], vec![i; 1000]);
        let mut t = store.transaction();
        t.put("permall", &permall).unwrap();
        t.put("volatilestate", &volatile).unwrap();
        t.commit().unwrap();
        assert_eq!(disk.with(|d| d.syncs()) - before, 1, "commit {i}");
    }
}

#[test]
fn failed_commit_leaves_handle_at_old_generation_and_refuses_more() {
    let disk = SharedDisk::new(fresh(None));
    let mut store = Store::open_disk(Box::new(disk.clone()), mem(), None).unwrap();
    store.put("permall", b"one").unwrap();
    disk.with(|d| d.crash_at(0));
    assert!(store.put("permall", b"two").is_err());
    assert_eq!(&**store.get("permall").unwrap().unwrap(), b"one");
    assert!(matches!(
        store.put("permall", b"three"),
        Err(tpmstate::StoreError::Poisoned { .. })
    ));
}

#[test]
fn commit_too_large_for_the_image_fails_naming_capacity_and_writes_nothing() {
    let disk = SharedDisk::new(fresh(None));
    let mut store = Store::open_disk(Box::new(disk.clone()), mem(), None).unwrap();
    store.put("permall", b"kept").unwrap();
    let ops = disk.with(|d| d.ops());
    let err = store
        .put("huge", &vec![1u8; MAX_AREA as usize])
        .unwrap_err();
    assert!(
        matches!(
            err,
            tpmstate::StoreError::CapacityExceeded {
                capacity: MAX_AREA,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&MAX_AREA.to_string()));
    assert_eq!(disk.with(|d| d.ops()), ops, "nothing may be written");
    assert_eq!(&**store.get("permall").unwrap().unwrap(), b"kept");
}

#[test]
fn commit_larger_than_the_area_grows_it_in_one_step() {
    let disk = SharedDisk::new(fresh(None));
    let mut store = Store::open_disk(Box::new(disk.clone()), mem(), None).unwrap();
    let big = vec![7u8; 200 * 1024];
    store.put("permall", &big).unwrap();
    assert!(store.info().area_bytes > AREA);
    let reopened = Store::open_disk(
        Box::new(disk.with(|d| d.after_crash(CrashPlan::DurableOnly))),
        mem(),
        None,
    )
    .unwrap();
    assert_eq!(&**reopened.get("permall").unwrap().unwrap(), &big[..]);
}

#[test]
fn newer_generation_that_fails_to_verify_is_reported_quarantined_and_anchored_past() {
    let shared = SharedDisk::new(fresh(None));
    let mut store = Store::open_disk(Box::new(shared.clone()), mem(), None).unwrap();
    // Generation 2 anchors (format names no successor), 3 too (it marks the
    // other slot as having held state); 4 and 5 chain.
    for i in 0..4u8 {
        store.put("permall", &[i; 5000]).unwrap();
    }
    assert_eq!(store.info().chained_commits, 2);
    let blob = store.list()[0].area_offset as usize;
    drop(store);
    let mut disk = shared.with(|d| d.after_crash(CrashPlan::DurableOnly));
    disk.flip_byte(blob + 7, 0x01);

    let shared = SharedDisk::new(disk);
    let mut store = Store::open_disk(Box::new(shared.clone()), mem(), None).unwrap();
    assert_eq!(store.generation(), 4);
    assert_eq!(&**store.get("permall").unwrap().unwrap(), &[2u8; 5000][..]);
    let leftover = store.info().leftover.expect("generation 5 is reported");
    assert!(leftover.contains("generation 5"), "{leftover}");
    assert!(store.check().unwrap().leftover.is_some());

    // The next commit anchors (a chained one would reuse generation 5's
    // header block) and clears the report.
    store.put("permall", b"after").unwrap();
    let info = store.info();
    assert_eq!((info.generation, info.chained_commits), (5, 0));
    assert!(info.leftover.is_none());
    drop(store);
    let reopened = Store::open_disk(Box::new(shared.with(|d| d.clone())), mem(), None).unwrap();
    assert_eq!(&**reopened.get("permall").unwrap().unwrap(), b"after");
    assert!(reopened.info().leftover.is_none());
}

/// Many one-block blobs, added one commit each (the case where every
/// rewritten directory leaves a hole too short for the next, larger one):
/// how many a 4 MiB area takes before a commit finds no room.
fn small_blobs_until_full(limit: usize) -> usize {
    let area = 4 << 20;
    let mut disk = CrashDisk::new(area, area);
    Store::format_disk(&mut disk, mem(), area, None).unwrap();
    let mut store = Store::open_disk(Box::new(disk), mem(), None).unwrap();
    for n in 0..limit {
        if let Err(e) = store.put(&format!("nvram-index-{n:05}"), &[n as u8; 100]) {
            assert!(
                matches!(e, tpmstate::StoreError::CapacityExceeded { .. }),
                "{e}"
            );
            return n;
        }
    }
    limit
}

#[test]
fn a_4_mib_area_holds_550_small_blobs_added_one_commit_each() {
    // Each blob takes a 4 KiB block and every commit rewrites the directory
    // (80 KiB at 600 names), leaving a hole its size: without compaction
    // free space came apart after 277 blobs, with it after 599
    // (docs/format.md, section 7).
    let stored = small_blobs_until_full(1000);
    assert!(stored >= 550, "full after {stored} blobs");
}

/// The blobs of a store and their content.
fn everything(store: &Store) -> Model {
    store
        .names()
        .map(|n| (n.to_string(), store.get_required(n).unwrap().to_vec()))
        .collect()
}

/// A commit that moves blobs it does not change (compaction) is one commit
/// like any other: a crash at any write or sync of it leaves the store as
/// it was before or as it is after, never a mix.
#[test]
fn crash_anywhere_in_a_compacting_commit_leaves_the_old_layout_or_the_new_one() {
    let area = 4 << 20;
    let mut disk = CrashDisk::new(area, area);
    Store::format_disk(&mut disk, mem(), area, None).unwrap();
    let shared = SharedDisk::new(disk);
    let mut store = Store::open_disk(Box::new(shared.clone()), mem(), None).unwrap();
    for n in 0..600 {
        let (name, data) = (format!("nvram-index-{n:05}"), vec![n as u8; 100]);
        let base = shared.with(|d| d.after_crash(CrashPlan::DurableOnly));
        let old = everything(&store);
        let before = store.generation();
        store.put(&name, &data).unwrap();
        // A compacting commit comes first, as a commit of its own, and
        // rewrites blobs the put did not touch.
        let moved = store
            .list()
            .iter()
            .filter(|b| b.name != name && b.written_generation > before)
            .count();
        if moved == 0 {
            continue;
        }
        // This commit moved blobs: crash it at every write and sync.
        let new = everything(&store);
        let commit_ops = |crash_at: u64| {
            let mut disk = base.clone();
            disk.crash_at(crash_at);
            let shared = SharedDisk::new(disk);
            let mut store = Store::open_disk(Box::new(shared.clone()), mem(), None).unwrap();
            let _ = store.put(&name, &data);
            drop(store);
            shared.with(|d| d.clone())
        };
        let total = commit_ops(u64::MAX).ops() - base.ops();
        assert!(
            total > 2,
            "a compacting commit writes many regions ({total} ops)"
        );
        for crash_at in 0..=total {
            let crashed = commit_ops(crash_at);
            for plan in [
                CrashPlan::DurableOnly,
                CrashPlan::AllWritten,
                CrashPlan::Random(crash_at),
                CrashPlan::TornSectors(crash_at),
            ] {
                let after = crashed.after_crash(plan);
                let reopened = Store::open_disk(Box::new(after), mem(), None).unwrap();
                let got = everything(&reopened);
                assert!(
                    got == old || got == new,
                    "crash at op {crash_at} of {total} ({plan:?})"
                );
            }
        }
        return;
    }
    panic!("no commit compacted in 600 small blobs");
}

/// Whatever fills an area that cannot grow, compaction never wedges it: a
/// commit that finds no room fails alone, and deleting a blob always works.
#[test]
fn a_full_area_never_wedges_deletes_always_work() {
    use rand::{Rng, SeedableRng};
    for seed in 0..6u64 {
        let area = 256 * 1024;
        let mut disk = CrashDisk::new(area, area);
        Store::format_disk(&mut disk, mem(), area, None).unwrap();
        let mut store = Store::open_disk(Box::new(disk), mem(), None).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for step in 0..300 {
            let name = format!("b{}", rng.gen_range(0..24));
            let len = rng.gen_range(1..40 * 1024);
            match store.put(&name, &vec![step as u8; len]) {
                Ok(_) => {}
                Err(tpmstate::StoreError::CapacityExceeded { .. }) => {
                    let Some(largest) = store.list().into_iter().max_by_key(|b| b.size) else {
                        continue;
                    };
                    store
                        .delete(&largest.name)
                        .unwrap_or_else(|e| panic!("seed {seed} step {step}: delete failed: {e}"));
                }
                Err(e) => panic!("seed {seed} step {step}: {e}"),
            }
        }
    }
}
