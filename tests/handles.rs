//! The handle types at run time: a writer keeps its writer lock for its
//! whole life whatever nested guards come and go, a read-only handle holds
//! no write permission, a released handle holds no lock byte at all, and
//! in-memory disks get the same types. (That writing through a read-only or
//! released handle does not compile is shown by the `compile_fail`
//! doctests in `src/store/handle.rs`.)

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;
use tpmstate::image::CrashDisk;
use tpmstate::lock::{holders_of, Holder};
use tpmstate::{LockMode, OpenOptions, ReadOnlyStore, Store};

fn new_image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("nvram.qcow2");
    assert_eq!(cli(&["create", path_str(&img)]).0, 0);
    img
}

/// The permissions this process uses on the image, as /proc shows them.
fn our_uses(img: &Path) -> Vec<&'static str> {
    let me = std::process::id() as i32;
    holders_of(img)
        .unwrap()
        .into_iter()
        .filter(|h: &Holder| h.pid == me)
        .flat_map(|h| h.uses)
        .collect()
}

#[test]
fn nested_guards_never_take_the_writer_below_its_lock_and_only_dropping_it_releases() {
    let dir = scratch();
    let img = new_image(dir.path());
    let store = Store::open(&img, OpenOptions::default()).unwrap();
    assert_eq!(store.lock_mode(), LockMode::Writer);
    for mode in LockMode::ALL {
        let nested = store.acquire_nested(mode, None).unwrap();
        drop(nested);
        assert_eq!(store.lock_held(), Some(LockMode::Writer), "after {mode:?}");
        assert!(our_uses(&img).contains(&"write"), "after {mode:?}");
    }
    let exclusive = store.acquire_nested(LockMode::Exclusive, None).unwrap();
    assert_eq!(store.lock_held(), Some(LockMode::Exclusive));
    drop(exclusive);
    let (code, _, _) = qemu_img(&["info", path_str(&img)]);
    assert_ne!(code, 0, "qemu-img stays locked out by the writer");
    drop(store);
    assert!(our_uses(&img).is_empty(), "released with the handle");
    assert_eq!(qemu_img(&["info", path_str(&img)]).0, 0);
}

#[test]
fn a_read_only_handle_holds_no_write_permission_and_a_released_one_holds_nothing() {
    let dir = scratch();
    let img = new_image(dir.path());
    let reader = ReadOnlyStore::open(&img, OpenOptions::default()).unwrap();
    assert_eq!(reader.lock_mode(), LockMode::Shared);
    assert_eq!(our_uses(&img), vec!["consistent read"]);
    let err = Store::open(&img, OpenOptions::default()).unwrap_err();
    assert_eq!(err.kind(), tpmstate::ErrorKind::Locked, "{err}");
    drop(reader);

    let mut writer = Store::open(&img, OpenOptions::default()).unwrap();
    writer.put("permall", b"before the hand-over").unwrap();
    let released = writer.release();
    assert!(our_uses(&img).is_empty(), "a released handle holds no byte");
    assert_eq!(
        &**released.get_required("permall").unwrap(),
        b"before the hand-over",
        "it still reads what it committed"
    );
    // Another writer can take the image while the released handle exists.
    let mut other = Store::open(&img, OpenOptions::default()).unwrap();
    other.put("permall", b"the other writer").unwrap();
    drop(other);
    let err = released.reclaim(Duration::from_millis(100)).unwrap_err();
    assert!(
        matches!(err.error(), tpmstate::StoreError::Diverged { .. }),
        "{err:?}"
    );
}

#[test]
fn in_memory_disks_get_the_same_handle_types() {
    let area = 64 * 1024;
    let mut disk = CrashDisk::new(area, area);
    Store::format_disk(&mut disk, Path::new("<memory>"), area, None).unwrap();
    let mut writer = Store::open_disk(Box::new(disk.clone()), Path::new("<memory>"), None).unwrap();
    assert_eq!(writer.lock_mode(), LockMode::Writer);
    writer.put("permall", b"in memory").unwrap();
    let released = writer.release();
    let mut writer = released.reclaim(Duration::ZERO).unwrap();
    writer.put("permall", b"again").unwrap();
    let reader = ReadOnlyStore::open_disk(Box::new(disk), Path::new("<memory>"), None).unwrap();
    assert_eq!(reader.lock_mode(), LockMode::Shared);
}

#[test]
fn a_poisoned_writer_stays_poisoned_through_release_and_reclaim_and_cannot_hand_over() {
    let area = 64 * 1024;
    let mut disk = CrashDisk::new(area, area);
    Store::format_disk(&mut disk, Path::new("<memory>"), area, None).unwrap();
    let shared = tpmstate::image::SharedDisk::new(disk);
    let mut writer =
        Store::open_disk(Box::new(shared.clone()), Path::new("<memory>"), None).unwrap();
    writer.put("permall", b"before").unwrap();
    shared.with(|d| d.crash_at(0));
    assert!(writer.put("permall", b"fails").is_err());
    let poisoned = |e: &tpmstate::StoreError| matches!(e, tpmstate::StoreError::Poisoned { .. });
    let mut writer = writer.release().reclaim(Duration::ZERO).unwrap();
    let err = writer.put("permall", b"after the reclaim").unwrap_err();
    assert!(poisoned(&err), "{err}");
    let err = tpmstate::migration::release_outgoing(writer).unwrap_err();
    assert!(poisoned(&err.error), "{}", err.error);
}
