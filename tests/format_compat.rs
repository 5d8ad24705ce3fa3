//! Stores written by an older format version (see tests/fixtures/README.md)
//! still open, read, verify, and take new commits, which are written in the
//! current format.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// The fixture's blob contents: SHA-256("SEED-0") || SHA-256("SEED-1") || ...
fn fixture_blob(seed: &str, len: usize) -> Vec<u8> {
    use sha2::Digest;
    let mut out = Vec::new();
    for i in 0.. {
        if out.len() >= len {
            break;
        }
        out.extend_from_slice(&sha2::Sha256::digest(format!("{seed}-{i}")));
    }
    out.truncate(len);
    out
}

fn unpack(dir: &Path, name: &str) -> PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let out = std::process::Command::new("gzip")
        .arg("-dc")
        .arg(&fixture)
        .output()
        .expect("gzip is installed");
    assert!(out.status.success(), "gzip -dc {}", fixture.display());
    let image = dir.join(name.trim_end_matches(".gz"));
    std::fs::write(&image, out.stdout).unwrap();
    image
}

fn get(image: &Path, name: &str, key: &[&str]) -> Vec<u8> {
    let out = tpmstate()
        .args(["get", path_str(image), name])
        .args(key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn format_2_store_reads_and_upgrades_on_its_next_commit(fixture: &str, encrypted: bool) {
    let dir = scratch();
    let image = unpack(dir.path(), fixture);
    let i = path_str(&image);
    let k = key_file(dir.path(), "k", 0xab);
    let key: &[&str] = if encrypted {
        &["--key-file", path_str(&k)]
    } else {
        &[]
    };
    let (code, info, err) = cli(&["info", i]);
    assert_eq!(code, 0, "{err}");
    assert!(info.contains("format version: 2"), "{info}");
    assert!(info.contains("generation:     7"), "{info}");
    assert_eq!(get(&image, "permall", key), fixture_blob("permall2", 6001));
    assert_eq!(
        get(&image, "volatilestate", key),
        fixture_blob("volatile", 100)
    );
    assert!(get(&image, "empty", key).is_empty());
    let (code, out, err) = cli(&[&["check", i][..], key].concat());
    assert_eq!(code, 0, "{out}{err}");

    // A new commit is written in the current format; the blobs it does not
    // touch keep their old layout and still read back.
    let new = dir.path().join("new");
    std::fs::write(&new, fixture_blob("new", 4096)).unwrap();
    let (code, _, err) = cli(&[&["put", i, "permall", path_str(&new)][..], key].concat());
    assert_eq!(code, 0, "{err}");
    let (_, info, _) = cli(&["info", i]);
    let current = format!("format version: {}", tpmstate::format::FORMAT_VERSION);
    assert!(
        info.contains(&current) && info.contains("generation:     8"),
        "{info}"
    );
    assert_eq!(get(&image, "permall", key), fixture_blob("new", 4096));
    assert_eq!(
        get(&image, "volatilestate", key),
        fixture_blob("volatile", 100)
    );
    let (code, out, err) = cli(&[&["check", i][..], key].concat());
    assert_eq!(code, 0, "{out}{err}");
    assert_qemu_check_clean(&image);
}

#[test]
fn encrypted_format_2_store_reads_and_upgrades_on_its_next_commit() {
    format_2_store_reads_and_upgrades_on_its_next_commit("v2-encrypted.qcow2.gz", true);
}

#[test]
fn plaintext_format_2_store_reads_and_upgrades_on_its_next_commit() {
    format_2_store_reads_and_upgrades_on_its_next_commit("v2-plain.qcow2.gz", false);
}

#[test]
fn format_2_store_without_its_key_is_refused_as_key_missing() {
    let dir = scratch();
    let image = unpack(dir.path(), "v2-encrypted.qcow2.gz");
    let (code, _, err) = cli(&["get", path_str(&image), "permall"]);
    assert_eq!(code, 4, "{err}");
    let wrong = key_file(dir.path(), "w", 0xcd);
    let (code, _, err) = cli(&[
        "get",
        path_str(&image),
        "permall",
        "--key-file",
        path_str(&wrong),
    ]);
    assert_eq!(code, 5, "{err}");
}
