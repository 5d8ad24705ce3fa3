//! Real file-system faults: a full file system (a small tmpfs, mounted by
//! the test when it runs as root) and an image file truncated under a
//! running store. The store reports the error, never panics, and the image
//! reopens at a committed state (or, truncated, is refused as such).

mod common;
use common::{assert_qemu_check_clean, cli, path_str, scratch};
use std::path::{Path, PathBuf};
use std::process::Command;
use tpmstate::{OpenOptions, Store};

/// A tmpfs of `mib` MiB mounted at `dir/mnt`, unmounted when dropped;
/// `None` where this process may not mount (not root, or no permission).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u32) -> Option<Tmpfs> {
        let at = dir.join("mnt");
        std::fs::create_dir(&at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&at)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            let msg = "cannot mount a tmpfs here (needs root)";
            if std::env::var_os("CI").is_some() {
                panic!("{msg}");
            }
            eprintln!("skipped: {msg}");
        }
        ok.then_some(Tmpfs(at))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

/// Fills the file system holding `dir` but for about `spare` bytes.
fn fill(dir: &Path, spare: u64) {
    let stat = nix::sys::statvfs::statvfs(dir).unwrap();
    let free = stat.blocks_available() * stat.fragment_size();
    let filler = std::fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0x77u8; 1 << 20];
    let mut left = free.saturating_sub(spare);
    use std::io::Write;
    let mut w = std::io::BufWriter::new(filler);
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        if w.write_all(&chunk[..n]).is_err() {
            break;
        }
        left -= n as u64;
    }
    let _ = w.flush();
}

#[test]
fn a_full_file_system_fails_only_the_commit_that_needs_space_and_keeps_the_state() {
    let dir = scratch();
    let Some(fs) = Tmpfs::mount(dir.path(), 12) else {
        return;
    };
    let img = fs.0.join("nv.qcow2");
    let i = path_str(&img);
    let (code, _, err) = cli(&["create", i, "--size", "64M"]);
    assert_eq!(code, 0, "{err}");
    let blob = dir.path().join("blob");
    std::fs::write(&blob, vec![1u8; 3000]).unwrap();
    assert_eq!(cli(&["put", i, "permall", path_str(&blob)]).0, 0);
    fill(&fs.0, 0);

    // The store area is preallocated: a commit that fits needs no space.
    std::fs::write(&blob, vec![2u8; 3000]).unwrap();
    let (code, _, err) = cli(&["put", i, "permall", path_str(&blob)]);
    assert_eq!(code, 0, "a commit into the preallocated area: {err}");

    // One that outgrows the area needs new clusters: refused, nothing lost.
    let big = dir.path().join("big");
    std::fs::write(&big, vec![3u8; 6 << 20]).unwrap();
    let (code, _, err) = cli(&["put", i, "savestate", path_str(&big)]);
    assert_eq!(code, 9, "a full file system is no space: {err}");
    assert!(
        err.contains("nv.qcow2") && err.contains("No space left"),
        "{err}"
    );
    let out = dir.path().join("out");
    let (code, _, err) = cli(&["get", i, "permall", "-o", path_str(&out)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), vec![2u8; 3000]);
    assert_eq!(cli(&["get", i, "savestate"]).0, 1, "no half-made blob");
    assert_eq!(cli(&["check", i]).0, 0);
    std::fs::remove_file(fs.0.join("filler")).unwrap();
    assert_qemu_check_clean(&img);
}

#[test]
fn an_image_truncated_under_a_running_store_fails_its_commit_and_is_refused_after() {
    let dir = scratch();
    let img = dir.path().join("nv.qcow2");
    assert_eq!(cli(&["create", path_str(&img)]).0, 0);
    let mut store = Store::open(&img, OpenOptions::default()).unwrap();
    store.put("permall", &[1u8; 3000]).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    file.set_len(64 * 1024).unwrap();
    let err = store.put("permall", &[2u8; 3000]).unwrap_err();
    let message = tpmstate::kind::chain(&err);
    assert!(
        message.contains("shrank") && message.contains("nv.qcow2"),
        "{message}"
    );
    assert!(
        store.put("permall", &[3u8; 3000]).is_err(),
        "the writer stops"
    );
    drop(store);
    let (code, _, err) = cli(&["info", path_str(&img)]);
    assert!(code == 2 || code == 3, "exit {code}: {err}");
    assert!(
        err.contains("nv.qcow2") && !err.contains("panicked"),
        "{err}"
    );
}
