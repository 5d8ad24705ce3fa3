//! Flipping any single byte of the store area is detected or harmlessly
//! recovered from: the store opens at a committed state or refuses; reads
//! never return data that was not committed.

use std::path::Path;
use tpmstate::image::{CrashDisk, CrashPlan, SharedDisk};
use tpmstate::{Key, KeySource, Store};

const AREA: u64 = 64 * 1024;

/// One committed state: every blob's name and content.
type State = Vec<(String, Vec<u8>)>;

fn history(key: Option<&KeySource>) -> (CrashDisk, Vec<State>) {
    let mut disk = CrashDisk::new(AREA, AREA);
    Store::format_disk(&mut disk, Path::new("<memory>"), AREA, key).unwrap();
    let shared = SharedDisk::new(disk);
    let mut store = Store::open_disk(Box::new(shared.clone()), Path::new("<memory>"), key).unwrap();
    let mut states = vec![vec![]];
    for i in 0..4u8 {
        let (permall, volatile) = (vec![i; 3000 + i as usize * 100], [i, 1, 2, 3]);
        let mut t = store.transaction();
        t.put("permall", &permall).unwrap();
        t.put("volatilestate", &volatile).unwrap();
        t.commit().unwrap();
        let state = store
            .names()
            .map(|n| (n.to_string(), store.get(n).unwrap().unwrap().to_vec()))
            .collect();
        states.push(state);
    }
    (
        shared.with(|d| d.after_crash(CrashPlan::DurableOnly)),
        states,
    )
}

fn sweep(key: Option<KeySource>) {
    let (disk, states) = history(key.as_ref());
    let last_used = disk.live().iter().rposition(|&b| b != 0).unwrap() + 1;
    let mut opened = 0;
    for offset in 0..last_used {
        let mut d = disk.after_crash(CrashPlan::DurableOnly);
        d.flip_byte(offset, if offset % 2 == 0 { 0x01 } else { 0x80 });
        let Ok(store) = Store::open_disk(Box::new(d), Path::new("<memory>"), key.as_ref()) else {
            continue;
        };
        opened += 1;
        let mut got = Vec::new();
        for name in store.names() {
            match store.get(name) {
                Ok(Some(v)) => got.push((name.to_string(), v.to_vec())),
                Ok(None) => unreachable!(),
                Err(_) => {
                    got.clear();
                    break;
                }
            }
        }
        if !got.is_empty() || store.names().count() == 0 {
            assert!(
                states.contains(&got),
                "flip at {offset}: store returned data that was never committed"
            );
        }
    }
    assert!(opened > 0, "flips in unused space must be harmless");
}

#[test]
fn any_flipped_byte_of_a_plaintext_store_is_detected_or_harmless() {
    sweep(None);
}

#[test]
fn any_flipped_byte_of_an_encrypted_store_is_detected_or_harmless() {
    sweep(Some(KeySource::Key(Key::generate())));
}

#[test]
fn check_catches_damage_that_appears_after_open() {
    let key = KeySource::Key(Key::generate());
    let (disk, _) = history(Some(&key));
    let blob = {
        let s =
            Store::open_disk(Box::new(disk.clone()), Path::new("<memory>"), Some(&key)).unwrap();
        s.list()
            .into_iter()
            .find(|b| b.name == "permall")
            .unwrap()
            .area_offset as usize
    };
    let header = Store::open_disk(Box::new(disk.clone()), Path::new("<memory>"), Some(&key))
        .unwrap()
        .info()
        .header_offset as usize;
    let directory = {
        let mut b = [0u8; 512];
        b.copy_from_slice(&disk.live()[header..header + 512]);
        tpmstate::format::Slot::decode(&b).unwrap().directory.offset as usize
    };
    for (what, offset) in [
        ("blob", blob + 10),
        ("directory", directory + 5),
        ("header", header + 30),
    ] {
        let shared = SharedDisk::new(disk.clone());
        let store =
            Store::open_disk(Box::new(shared.clone()), Path::new("<memory>"), Some(&key)).unwrap();
        store.check().unwrap();
        shared.with(|d| d.flip_byte(offset, 0x04));
        assert!(
            store.check().is_err(),
            "{what}: damage after open must fail check"
        );
    }
}
