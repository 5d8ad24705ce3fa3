//! The security review's findings, each reproduced with its exact byte edit
//! on a real image, and each now failing safe: no silent rollback to an
//! older or empty store, forged generations and store ids refused with the
//! key and flagged without it, anti-rollback hooks, key files that cannot
//! be guessed fast, and Argon2id's cost bounded both ways.

mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tpmstate::format::{Directory, Slot};
use tpmstate::{KeySource, OpenOptions, ReadOnlyStore, RollbackPolicy, StoreError};

/// Writes `bytes` at guest offset `guest` of the image's store area.
fn overwrite(image: &Path, guest: u64, bytes: &[u8]) {
    let at = host_offset(image, guest);
    let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn read(image: &Path, guest: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let f = std::fs::File::open(image).unwrap();
    f.read_exact_at(&mut buf, host_offset(image, guest))
        .unwrap();
    buf
}

fn info_json(image: &Path, key: &Path) -> serde_json::Value {
    let (code, out, err) = cli(&[
        "info",
        path_str(image),
        "--json",
        "--key-file",
        path_str(key),
    ]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// An encrypted image and its key, with `puts` commits of permall after format.
fn encrypted(dir: &Path, puts: u8) -> (PathBuf, PathBuf) {
    let img = dir.join("nvram.qcow2");
    let k = key_file(dir, "k", 0x42);
    assert_eq!(
        cli(&["create", path_str(&img), "--key-file", path_str(&k)]).0,
        0
    );
    for round in 0..puts {
        let blob = dir.join("blob");
        std::fs::write(&blob, vec![round; 3000]).unwrap();
        let (code, _, err) = cli(&[
            "put",
            path_str(&img),
            "permall",
            path_str(&blob),
            "--key-file",
            path_str(&k),
        ]);
        assert_eq!(code, 0, "{err}");
    }
    (img, k)
}

fn key_opts(k: &Path, rollback: RollbackPolicy) -> OpenOptions {
    OpenOptions {
        key: Some(KeySource::from_key_file(k).unwrap()),
        rollback,
        ..Default::default()
    }
}

#[test]
fn finding_1_a_damaged_blob_of_the_newest_commit_is_never_served_as_an_empty_store() {
    let dir = scratch();
    let (img, k) = encrypted(dir.path(), 1);
    let (i, kf) = (path_str(&img), path_str(&k));
    let permall = info_json(&img, &k)["blobs"][0]["area_offset"]
        .as_u64()
        .unwrap();
    // The edit: 64 bytes of permall's ciphertext overwritten with zeros.
    overwrite(&img, permall, &[0u8; 64]);
    let (code, _, err) = cli(&["get", i, "permall", "--key-file", kf]);
    assert_eq!(code, 11, "refused as a rollback: {err}");
    assert!(
        err.contains("generation 2") && err.contains("--accept-rollback"),
        "{err}"
    );
    let (code, _, err) = cli(&["put", i, "volatilestate", kf, "--key-file", kf]);
    assert_eq!(code, 11, "no commit on top of a rolled-back store: {err}");
    let (code, out, _) = cli(&["check", i, "--key-file", kf]);
    assert!(
        code == 3 && out.contains("ROLLBACK") && out.contains("generation 2"),
        "{out}"
    );
    // Even the crash-restart policy does not fall back to the empty store.
    let err = ReadOnlyStore::open(&img, key_opts(&k, RollbackPolicy::AcceptTorn)).unwrap_err();
    assert!(
        matches!(err, StoreError::RolledBack { served: 1, .. }),
        "{err}"
    );
    // Only an explicit acceptance serves it.
    let (code, _, err) = cli(&["get", i, "permall", "--key-file", kf, "--accept-rollback"]);
    assert!(code == 1 && err.contains("no blob named"), "{err}");
}

#[test]
fn finding_2_a_zeroed_newest_header_is_found_by_its_directory_or_by_the_expected_generation() {
    let dir = scratch();
    let (img, k) = encrypted(dir.path(), 3);
    let (i, kf) = (path_str(&img), path_str(&k));
    let info = info_json(&img, &k);
    assert_eq!(info["generation"], 4);
    let header = info["header_offset"].as_u64().unwrap();
    assert!(header >= 8192, "the newest commit is chained");
    // The edit: the newest chained header's 512 bytes zeroed.
    overwrite(&img, header, &[0u8; 512]);
    let (code, out, _) = cli(&["check", i, "--key-file", kf]);
    assert!(code == 3 && out.contains("its header is gone"), "{out}");
    let (code, _, err) = cli(&[
        "validate-incoming",
        i,
        "--key-file",
        kf,
        "--require",
        "permall",
    ]);
    assert_eq!(code, 3, "{err}");
    assert_eq!(cli(&["get", i, "permall", "--key-file", kf]).0, 11);
    // The whole block zeroed leaves no trace in the image: the expected
    // generation is what refuses it.
    overwrite(&img, header, &[0u8; 4096]);
    assert_eq!(
        cli(&["check", i, "--key-file", kf]).0,
        0,
        "undetectable from the image alone"
    );
    for args in [
        vec!["check", i, "--key-file", kf, "--expect-generation", "4"],
        vec![
            "get",
            i,
            "permall",
            "--key-file",
            kf,
            "--expect-generation",
            "4",
        ],
        vec![
            "validate-incoming",
            i,
            "--key-file",
            kf,
            "--expect-generation",
            "4",
        ],
    ] {
        let (code, _, err) = cli(&args);
        assert!(
            code == 11 && err.contains("older than the generation 4"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn finding_2_a_zeroed_slot_never_serves_the_empty_first_generation() {
    let dir = scratch();
    let (img, k) = encrypted(dir.path(), 1);
    let (i, kf) = (path_str(&img), path_str(&k));
    assert_eq!(
        info_json(&img, &k)["header_offset"],
        4096,
        "generation 2 is in slot 1"
    );
    // The edit: slot 1's header (512 bytes) zeroed.
    overwrite(&img, 4096, &[0u8; 512]);
    let (code, out, _) = cli(&["check", i, "--key-file", kf]);
    assert!(code == 3 && out.contains("ROLLBACK"), "{out}");
    assert_eq!(cli(&["validate-incoming", i, "--key-file", kf]).0, 3);
    assert_eq!(cli(&["get", i, "permall", "--key-file", kf]).0, 11);
}

/// Rewrites the header in slot `at` and its embedded directory with `edit`,
/// fixing both checksums (the MAC, which needs the key, is left as it was).
fn forge(image: &Path, at: u64, edit: impl Fn(&mut Slot, &mut Directory)) {
    let block = read(image, at, 4096);
    let mut slot = Slot::decode_at(&block[..512], at).unwrap();
    let mut dir = Directory::decode(&block[512..512 + slot.directory.len as usize], &slot).unwrap();
    edit(&mut slot, &mut dir);
    let bytes = dir.encode();
    slot.directory.len = bytes.len() as u32;
    slot.directory_crc = crc32c::crc32c(&bytes);
    let mut new = vec![0u8; 4096];
    new[..512].copy_from_slice(&slot.encode());
    new[512..512 + bytes.len()].copy_from_slice(&bytes);
    overwrite(image, at, &new);
}

#[test]
fn finding_3_a_forged_generation_or_store_id_is_refused_with_the_key_and_flagged_without() {
    for forged_id in [false, true] {
        let dir = scratch();
        let (img, k) = encrypted(dir.path(), 1);
        let (i, kf) = (path_str(&img), path_str(&k));
        forge(&img, 4096, |slot, dir| match forged_id {
            false => {
                slot.generation = 1000;
                dir.generation = 1000;
            }
            true => {
                slot.store_id = [0xee; 16];
                dir.store_id = [0xee; 16];
            }
        });
        let (code, out, err) = cli(&["info", i]);
        assert_eq!(code, 0, "{err}");
        let shown = if forged_id {
            "eeeeeeee"
        } else {
            "generation:     1000"
        };
        assert!(
            out.contains(shown) && out.contains("not verified without the key"),
            "{out}"
        );
        // With the key: a forged generation is skipped as not authentic and
        // refused as a rollback; a forged store id fails the key check,
        // which binds the store id: refused as a wrong key.
        let (code, _, err) = cli(&["get", i, "permall", "--key-file", kf]);
        match forged_id {
            false => assert!(code == 11 && err.contains("does not authenticate"), "{err}"),
            true => assert!(code == 5 && err.contains("store id"), "{err}"),
        }
        let (code, out, _) = cli(&["check", i, "--key-file", kf]);
        match forged_id {
            false => assert!(code == 3 && out.contains("does not authenticate"), "{out}"),
            true => assert_eq!(code, 5, "{out}"),
        }
    }
}

#[test]
fn finding_3_another_store_under_the_same_key_is_refused_by_its_store_id() {
    let dir = scratch();
    let (a, k) = encrypted(dir.path(), 1);
    let id = info_json(&a, &k)["store_id"].as_str().unwrap().to_string();
    let b = dir.path().join("other.qcow2");
    let (bi, kf) = (path_str(&b), path_str(&k));
    assert_eq!(cli(&["create", bi, "--key-file", kf]).0, 0);
    assert_eq!(cli(&["put", bi, "permall", kf, "--key-file", kf]).0, 0);
    assert_eq!(
        cli(&[
            "get",
            path_str(&a),
            "permall",
            "--key-file",
            kf,
            "--expect-store-id",
            &id
        ])
        .0,
        0
    );
    for args in [
        vec![
            "get",
            bi,
            "permall",
            "--key-file",
            kf,
            "--expect-store-id",
            &id,
        ],
        vec![
            "put",
            bi,
            "permall",
            kf,
            "--key-file",
            kf,
            "--expect-store-id",
            &id,
        ],
        vec![
            "validate-incoming",
            bi,
            "--key-file",
            kf,
            "--expect-store-id",
            &id,
        ],
    ] {
        let (code, _, err) = cli(&args);
        assert!(
            code == 11 && err.contains("not the expected store"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn finding_5_a_key_file_of_printable_text_is_refused_with_how_to_make_a_key() {
    let dir = scratch();
    let img = dir.path().join("n.qcow2");
    for (name, content) in [
        ("passphrase", b"correct horse battery staples!!\n".to_vec()),
        ("spaces", vec![b' '; 32]),
        ("hex32", b"0123456789abcdef0123456789abcdef".to_vec()),
    ] {
        let k = dir.path().join(name);
        std::fs::write(&k, &content).unwrap();
        let (code, _, err) = cli(&["create", path_str(&img), "--key-file", path_str(&k)]);
        assert_eq!(code, 1, "{name}: {err}");
        assert!(err.contains("head -c 32 /dev/urandom"), "{name}: {err}");
        assert_eq!(
            content.len(),
            32,
            "{name}: the 32-byte case is the one tested"
        );
        assert!(err.contains("looks like a passphrase"), "{name}: {err}");
        assert!(!img.exists());
    }
    let raw = dir.path().join("raw");
    let mut bytes = [0x41u8; 32];
    bytes[7] = 0x00;
    std::fs::write(&raw, bytes).unwrap();
    assert_eq!(
        cli(&["create", path_str(&img), "--key-file", path_str(&raw)]).0,
        0
    );
}

#[test]
fn finding_6_passphrase_stores_use_rfc_9106_costs_and_hostile_costs_are_refused_unrun() {
    let dir = scratch();
    let img = dir.path().join("p.qcow2");
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "a long enough passphrase\n").unwrap();
    let (i, pf) = (path_str(&img), path_str(&pass));
    assert_eq!(cli(&["create", i, "--passphrase-file", pf]).0, 0);
    let (_, out, _) = cli(&["info", i, "--json"]);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    let kdf = info["key_derivation"].as_str().unwrap();
    assert!(kdf.contains("m=65536 KiB, t=3, p=4"), "{kdf}");
    assert_eq!(cli(&["check", i, "--passphrase-file", pf]).0, 0);
    // The key check depends on Argon2id's output under the stored costs:
    // lowered costs (checksums fixed) make the right passphrase fail it.
    let raise = |m: u32, t: u32| {
        forge(&img, 0, |_, dir| {
            if let Some(enc) = dir.encryption.as_mut() {
                if let tpmstate::format::Kdf::Argon2id {
                    m_kib, t: passes, ..
                } = &mut enc.kdf
                {
                    *m_kib = m;
                    *passes = t;
                }
            }
        })
    };
    raise(64 * 1024, 1);
    let (code, _, err) = cli(&["check", i, "--passphrase-file", pf]);
    assert_eq!(code, 5, "a cheaper KDF does not open it: {err}");
    // Costs above the cap are refused as corrupt before Argon2id runs.
    raise(1 << 20, 3);
    let started = std::time::Instant::now();
    let (code, _, err) = cli(&["check", i, "--passphrase-file", pf]);
    assert!(code == 3 && err.contains("exceed the limits"), "{err}");
    let _ = started; // (the refusal is logic, not a timing: no timed assertion)
}

#[test]
fn both_slots_say_the_store_has_held_state_once_the_second_commit_lands() {
    let dir = scratch();
    let (img, k) = encrypted(dir.path(), 0);
    let (i, kf) = (path_str(&img), path_str(&k));
    assert_eq!(info_json(&img, &k)["held_state"], false);
    let blob = dir.path().join("blob");
    std::fs::write(&blob, b"state").unwrap();
    let put = || {
        assert_eq!(
            cli(&["put", i, "permall", path_str(&blob), "--key-file", kf]).0,
            0
        )
    };
    put();
    let info = info_json(&img, &k);
    assert_eq!(
        (info["held_state"].clone(), info["header_offset"].clone()),
        (true.into(), 4096.into())
    );
    put();
    assert_eq!(
        info_json(&img, &k)["header_offset"],
        0,
        "the second commit marks slot 0"
    );
    put();
    assert!(
        info_json(&img, &k)["header_offset"].as_u64().unwrap() >= 8192,
        "then commits chain"
    );
    // Slot 1 wiped whole (no trace): the store is served from slot 0's
    // chain, and still says it has held state; never an empty new store.
    overwrite(&img, 4096, &[0u8; 4096]);
    let store = ReadOnlyStore::open(&img, key_opts(&k, RollbackPolicy::Refuse)).unwrap();
    assert!(store.has_held_state() && store.contains("permall"));
    drop(store);
    // Deleting every blob keeps the mark.
    assert_eq!(cli(&["rm", i, "permall", "--key-file", kf]).0, 0);
    let (_, out, _) = cli(&["info", i, "--key-file", kf]);
    assert!(out.contains("the store has held state before"), "{out}");
}

#[test]
fn a_zeroed_or_damaged_header_in_either_slot_is_never_a_silent_rollback() {
    // Generation 2 anchors in slot 1, generation 3 in slot 0 (held-state mark).
    for (slot, edit) in [(0u64, "zeroed"), (0, "flipped"), (4096, "flipped")] {
        let dir = scratch();
        let (img, k) = encrypted(dir.path(), 2);
        let (i, kf) = (path_str(&img), path_str(&k));
        let newest = info_json(&img, &k)["header_offset"].as_u64().unwrap();
        assert_eq!(newest, 0, "generation 3 is in slot 0");
        match edit {
            "zeroed" => overwrite(&img, slot, &[0u8; 512]),
            _ => {
                let mut b = read(&img, slot + 20, 1);
                b[0] ^= 0x10;
                overwrite(&img, slot + 20, &b);
            }
        }
        let what = format!("slot at {slot} {edit}");
        let (code, out, _) = cli(&["check", i, "--key-file", kf]);
        assert_eq!(code, 3, "{what}: {out}");
        assert_eq!(
            cli(&["get", i, "permall", "--key-file", kf]).0,
            11,
            "{what}"
        );
        let (code, _, _) = cli(&["info", i, "--key-file", kf]);
        assert_eq!(code, 0, "{what}");
    }
}

#[test]
fn a_damaged_header_inside_a_chain_does_not_hide_the_commits_behind_it() {
    let dir = scratch();
    let (img, k) = encrypted(dir.path(), 7);
    let headers: Vec<u64> = {
        let (_, out, _) = cli(&["dump-headers", path_str(&img)]);
        out.lines()
            .filter_map(|l| l.trim().strip_prefix("chained at area offset "))
            .map(|l| l.split(':').next().unwrap().parse().unwrap())
            .collect()
    };
    assert!(headers.len() >= 4, "a chain to damage: {headers:?}");
    // The edit: one byte of the second chained header.
    let mut b = read(&img, headers[1] + 20, 1);
    b[0] ^= 0x10;
    overwrite(&img, headers[1] + 20, &b);
    // A crash leaves one torn commit; this is more, and refused as such.
    let err = ReadOnlyStore::open(&img, key_opts(&k, RollbackPolicy::AcceptTorn)).unwrap_err();
    assert!(
        matches!(&err, StoreError::RolledBack { skipped, .. } if skipped.len() > 1),
        "{err}"
    );
    let (code, _, err) = cli(&[
        "get",
        path_str(&img),
        "permall",
        "--key-file",
        path_str(&k),
        "--accept-torn-commit",
    ]);
    assert!(code == 11 && err.contains("out of reach"), "{err}");
}

#[test]
fn a_forged_plaintext_generation_over_an_encrypted_store_is_a_rollback_not_a_plaintext_store() {
    let dir = scratch();
    let (img, k) = encrypted(dir.path(), 1);
    forge(&img, 4096, |slot, dir| {
        slot.encrypted = false;
        slot.generation = 50;
        slot.directory_mac = [0; 32];
        dir.generation = 50;
        dir.encryption = None;
        dir.blobs.clear();
    });
    let (code, _, err) = cli(&["get", path_str(&img), "permall", "--key-file", path_str(&k)]);
    assert_eq!(code, 11, "{err}");
}

#[test]
fn a_text_key_an_earlier_version_accepted_opens_with_legacy_key_file_to_rekey() {
    let dir = scratch();
    let text = b"correct horse battery staples!!\n";
    let legacy = dir.path().join("legacy");
    std::fs::write(&legacy, text).unwrap();
    // The store an earlier tpmstate made from that file's 32 bytes.
    let as_hex = dir.path().join("as-hex");
    std::fs::write(&as_hex, hex::encode(text)).unwrap();
    let img = dir.path().join("old.qcow2");
    let i = path_str(&img);
    assert_eq!(cli(&["create", i, "--key-file", path_str(&as_hex)]).0, 0);
    assert_eq!(
        cli(&["check", i, "--key-file", path_str(&legacy)]).0,
        1,
        "refused as a key"
    );
    let (code, _, err) = cli(&["check", i, "--legacy-key-file", path_str(&legacy)]);
    assert!(code == 0 && err.contains("rekey"), "{err}");
    let new = key_file(dir.path(), "new", 0x77);
    let args = [
        "rekey",
        i,
        "--legacy-key-file",
        path_str(&legacy),
        "--new-key-file",
        path_str(&new),
    ];
    assert_eq!(cli(&args).0, 0);
    assert_eq!(cli(&["check", i, "--key-file", path_str(&new)]).0, 0);
}

/// Area offsets of the chained headers `dump-headers` shows behind slot `slot`.
fn chained_headers(img: &Path, slot: usize) -> Vec<u64> {
    let (_, out, _) = cli(&["dump-headers", path_str(img)]);
    out.split(&format!("slot {slot}:"))
        .nth(1)
        .unwrap_or("")
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.trim().strip_prefix("chained at area offset "))
        .map(|l| l.split(':').next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn a_flipped_magic_bit_in_a_chain_does_not_hide_the_commits_behind_it() {
    let dir = scratch();
    let (img, k) = encrypted(dir.path(), 0);
    let (i, kf) = (path_str(&img), path_str(&k));
    // Forty names: a directory too large to embed in its header's block.
    let blob = dir.path().join("blob");
    std::fs::write(&blob, b"x").unwrap();
    for n in 0..40 {
        let name = format!("nvram-index-{n:03}");
        assert_eq!(
            cli(&["put", i, &name, path_str(&blob), "--key-file", kf]).0,
            0
        );
    }
    let anchor = info_json(&img, &k)["slots"]
        .as_array()
        .unwrap()
        .iter()
        .position(|s| {
            s["status"]
                .as_str()
                .unwrap()
                .contains("anchor of the current")
        })
        .expect("the newest commit is chained");
    let chain = chained_headers(&img, anchor);
    assert!(chain.len() >= 3, "{chain:?}");
    // The edit: one bit of the magic of a header in the middle of the chain.
    let at = chain[chain.len() / 2];
    let mut b = read(&img, at, 1);
    b[0] ^= 0x01;
    overwrite(&img, at, &b);
    let (code, out, _) = cli(&["check", i, "--key-file", kf]);
    assert!(code == 3 && out.contains("out of reach"), "{out}");
    assert_eq!(
        cli(&[
            "get",
            i,
            "nvram-index-000",
            "--key-file",
            kf,
            "--accept-torn-commit"
        ])
        .0,
        11
    );
}

#[test]
fn a_zeroed_header_with_commits_behind_it_is_not_taken_for_one_torn_commit() {
    let dir = scratch();
    let (img, k) = encrypted(dir.path(), 6);
    let (i, kf) = (path_str(&img), path_str(&k));
    let chain = chained_headers(&img, 0);
    assert!(chain.len() >= 3, "{chain:?}");
    overwrite(&img, chain[1], &[0u8; 512]);
    let err = ReadOnlyStore::open(&img, key_opts(&k, RollbackPolicy::AcceptTorn)).unwrap_err();
    assert!(
        matches!(&err, StoreError::RolledBack { skipped, .. } if skipped.len() > 1),
        "{err}"
    );
    assert_eq!(
        cli(&["check", i, "--key-file", kf, "-U"]).0,
        3,
        "more than one commit in progress"
    );
    // Accepting the rollback and committing leaves no abandoned newer
    // header behind: damage to the old slot later is one torn-shaped thing.
    let blob = dir.path().join("blob");
    std::fs::write(&blob, b"after").unwrap();
    let (code, _, err) = cli(&[
        "put",
        i,
        "permall",
        path_str(&blob),
        "--key-file",
        kf,
        "--accept-rollback",
    ]);
    assert_eq!(code, 0, "{err}");
    let old_slot = 4096
        * (1 - info_json(&img, &k)["slots"]
            .as_array()
            .unwrap()
            .iter()
            .position(|s| s["status"].as_str().unwrap().contains("current"))
            .unwrap() as u64);
    let mut b = read(&img, old_slot + 20, 1);
    b[0] ^= 0x10;
    overwrite(&img, old_slot + 20, &b);
    let (code, out, err) = cli(&[
        "get",
        i,
        "permall",
        "--key-file",
        kf,
        "--accept-torn-commit",
    ]);
    assert!(code == 0 && out == "after", "{err}");
}

#[test]
fn a_forged_plaintext_generation_over_a_passphrase_store_is_a_rollback() {
    let dir = scratch();
    let img = dir.path().join("p.qcow2");
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "a long enough passphrase\n").unwrap();
    let (i, pf) = (path_str(&img), path_str(&pass));
    assert_eq!(cli(&["create", i, "--passphrase-file", pf]).0, 0);
    assert_eq!(
        cli(&["put", i, "permall", pf, "--passphrase-file", pf]).0,
        0
    );
    assert_eq!(
        cli(&["put", i, "permall", pf, "--passphrase-file", pf]).0,
        0
    );
    let newest = {
        let (_, out, _) = cli(&["info", i, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["header_offset"].as_u64().unwrap()
    };
    forge(&img, newest, |slot, dir| {
        slot.encrypted = false;
        slot.generation = 50;
        slot.directory_mac = [0; 32];
        dir.generation = 50;
        dir.encryption = None;
        dir.blobs.clear();
    });
    let (code, _, err) = cli(&["get", i, "permall", "--passphrase-file", pf]);
    assert_eq!(code, 11, "{err}");
}
