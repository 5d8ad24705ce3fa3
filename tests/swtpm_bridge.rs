//! swtpm state in and out, with real components: state made by Debian's
//! `swtpm_setup` and swtpm 0.7.1 driven by tpm2-tools (EK, an NV index, a
//! counter, a persistent key), plain and encrypted with each form of
//! swtpm's key, imported with `tpmstate import-swtpm`; tpmstate-emu on the
//! image serves the same TPM; exported with `tpmstate export-swtpm`, swtpm
//! serves it again.

mod common;
use common::emu::{port_pair, swtpm_setup_prerequisites, tcp_args, Emu};
use common::{assert_qemu_check_clean, cli, path_str, scratch};
use std::path::{Path, PathBuf};
use std::process::Command;

const NV_INDEX: &str = "0x1500010";
const COUNTER: &str = "0x1500020";
const PERSISTENT: &str = "0x81000010";

/// What a TPM holds that the tests compare across emulators.
#[derive(Debug, PartialEq, Eq)]
struct Facts {
    ek_public: Vec<u8>,
    nv_data: Vec<u8>,
    counter: Vec<u8>,
    persistent_key: String,
}

/// swtpm 0.7.1 on `state` (a directory, or `file://FILE`) with swtpm's
/// `--key` arguments `key`.
fn start_swtpm(state: &str, key: &[String]) -> Emu {
    let port = port_pair();
    let uri = match state.starts_with("file://") {
        true => format!("backend-uri={state}"),
        false => format!("dir={state}"),
    };
    let log = PathBuf::from(format!(
        "{}.swtpm-log{port}",
        state.trim_start_matches("file://")
    ));
    let mut cmd = Command::new("swtpm");
    cmd.args(tcp_args(port))
        .arg("--tpmstate")
        .arg(uri)
        .args(key);
    Emu::spawn(cmd, port, log).expect("swtpm starts")
}

/// Gives the TPM an NV index with data, a counter incremented three times
/// and a persistent primary key.
fn populate(tpm: &Emu, dir: &Path) {
    let ok = |tool: &str, args: &[&str]| tpm.tpm2_ok(tool, args);
    ok(
        "tpm2_nvdefine",
        &[
            NV_INDEX,
            "-C",
            "o",
            "-s",
            "16",
            "-a",
            "ownerread|ownerwrite|no_da",
        ],
    );
    let data = dir.join("nv-data");
    std::fs::write(&data, b"sixteen bytes!!!").unwrap();
    ok(
        "tpm2_nvwrite",
        &[NV_INDEX, "-C", "o", "-i", path_str(&data)],
    );
    ok(
        "tpm2_nvdefine",
        &[
            COUNTER,
            "-C",
            "o",
            "-s",
            "8",
            "-a",
            "ownerread|ownerwrite|nt=counter|no_da",
        ],
    );
    for _ in 0..3 {
        ok("tpm2_nvincrement", &[COUNTER, "-C", "o"]);
    }
    let ctx = dir.join("primary.ctx");
    ok("tpm2_createprimary", &["-C", "o", "-c", path_str(&ctx)]);
    ok(
        "tpm2_evictcontrol",
        &["-C", "o", "-c", path_str(&ctx), PERSISTENT],
    );
    ok("tpm2_flushcontext", &["-t"]);
}

/// Reads the facts back.
fn facts(tpm: &Emu, dir: &Path) -> Facts {
    let ek = dir.join("ek.pub");
    let ctx = dir.join("ek.ctx");
    tpm.tpm2_ok(
        "tpm2_createek",
        &["-c", path_str(&ctx), "-G", "rsa", "-u", path_str(&ek)],
    );
    tpm.tpm2_ok("tpm2_flushcontext", &["-t"]);
    let read = |index: &str, size: &str| {
        let out = tpm.tpm2("tpm2_nvread", &[index, "-C", "o", "-s", size]);
        assert!(out.status.success(), "nvread {index}: {out:?}");
        out.stdout
    };
    let public = tpm.tpm2_ok("tpm2_readpublic", &["-c", PERSISTENT]);
    Facts {
        ek_public: std::fs::read(&ek).unwrap(),
        nv_data: read(NV_INDEX, "16"),
        counter: read(COUNTER, "8"),
        persistent_key: public
            .lines()
            .find(|l| l.starts_with("name:"))
            .expect("readpublic prints the name")
            .to_string(),
    }
}

/// One round trip: how the state is made, swtpm's key arguments, the
/// matching `tpmstate` key options, and the store's own key options.
struct Case<'a> {
    /// `swtpm_setup` arguments, or `None` to let swtpm start from nothing.
    setup: Option<Vec<String>>,
    linear: bool,
    swtpm_key: Vec<String>,
    tpmstate_key: Vec<String>,
    store_key: (&'a [&'a str], &'a [&'a str]),
}

fn round_trip(case: Case) {
    if !swtpm_setup_prerequisites() {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let state = match case.linear {
        true => format!("file://{}", d.join("state.bin").display()),
        false => d.join("swtpm").display().to_string(),
    };
    if !case.linear {
        std::fs::create_dir(d.join("swtpm")).unwrap();
    }
    if let Some(setup) = &case.setup {
        let mut args = vec!["--create-ek-cert", "--create-platform-cert", "--overwrite"];
        args.extend(setup.iter().map(String::as_str));
        swtpm_setup(Path::new(&state), &args);
    }
    let swtpm = start_swtpm(&state, &case.swtpm_key);
    populate(&swtpm, d);
    let before = facts(&swtpm, d);
    swtpm.stop();

    let image = d.join("tpm.qcow2");
    let mut args = vec!["import-swtpm", &state, path_str(&image)];
    args.extend(case.tpmstate_key.iter().map(String::as_str));
    args.extend(case.store_key.0);
    let (code, out, err) = cli(&args);
    assert_eq!(code, 0, "import: {out}{err}");
    assert_qemu_check_clean(&image);

    let emu = Emu::start(&image, case.store_key.1);
    assert_eq!(facts(&emu, d), before, "tpmstate-emu serves swtpm's TPM");
    emu.tpm2_ok("tpm2_nvincrement", &[COUNTER, "-C", "o"]);
    let after = facts(&emu, d);
    assert_ne!(after.counter, before.counter);
    emu.stop();

    let back = match case.linear {
        true => format!("file://{}", d.join("back.bin").display()),
        false => d.join("back").display().to_string(),
    };
    let mut args = vec!["export-swtpm", path_str(&image), &back];
    args.extend(case.store_key.0);
    args.extend(case.tpmstate_key.iter().map(String::as_str));
    let (code, out, err) = cli(&args);
    assert_eq!(code, 0, "export: {out}{err}");
    let swtpm = start_swtpm(&back, &case.swtpm_key);
    assert_eq!(facts(&swtpm, d), after, "swtpm serves the exported TPM");
    swtpm.stop();
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

/// Key files live beside the test's state, in a directory kept for the test.
fn keys_dir() -> tempfile::TempDir {
    scratch()
}

#[test]
fn plain_state_from_swtpm_setup_round_trips() {
    round_trip(Case {
        setup: Some(vec![]),
        linear: false,
        swtpm_key: vec![],
        tpmstate_key: vec![],
        store_key: (&[], &[]),
    });
}

#[test]
fn state_under_a_128_bit_hex_key_round_trips_into_an_encrypted_store() {
    let k = keys_dir();
    let key = write(k.path(), "swtpm.hex", b"00112233445566778899aabbccddeeff\n");
    let store_key = write(k.path(), "store.key", &[7u8; 32]);
    let store_file = format!("--key-file={store_key}");
    let emu_key = format!("file={store_key},format=binary,mode=aes-256-cbc");
    round_trip(Case {
        setup: Some(vec!["--keyfile".into(), key.clone()]),
        linear: false,
        swtpm_key: vec!["--key".into(), format!("file={key}")],
        tpmstate_key: vec![format!("--swtpm-key={key}")],
        store_key: (&[&store_file], &["--key", &emu_key]),
    });
}

#[test]
fn state_under_a_passphrase_with_a_256_bit_key_round_trips() {
    // libvirt's way: swtpm_setup --pwdfile --cipher aes-256-cbc.
    let k = keys_dir();
    let pass = write(k.path(), "pass", b"correct horse battery staple");
    round_trip(Case {
        setup: Some(vec![
            "--pwdfile".into(),
            pass.clone(),
            "--cipher".into(),
            "aes-256-cbc".into(),
        ]),
        linear: false,
        swtpm_key: vec!["--key".into(), format!("pwdfile={pass},mode=aes-256-cbc")],
        tpmstate_key: vec![format!("--swtpm-pwdfile={pass},mode=aes-256-cbc")],
        store_key: (&[], &[]),
    });
}

#[test]
fn state_under_a_binary_256_bit_key_round_trips() {
    let k = keys_dir();
    let bytes: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    let key = write(k.path(), "swtpm.bin", &bytes);
    let spec = format!("{key},format=binary,mode=aes-256-cbc");
    round_trip(Case {
        setup: None,
        linear: false,
        swtpm_key: vec!["--key".into(), format!("file={spec}")],
        tpmstate_key: vec![format!("--swtpm-key={spec}")],
        store_key: (&[], &[]),
    });
}

#[test]
fn state_under_a_sha512_passphrase_key_round_trips() {
    let k = keys_dir();
    let pass = write(k.path(), "pass", b"another passphrase");
    round_trip(Case {
        setup: None,
        linear: false,
        swtpm_key: vec!["--key".into(), format!("pwdfile={pass},kdf=sha512")],
        tpmstate_key: vec![format!("--swtpm-pwdfile={pass},kdf=sha512")],
        store_key: (&[], &[]),
    });
}

#[test]
fn a_linear_file_under_a_256_bit_hex_key_round_trips() {
    let k = keys_dir();
    let key = write(k.path(), "swtpm.hex", hex::encode([0x42u8; 32]).as_bytes());
    let spec = format!("{key},mode=aes-256-cbc");
    round_trip(Case {
        setup: None,
        linear: true,
        swtpm_key: vec!["--key".into(), format!("file={spec}")],
        tpmstate_key: vec![format!("--swtpm-key={spec}")],
        store_key: (&[], &[]),
    });
}

/// The files of `dir`, by name, with their bytes' SHA-256.
fn snapshot(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, hex::encode(common::sha(&e.path())))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn every_corruption_of_a_swtpm_file_has_its_own_error_and_creates_nothing() {
    if !swtpm_setup_prerequisites() {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let key = write(d, "swtpm.hex", b"00112233445566778899aabbccddeeff");
    let wrong = write(d, "wrong.hex", b"ffeeddccbbaa99887766554433221100");
    let good = d.join("good");
    std::fs::create_dir(&good).unwrap();
    swtpm_setup(&good, &["--keyfile", &key, "--overwrite"]);
    let permall = std::fs::read(good.join("tpm2-00.permall")).unwrap();
    let len = permall.len();
    // The TLVs of swtpm's encrypted state file: header 10, TLV2 (data)
    // header 6 and ciphertext, then TLV3 (HMAC) header 6 and 32 bytes, then
    // TLV6 (IV) header 6 and 16 bytes.
    let hmac_at = len - 22 - 32;
    let data_at = 10 + 6 + 100;
    type Change = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Change, &str, i32, &str)> = vec![
        (
            "data bit flip",
            Box::new(move |b| b[data_at] ^= 4),
            &key,
            3,
            "was changed",
        ),
        (
            "HMAC bit flip",
            Box::new(move |b| b[hmac_at] ^= 1),
            &key,
            3,
            "was changed",
        ),
        (
            "truncation",
            Box::new(|b| b.truncate(b.len() - 100)),
            &key,
            3,
            "truncated",
        ),
        ("wrong key", Box::new(|_| {}), &wrong, 5, "the keys differ"),
        (
            "header of 9 bytes",
            Box::new(|b| b.truncate(9)),
            &key,
            3,
            "10-byte",
        ),
        (
            "unknown version",
            Box::new(|b| b[1] = 3),
            &key,
            3,
            "version",
        ),
    ];
    for (what, change, key, code, says) in cases {
        let case = d.join(what.replace(' ', "-"));
        std::fs::create_dir(&case).unwrap();
        let mut bytes = permall.clone();
        change(&mut bytes);
        std::fs::write(case.join("tpm2-00.permall"), &bytes).unwrap();
        let before = snapshot(&case);
        let image = d.join(format!("{}.qcow2", what.replace(' ', "-")));
        let (got, out, err) = cli(&[
            "import-swtpm",
            path_str(&case),
            path_str(&image),
            &format!("--swtpm-key={key}"),
        ]);
        assert_eq!(got, code, "{what}: {out}{err}");
        assert!(err.contains(says), "{what}: {err}");
        assert!(
            err.contains("tpm2-00.permall"),
            "{what}: names the file: {err}"
        );
        assert!(!image.exists(), "{what}: no image is created");
        assert_eq!(snapshot(&case), before, "{what}: no file changes");
        let leftovers: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{what}: no temporary file is left");
    }

    let empty = d.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let image = d.join("empty.qcow2");
    let (got, _, err) = cli(&["import-swtpm", path_str(&empty), path_str(&image)]);
    assert_eq!(got, 2, "{err}");
    assert!(err.contains("no tpm2-00.permall"), "{err}");
    assert!(!image.exists());

    let (got, _, err) = cli(&["import-swtpm", path_str(&good), path_str(&image)]);
    assert_eq!(got, 4, "{err}");
    assert!(
        err.contains("--swtpm-key"),
        "says which option is missing: {err}"
    );
    assert!(!image.exists());
}

/// `swtpm_setup --tpm2 --tpmstate STATE --createek` with `extra`; asserts success.
fn swtpm_setup(state: &Path, extra: &[&str]) {
    let out = Command::new("swtpm_setup")
        .args(["--tpm2", "--tpmstate", path_str(state), "--createek"])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "swtpm_setup: {out:?}");
}

#[test]
fn an_import_never_replaces_an_existing_image_and_an_export_no_swtpm_files() {
    if !swtpm_setup_prerequisites() {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let state = d.join("swtpm");
    std::fs::create_dir(&state).unwrap();
    swtpm_setup(&state, &["--overwrite"]);
    let image = d.join("tpm.qcow2");
    std::fs::write(&image, b"something precious").unwrap();
    let (got, _, err) = cli(&["import-swtpm", path_str(&state), path_str(&image)]);
    assert_eq!(got, 1, "{err}");
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&image).unwrap(), b"something precious");

    std::fs::remove_file(&image).unwrap();
    let (got, _, err) = cli(&["import-swtpm", path_str(&state), path_str(&image)]);
    assert_eq!(got, 0, "{err}");
    let before = snapshot(&state);
    let (got, _, err) = cli(&["export-swtpm", path_str(&image), path_str(&state)]);
    assert_eq!(got, 1, "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(snapshot(&state), before);
    let (got, _, err) = cli(&[
        "export-swtpm",
        path_str(&image),
        path_str(&state),
        "--force",
    ]);
    assert_eq!(got, 0, "{err}");
    let exported = hex::encode(common::sha(&state.join("tpm2-00.permall")));
    let old = &before
        .iter()
        .find(|(n, _)| n == "tpm2-00.permall")
        .unwrap()
        .1;
    assert_eq!(
        &exported, old,
        "the state imported, exported again, is byte for byte swtpm's"
    );
}

#[test]
fn nothing_imports_or_exports_a_directory_a_running_swtpm_uses() {
    if !swtpm_setup_prerequisites() {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let state = d.join("swtpm");
    std::fs::create_dir(&state).unwrap();
    let swtpm = start_swtpm(path_str(&state), &[]);
    let image = d.join("tpm.qcow2");
    let (got, _, err) = cli(&["import-swtpm", path_str(&state), path_str(&image)]);
    assert_eq!(got, 6, "{err}");
    assert!(
        err.contains("swtpm process") && err.contains(".lock"),
        "{err}"
    );
    assert!(!image.exists());

    // tpmstate-emu on the same directory, libvirt's way, does not start.
    let port = port_pair();
    let out = Command::new(common::emu::emu_bin())
        .args(tcp_args(port))
        .arg("--tpmstate")
        .arg(format!("dir={}", state.display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("swtpm process"), "{err}");
    assert!(state.join("tpm2-00.permall").exists(), "swtpm's files stay");
    assert!(!state.join("tpmstate.qcow2").exists());

    // Nor does an export write under it.
    let other = d.join("other.qcow2");
    let (got, _, err) = cli(&["create", path_str(&other)]);
    assert_eq!(got, 0, "{err}");
    std::fs::write(d.join("p"), b"state").unwrap();
    let (got, _, err) = cli(&["put", path_str(&other), "permall", path_str(&d.join("p"))]);
    assert_eq!(got, 0, "{err}");
    let before = snapshot(&state);
    let (got, _, err) = cli(&[
        "export-swtpm",
        path_str(&other),
        path_str(&state),
        "--force",
    ]);
    assert_eq!(got, 6, "{err}");
    assert_eq!(snapshot(&state), before);
    swtpm.stop();

    let (got, _, err) = cli(&["import-swtpm", path_str(&state), path_str(&image)]);
    assert_eq!(got, 0, "once swtpm has stopped: {err}");
}

#[test]
fn swtpms_lock_file_is_never_followed_through_a_symlink() {
    let dir = scratch();
    let d = dir.path();
    let image = d.join("tpm.qcow2");
    std::fs::write(d.join("p"), b"state").unwrap();
    for args in [
        vec!["create", path_str(&image)],
        vec!["put", path_str(&image), "permall", path_str(&d.join("p"))],
    ] {
        let (got, _, err) = cli(&args);
        assert_eq!(got, 0, "{err}");
    }
    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();
    let victim = d.join("victim");
    std::os::unix::fs::symlink(&victim, out.join(".lock")).unwrap();
    let (got, _, err) = cli(&["export-swtpm", path_str(&image), path_str(&out)]);
    assert_eq!(got, 8, "{err}");
    assert!(err.contains(".lock"), "{err}");
    assert!(
        !victim.exists(),
        "nothing is created where the symlink points"
    );
    assert!(!out.join("tpm2-00.permall").exists());
}
