//! Flipping any single byte of the store area is detected or harmlessly
//! recovered from: the store opens at a committed state or refuses; reads
//! never return data that was not committed.

use std::path::Path;
use tpmstate::format::{Directory, Extent, Slot, BLOCK};
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
        Slot::decode(&b).unwrap().directory.offset as usize
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

/// An edit of a header and its directory's bytes.
type HeaderEdit = fn(&mut Slot, &mut Vec<u8>);

/// The image with the header at `at` replaced by `edit` of it, its CRC fixed.
fn with_header(
    disk: &CrashDisk,
    at: usize,
    edit: impl FnOnce(&mut Slot, &mut Vec<u8>),
) -> CrashDisk {
    let mut image = disk.live().to_vec();
    let mut slot = Slot::decode(&image[at..at + 512]).unwrap();
    let d = slot.directory;
    let mut dir_bytes = image[d.offset as usize..(d.offset + u64::from(d.len)) as usize].to_vec();
    edit(&mut slot, &mut dir_bytes);
    if dir_bytes.len() as u32 != d.len || slot.directory == d {
        let start = d.offset as usize;
        image[start..start + dir_bytes.len()].copy_from_slice(&dir_bytes);
        slot.directory.len = dir_bytes.len() as u32;
        slot.directory_crc = crc32c::crc32c(&dir_bytes);
    }
    image[at..at + 512].copy_from_slice(&slot.encode());
    CrashDisk::from_image(image, AREA)
}

#[test]
fn a_header_with_a_valid_crc_and_an_extent_wrapping_past_2_pow_64_is_refused_not_a_panic() {
    let (disk, states) = history(None);
    let newest = Store::open_disk(Box::new(disk.clone()), Path::new("<memory>"), None).unwrap();
    let (at, generation) = (newest.info().header_offset as usize, newest.generation());
    let edits: [(&str, HeaderEdit); 4] = [
        ("directory extent", |s, _| {
            s.area_len = u64::MAX / BLOCK * BLOCK;
            s.directory = Extent {
                offset: s.area_len - BLOCK,
                len: u32::MAX,
            };
        }),
        ("next header", |s, _| {
            s.area_len = u64::MAX / BLOCK * BLOCK;
            s.next = s.area_len;
        }),
        ("area length", |s, _| s.area_len = u64::MAX / BLOCK * BLOCK),
        ("blob extent", |s, dir| {
            let mut d = Directory::decode(dir, s).unwrap();
            for b in d.blobs.values_mut() {
                b.extent.offset = u64::MAX / BLOCK * BLOCK;
            }
            *dir = d.encode();
        }),
    ];
    for (what, edit) in edits {
        let crafted = with_header(&disk, at, edit);
        // A debug build panics on overflow: reaching the match is the proof.
        match Store::open_disk(Box::new(crafted), Path::new("<memory>"), None) {
            Ok(store) => {
                assert!(
                    store.generation() < generation,
                    "{what}: served the crafted header"
                );
                let got: State = store
                    .names()
                    .map(|n| (n.to_string(), store.get(n).unwrap().unwrap().to_vec()))
                    .collect();
                assert!(states.contains(&got), "{what}: served uncommitted data");
                let info = store.info();
                assert!(
                    info.leftover.is_some() || info.slots.iter().any(|s| !s.sound),
                    "{what}: the crafted header is reported"
                );
            }
            Err(e) => assert_eq!(e.kind(), tpmstate::ErrorKind::Corrupt, "{what}: {e}"),
        }
    }
}
