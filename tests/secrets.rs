//! No key or passphrase byte shows up anywhere a person or a log could
//! see it: in any command's output or error, in the emulator's log at its
//! most verbose, or in a Debug rendering of the types that hold keys; and
//! every file tpmstate makes that holds state or secrets is mode 0600
//! whatever the umask.

mod common;
use common::{cli, scratch};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use tpmstate::swtpm::key::{Kdf, SwtpmKey, SwtpmSecret};
use tpmstate::{Key, KeySource, OpenOptions};

/// The store key the tests use: distinctive bytes, none zero.
const KEY: [u8; 32] = [
    0x5a, 0xc3, 0x17, 0x9e, 0x42, 0xd8, 0x6b, 0xf1, 0x0d, 0xa4, 0x73, 0x2c, 0xe9, 0x38, 0xb5, 0x61,
    0x8f, 0x14, 0xca, 0x57, 0x9b, 0x26, 0xe3, 0x7d, 0x41, 0xbe, 0x05, 0x92, 0x6f, 0xd1, 0x3a, 0xc7,
];
const PASSPHRASE: &str = "tpmstate secret passphrase 7391";
const SWTPM_KEY: [u8; 16] = [
    0xa1, 0x3b, 0x7e, 0x52, 0xc4, 0x09, 0xd6, 0x8f, 0x21, 0xe7, 0x4a, 0x95, 0x1c, 0xb3, 0x68, 0xf0,
];

/// The key every wrong-key run gives.
const WRONG: [u8; 32] = [7; 32];

/// Panics if `text` holds any rendering of a secret in play (the store
/// key, swtpm's key, the wrong key): any 8 of a key's bytes in a row, raw
/// or in hex (either case), any 3 in Rust's byte-list Debug, or the
/// passphrase.
fn assert_no_secret(what: &str, text: &[u8]) {
    let hay = String::from_utf8_lossy(text).to_lowercase();
    for key in [&KEY[..], &SWTPM_KEY[..], &WRONG[..]] {
        for run in key.windows(8) {
            assert!(
                !hay.contains(&hex::encode(run)),
                "{what}: key bytes in hex: {hay}"
            );
            assert!(!text.windows(8).any(|w| w == run), "{what}: raw key bytes");
        }
        for run in key.windows(3) {
            let list = format!("{}, {}, {}", run[0], run[1], run[2]);
            assert!(!hay.contains(&list), "{what}: key bytes as a list: {hay}");
        }
    }
    assert!(
        !hay.contains(&PASSPHRASE.to_lowercase()),
        "{what}: the passphrase: {hay}"
    );
}

fn secret_files(d: &Path) {
    std::fs::write(d.join("store.key"), hex::encode(KEY)).unwrap();
    std::fs::write(d.join("pass"), PASSPHRASE).unwrap();
    std::fs::write(d.join("swtpm.key"), hex::encode(SWTPM_KEY)).unwrap();
    std::fs::write(d.join("wrong.key"), hex::encode(WRONG)).unwrap();
    std::fs::write(d.join("blob"), b"libtpms state").unwrap();
    for f in ["store.key", "pass", "swtpm.key", "wrong.key"] {
        let p = d.join(f);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

#[test]
fn no_command_prints_a_key_or_passphrase_byte_in_success_or_failure() {
    let dir = scratch();
    let d = dir.path();
    secret_files(d);
    let s = |n: &str| d.join(n).display().to_string();
    let img = s("nv.qcow2");
    let key = format!("--key-file={}", s("store.key"));
    let wrong = format!("--key-file={}", s("wrong.key"));
    let pass = format!("--passphrase-file={}", s("pass"));
    let swtpm_key = format!("--swtpm-key={}", s("swtpm.key"));
    // Each run and whether it succeeds.
    let args_of_runs: Vec<Vec<String>> = [
        vec!["create", &img, &key],
        vec!["put", &img, "permall", &s("blob"), &key],
        vec!["info", &img, &key],
        vec!["info", &img, &key, "--verbose", "--json"],
        vec!["check", &img, &key, "--json"],
        vec!["ls", &img],
        vec!["dump-headers", &img],
        vec!["get", &img, "permall", &wrong],
        vec!["get", &img, "permall"],
        vec!["validate-incoming", &img, &wrong, "--timeout-ms", "100"],
        vec!["export-swtpm", &img, &s("exported"), &key, &swtpm_key],
        vec!["import-swtpm", &s("exported"), &s("wrong.qcow2"), &pass],
        vec![
            "import-swtpm",
            &s("exported"),
            &s("back.qcow2"),
            &swtpm_key,
            &pass,
        ],
        vec!["info", &s("back.qcow2"), &pass, "--verbose"],
        vec!["info", &s("back.qcow2"), &key],
        vec![
            "rekey",
            &img,
            &key,
            &format!("--new-passphrase-file={}", s("pass")),
        ],
        vec!["info", &img, &key],
    ]
    .iter()
    .map(|a| a.iter().map(|s| s.to_string()).collect())
    .collect();
    let outcomes = [
        true, true, true, true, true, true, true, false, false, false, true, false, true, true,
        false, true, false,
    ];
    assert_eq!(
        args_of_runs.len(),
        outcomes.len(),
        "an outcome for every run"
    );
    let runs: Vec<(bool, Vec<String>)> = args_of_runs
        .iter()
        .zip(outcomes)
        .map(|(a, ok)| (ok, a.clone()))
        .collect();
    for (ok, args) in &runs {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = cli(&args);
        assert_eq!(code == 0, *ok, "{args:?}: exit {code}: {err}");
        assert_no_secret(&format!("{args:?} stdout"), out.as_bytes());
        assert_no_secret(&format!("{args:?} stderr"), err.as_bytes());
    }
    assert!(d.join("exported/tpm2-00.permall").exists() && d.join("back.qcow2").exists());
}

#[test]
fn debug_renderings_of_key_holders_show_no_key_byte() {
    let key = Key::from_bytes(&KEY).unwrap();
    let swtpm = SwtpmKey::new(&SWTPM_KEY).unwrap();
    let secret = SwtpmSecret::Passphrase {
        passphrase: zeroize::Zeroizing::new(PASSPHRASE.as_bytes().to_vec()),
        kdf: Kdf::Pbkdf2,
        bits: None,
    };
    let opts = OpenOptions {
        key: Some(KeySource::Key(key.clone())),
        ..Default::default()
    };
    let renderings = [
        format!("{key:?}"),
        format!("{:?}", KeySource::Key(key.clone())),
        format!(
            "{:?}",
            KeySource::Passphrase(zeroize::Zeroizing::new(PASSPHRASE.into()))
        ),
        format!("{opts:?}"),
        format!("{swtpm:?}"),
        format!("{:?}", SwtpmSecret::Key(swtpm.clone())),
        format!("{secret:?}"),
    ];
    for r in renderings {
        assert_no_secret(&r, r.as_bytes());
    }
    // The scan itself finds each rendering it looks for.
    for leak in [
        hex::encode(KEY).to_uppercase(),
        format!("{:?}", &SWTPM_KEY[..]),
        PASSPHRASE.to_string(),
    ] {
        let found = std::panic::catch_unwind(|| assert_no_secret("a leak", leak.as_bytes()));
        assert!(found.is_err(), "not found: {leak}");
    }
}

#[test]
fn the_emulators_most_verbose_log_holds_no_key_byte() {
    if !common::emu::emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    secret_files(d);
    let image = d.join("nv.qcow2");
    let log = d.join("emu.log");
    let key = format!("file={},mode=aes-256-cbc", d.join("store.key").display());
    let migration = format!("file={}", d.join("swtpm.key").display());
    let port = common::emu::port_pair();
    let mut cmd = Command::new(common::emu::emu_bin());
    cmd.args(common::emu::tcp_args(port))
        .arg("--tpmstate")
        .arg(format!("backend-uri=qcow2://{}", image.display()))
        .args(["--key", &key, "--migration-key", &migration])
        .arg("--log")
        .arg(format!("file={},level=20", log.display()));
    let emu = common::emu::Emu::spawn(cmd, port, log.clone()).unwrap();
    emu.tpm2_ok("tpm2_getrandom", &["8"]);
    common::emu::define_counter(&emu, 0x1500040);
    emu.tpm2_ok("tpm2_nvincrement", &["0x1500040", "-C", "o"]);
    let blob = common::emu::fetch_blob(port, 1);
    assert!(!blob.is_empty());
    emu.stop();
    assert_no_secret("the emulator's log", &std::fs::read(&log).unwrap());
    // A wrong key: the refusal names the problem, not the key.
    std::fs::write(d.join("store.key"), hex::encode(WRONG)).unwrap();
    let out = Command::new(common::emu::emu_bin())
        .args(common::emu::tcp_args(common::emu::port_pair()))
        .arg("--tpmstate")
        .arg(format!("backend-uri=qcow2://{}", image.display()))
        .args(["--key", &key])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_no_secret("a wrong key's refusal", &out.stderr);
}

/// Runs the CLI through `sh` with umask 000.
fn cli_umask_000(args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("umask 000; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_tpmstate"))
        .args(args);
    common::decode(cmd.output().unwrap())
}

#[test]
fn every_file_holding_state_is_mode_0600_under_umask_000() {
    let dir = scratch();
    let d = dir.path();
    secret_files(d);
    let s = |n: &str| d.join(n).display().to_string();
    let key = format!("--key-file={}", s("store.key"));
    for args in [
        vec!["create".to_string(), s("a.qcow2"), key.clone()],
        vec![
            "put".into(),
            s("a.qcow2"),
            "permall".into(),
            s("blob"),
            key.clone(),
        ],
        vec![
            "get".into(),
            s("a.qcow2"),
            "permall".into(),
            "-o".into(),
            s("out"),
            key.clone(),
        ],
        vec!["export-swtpm".into(), s("a.qcow2"), s("dir"), key.clone()],
        vec![
            "export-swtpm".into(),
            s("a.qcow2"),
            format!("file://{}", s("linear")),
            key.clone(),
        ],
        vec!["import-swtpm".into(), s("dir"), s("b.qcow2"), key.clone()],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = cli_umask_000(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
    }
    for f in ["a.qcow2", "out", "dir/tpm2-00.permall", "linear", "b.qcow2"] {
        let mode = std::fs::metadata(d.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}: {mode:o}");
    }
}
