//! Structure-aware: takes a real encrypted store (an anchor, chained commits,
//! an embedded and a separate directory), applies the input's edits to
//! header and directory fields, then fixes every CRC and MAC it broke, so
//! the fuzzer reaches the recovery and commit logic behind the checksums.
//! Errors are fine; panics are not, and a commit that returned `Ok` must be
//! what a reopen serves.
#![no_main]
use std::path::Path;
use std::sync::OnceLock;
use tpmstate::format::{Directory, Extent, Slot, BLOCK, SLOT_BYTES, SLOT_OFFSETS};
use tpmstate::image::{CrashDisk, CrashPlan, SharedDisk};
use tpmstate::{Key, KeySource, Store};

const AREA: u64 = 256 * 1024;

fn key() -> Key {
    Key::from_bytes(&[7; 32]).expect("a non-zero key")
}

/// The store every input starts from, built once.
fn base() -> &'static [u8] {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let source = KeySource::Key(key());
        let mut disk = CrashDisk::new(AREA, AREA);
        Store::format_disk(&mut disk, Path::new("<base>"), AREA, Some(&source)).unwrap();
        let shared = SharedDisk::new(disk);
        let mut store =
            Store::open_disk(Box::new(shared.clone()), Path::new("<base>"), Some(&source)).unwrap();
        for round in 0..4u8 {
            let (permall, volatile) = ([round; 5000], [round; 300]);
            let mut t = store.transaction();
            t.put("permall", &permall).unwrap();
            t.put("volatilestate", &volatile).unwrap();
            if round == 2 {
                // Many names make a directory too large to embed.
                let names: Vec<String> = (0..40).map(|i| format!("nvram-index-{i:03}")).collect();
                for n in &names {
                    t.put(n, b"x").unwrap();
                }
                t.commit().unwrap();
                continue;
            }
            t.commit().unwrap();
        }
        drop(store);
        shared.with(|d| d.after_crash(CrashPlan::DurableOnly).live().to_vec())
    })
}

/// Every header in the image: both slots and the chain behind each.
fn headers(image: &[u8]) -> Vec<(u64, Slot)> {
    let mut out = Vec::new();
    for at in SLOT_OFFSETS {
        let mut at = at;
        while let Some(s) = image
            .get(at as usize..at as usize + SLOT_BYTES)
            .and_then(|b| Slot::decode(b).ok())
        {
            let next = s.next;
            out.push((at, s));
            if next == 0 || out.len() > 64 {
                break;
            }
            at = next;
        }
    }
    out
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a[..b.len().min(8)].copy_from_slice(&b[..b.len().min(8)]);
    u64::from_le_bytes(a)
}

/// Applies one edit (a target header, a field, a value) and re-seals.
fn edit(image: &mut [u8], op: &[u8]) {
    let list = headers(image);
    if list.is_empty() {
        return;
    }
    let (at, mut slot) = list[op[0] as usize % list.len()].clone();
    let v = le64(&op[2..]);
    let d = slot.directory;
    let dir_bytes = image.get(d.offset as usize..(d.offset + u64::from(d.len)) as usize);
    let mut dir = dir_bytes.and_then(|b| Directory::decode(b, &slot).ok());
    let blob = dir
        .as_mut()
        .and_then(|dir| dir.blobs.values_mut().nth(op[1] as usize / 16 % 4));
    match (op[1] % 16, blob) {
        (0, _) => slot.generation = v,
        (1, _) => slot.area_len = v,
        (2, _) => slot.directory.offset = v,
        (3, _) => slot.directory.len = v as u32,
        (4, _) => slot.next = v,
        (5, _) => slot.format_version = v as u32,
        (6, _) => slot.encrypted = v & 1 == 1,
        (7, _) => slot.store_id[v as usize % 16] = (v >> 8) as u8,
        (8, _) => slot.prev_id = slot.commit_id,
        (9, Some(b)) => b.extent.offset = v,
        (10, Some(b)) => b.extent.len = v as u32,
        (11, Some(b)) => b.plain_len = v as u32,
        (12, Some(b)) => b.written_gen = v,
        (13, Some(b)) => b.extent = Extent { offset: v, len: b.extent.len },
        (14, _) => {
            if let Some(dir) = dir.as_mut() {
                dir.generation = v;
            }
        }
        _ => {
            // Fix every blob's CRC to what its extent holds now.
            if let Some(dir) = dir.as_mut() {
                for b in dir.blobs.values_mut() {
                    let range = b.extent.offset as usize..b.extent.end() as usize;
                    if let Some(bytes) = image.get(range) {
                        b.crc = crc32c::crc32c(&bytes[..b.extent.len.min(bytes.len() as u32) as usize]);
                    }
                }
            }
        }
    }
    if let Some(dir) = dir {
        let bytes = dir.encode();
        let room = match d.is_embedded() {
            true => BLOCK - SLOT_BYTES as u64,
            false => d.blocks() * BLOCK,
        };
        let start = d.offset as usize;
        if (bytes.len() as u64) <= room && start + bytes.len() <= image.len() {
            image[start..start + bytes.len()].copy_from_slice(&bytes);
            slot.directory.len = bytes.len() as u32;
            slot.directory_crc = crc32c::crc32c(&bytes);
            slot.directory_mac = key().directory_mac(&slot.store_id, &bytes);
        }
    }
    image[at as usize..at as usize + SLOT_BYTES].copy_from_slice(&slot.encode());
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut image = base().to_vec();
    for op in data.chunks_exact(10).take(8) {
        edit(&mut image, op);
    }
    let source = KeySource::Key(key());
    let Ok(mut store) = Store::open_disk(
        Box::new(CrashDisk::from_image(image.clone(), AREA)),
        Path::new("<fuzz>"),
        Some(&source),
    ) else {
        return;
    };
    let names: Vec<String> = store.names().map(str::to_string).collect();
    for n in &names {
        let _ = store.get(n);
    }
    let _ = store.check();
    let _ = store.info();
    // Write through a disk the test keeps, then reopen what it holds.
    let shared = SharedDisk::new(CrashDisk::from_image(image, AREA));
    if let Ok(mut store) = Store::open_disk(Box::new(shared.clone()), Path::new("<fuzz>"), Some(&source)) {
        if let Ok(generation) = store.put("permall", b"after the edits") {
            drop(store);
            let disk = shared.with(|d| d.after_crash(CrashPlan::DurableOnly));
            let reopened = Store::open_disk(Box::new(disk), Path::new("<fuzz>"), Some(&source))
                .expect("a store that committed reopens");
            assert_eq!(reopened.generation(), generation, "the acknowledged commit is served");
            assert_eq!(&**reopened.get_required("permall").unwrap(), b"after the edits");
        }
    }
    drop(store.put("permall", b"x"));
});
