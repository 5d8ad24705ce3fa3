//! Encryption at rest through the CLI on real images: missing key, wrong key,
//! zero key, flipped tag, passphrases, rekey, and plaintext never on disk.

mod common;
use common::*;
use std::path::Path;

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn secret_blob(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let data: Vec<u8> = b"TPM-OWNER-SECRET-"
        .iter()
        .cycle()
        .take(9000)
        .copied()
        .collect();
    let p = dir.join("secret");
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

#[test]
fn encrypted_store_needs_the_right_key_and_never_holds_plaintext() {
    let dir = scratch();
    let img = dir.path().join("e.qcow2");
    let (i, k, bad) = (
        path_str(&img),
        key_file(dir.path(), "k", 0x11),
        key_file(dir.path(), "bad", 0x22),
    );
    let (blob, data) = secret_blob(dir.path());
    create_encrypted_with_permall(&img, &k, &blob);
    assert!(
        !find(&std::fs::read(&img).unwrap(), b"TPM-OWNER-SECRET-"),
        "plaintext found in the image"
    );

    let (code, out, _) = cli(&["get", i, "permall", "--key-file", path_str(&k)]);
    assert_eq!((code, out.as_bytes()), (0, &data[..]));
    let (code, _, err) = cli(&["get", i, "permall"]);
    assert_eq!(code, 4, "missing key: {err}");
    let (code, _, err) = cli(&["get", i, "permall", "--key-file", path_str(&bad)]);
    assert_eq!(code, 5, "wrong key: {err}");
    assert!(err.contains("wrong key"), "{err}");
    let (code, _, _) = cli(&["check", i]);
    assert_eq!(code, 4);
    let (code, _, _) = cli(&["put", i, "permall", path_str(&blob)]);
    assert_eq!(code, 4, "a commit without the key must not happen");
    assert_qemu_check_clean(&img);
}

#[test]
fn plaintext_store_stores_plaintext_and_refuses_a_key() {
    let dir = scratch();
    let img = dir.path().join("p.qcow2");
    let i = path_str(&img);
    let (blob, _) = secret_blob(dir.path());
    assert_eq!(cli(&["create", i]).0, 0);
    assert_eq!(cli(&["put", i, "permall", path_str(&blob)]).0, 0);
    assert!(find(&std::fs::read(&img).unwrap(), b"TPM-OWNER-SECRET-"));
    let k = key_file(dir.path(), "k", 0x11);
    assert_eq!(cli(&["get", i, "permall", "--key-file", path_str(&k)]).0, 5);
}

#[test]
fn zero_key_and_malformed_key_files_are_refused() {
    let dir = scratch();
    let img = dir.path().join("z.qcow2");
    let zero = key_file(dir.path(), "zero", 0);
    let (code, _, err) = cli(&["create", path_str(&img), "--key-file", path_str(&zero)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("all zeros"), "{err}");
    assert!(!img.exists());
    let short = dir.path().join("short");
    std::fs::write(&short, b"abc").unwrap();
    assert_eq!(
        cli(&["create", path_str(&img), "--key-file", path_str(&short)]).0,
        1
    );
}

#[test]
fn flipped_tag_byte_is_reported_as_corruption() {
    let dir = scratch();
    let img = dir.path().join("t.qcow2");
    let (i, k) = (path_str(&img), key_file(dir.path(), "k", 0x33));
    let (blob, _) = secret_blob(dir.path());
    create_encrypted_with_permall(&img, &k, &blob);
    // The GCM tag is kept in the directory entry: CBOR key "tag", then a
    // 16-byte byte string (header 0x50).
    let mut bytes = std::fs::read(&img).unwrap();
    let at = bytes
        .windows(4)
        .position(|w| w == b"tag\x50")
        .expect("the directory holds the blob's tag");
    bytes[at + 4 + 15] ^= 0x40;
    std::fs::write(&img, &bytes).unwrap();
    // A flipped tag byte also breaks the directory's checksum, so recovery
    // falls back to the previous generation (which never had the blob):
    // never to wrong data.
    let (code, out, err) = cli(&["get", i, "permall", "--key-file", path_str(&k)]);
    assert_ne!(code, 0, "flipped tag must not read back: {err}");
    assert!(out.is_empty());
    let (_, out, _) = cli(&["check", i, "--key-file", path_str(&k)]);
    assert!(
        out.contains("does not verify"),
        "check must report the damaged generation: {out}"
    );
}

#[test]
fn passphrase_store_opens_with_its_passphrase_only() {
    let dir = scratch();
    let img = dir.path().join("pp.qcow2");
    let i = path_str(&img);
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "incorrect horse\n").unwrap();
    let (blob, data) = secret_blob(dir.path());
    assert_eq!(
        cli(&["create", i, "--passphrase-file", path_str(&pass)]).0,
        0
    );
    assert_eq!(
        cli(&[
            "put",
            i,
            "savestate",
            path_str(&blob),
            "--passphrase-file",
            path_str(&pass)
        ])
        .0,
        0
    );
    let (code, out, _) = cli(&["get", i, "savestate", "--passphrase-file", path_str(&pass)]);
    assert_eq!((code, out.as_bytes()), (0, &data[..]));
    assert_eq!(
        cli(&["get", i, "savestate", "--passphrase-file", path_str(&wrong)]).0,
        5
    );
    let k = key_file(dir.path(), "k", 0x44);
    assert_eq!(
        cli(&["get", i, "savestate", "--key-file", path_str(&k)]).0,
        5
    );
}

#[test]
fn rekey_switches_keys_atomically() {
    let dir = scratch();
    let img = dir.path().join("r.qcow2");
    let i = path_str(&img);
    let (old, new) = (
        key_file(dir.path(), "old", 0x55),
        key_file(dir.path(), "new", 0x66),
    );
    let (blob, data) = secret_blob(dir.path());
    create_encrypted_with_permall(&img, &old, &blob);
    let (code, _, err) = cli(&[
        "rekey",
        i,
        "--key-file",
        path_str(&old),
        "--new-key-file",
        path_str(&new),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        cli(&["get", i, "permall", "--key-file", path_str(&old)]).0,
        5
    );
    let (code, out, _) = cli(&["get", i, "permall", "--key-file", path_str(&new)]);
    assert_eq!((code, out.as_bytes()), (0, &data[..]));
    assert_eq!(cli(&["check", i, "--key-file", path_str(&new)]).0, 0);
    assert_eq!(
        cli(&[
            "rekey",
            i,
            "--key-file",
            path_str(&old),
            "--new-key-file",
            path_str(&new)
        ])
        .0,
        5
    );
    assert_qemu_check_clean(&img);
}

#[test]
fn group_readable_key_file_draws_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch();
    let k = key_file(dir.path(), "k", 0x77);
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    let img = dir.path().join("w.qcow2");
    let (code, _, err) = cli(&["create", path_str(&img), "--key-file", path_str(&k)]);
    assert_eq!(code, 0);
    assert!(
        err.contains("warning") && err.contains("group or others"),
        "{err}"
    );
}

#[test]
fn store_from_a_newer_format_version_is_refused_clearly() {
    let dir = scratch();
    let img = dir.path().join("v.qcow2");
    let i = path_str(&img);
    assert_eq!(cli(&["create", i]).0, 0);
    let mut bytes = std::fs::read(&img).unwrap();
    let at = bytes.windows(8).position(|w| w == b"TPMSTATE").unwrap();
    bytes[at + 8] = tpmstate::format::FORMAT_VERSION as u8 + 1;
    let crc = crc32c::crc32c(&bytes[at..at + 508]);
    bytes[at + 508..at + 512].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let (code, _, err) = cli(&["info", i]);
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("newer"), "{err}");
}

#[test]
fn rekey_of_a_plaintext_store_leaves_no_plaintext_behind() {
    let dir = scratch();
    let img = dir.path().join("s.qcow2");
    let i = path_str(&img);
    let (blob, data) = secret_blob(dir.path());
    assert_eq!(cli(&["create", i]).0, 0);
    for _ in 0..3 {
        assert_eq!(cli(&["put", i, "permall", path_str(&blob)]).0, 0);
    }
    assert!(find(&std::fs::read(&img).unwrap(), b"TPM-OWNER-SECRET-"));
    let k = key_file(dir.path(), "k", 0x12);
    let (code, _, err) = cli(&["rekey", i, "--new-key-file", path_str(&k)]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !find(&std::fs::read(&img).unwrap(), b"TPM-OWNER-SECRET-"),
        "old plaintext left in free space"
    );
    let (code, out, _) = cli(&["get", i, "permall", "--key-file", path_str(&k)]);
    assert_eq!((code, out.as_bytes()), (0, &data[..]));
    assert_eq!(cli(&["check", i, "--key-file", path_str(&k)]).0, 0);
    assert_qemu_check_clean(&img);
}
