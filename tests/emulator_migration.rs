//! Live migration of a VM with a vTPM on a shared image, with real QEMU 7.2
//! (Debian's) and SeaBIOS: two QEMUs, two tpmstate-emu, one image. The
//! source hands the image over once QEMU fetched the savestate blob
//! (`--migration release-lock-outgoing`); the target claims it at the
//! first SET_STATEBLOB (`--migration incoming`): exclusive lock, the whole
//! store validated and decrypted with its own key, then writer.

mod common;
use common::emu::*;
use common::qemu::*;
use common::*;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const NV_INDEX: &str = "0x1500019";
const NV_DATA: &[u8] = b"survives a migration";

fn prerequisites() -> bool {
    emulator_prerequisites()
        && Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_ok()
}

/// NV_DATA into a new NV index of the TPM `tpm` serves; `data` is a
/// scratch file for it.
fn write_nv_data(tpm: &Emu, data: &Path) {
    tpm.tpm2_ok(
        "tpm2_nvdefine",
        &[
            NV_INDEX,
            "-C",
            "o",
            "-s",
            "20",
            "-a",
            "ownerread|ownerwrite",
        ],
    );
    std::fs::write(data, NV_DATA).unwrap();
    tpm.tpm2_ok("tpm2_nvwrite", &[NV_INDEX, "-C", "o", "-i", path_str(data)]);
}

/// A migration target (`--migration incoming`) on `image`, on TCP channels,
/// logging to `dir/target.log`; and its port.
fn incoming_target(dir: &Path, image: &Path) -> (Emu, u16) {
    let port = port_pair();
    let log = dir.join("target.log");
    let mut cmd = Command::new(emu_bin());
    cmd.args(channel_args(port))
        .args(["--migration", "incoming", "--tpmstate"])
        .arg(format!("backend-uri=qcow2://{}", image.display()))
        .arg("--log")
        .arg(format!("file={}", log.display()));
    (
        Emu::spawn(cmd, port, log).unwrap_or_else(|e| panic!("{e}")),
        port,
    )
}

/// Provisions a TPM with an NV index holding NV_DATA, by running the emulator alone.
fn provision(image: &Path, key: &[&str]) {
    let emu = Emu::start(image, key);
    write_nv_data(&emu, &image.with_extension("nvdata"));
    assert!(emu.stop().success());
}

/// The NV data a fresh emulator reads from the image.
fn nv_data(image: &Path, key: &[&str]) -> Vec<u8> {
    let emu = Emu::start(image, key);
    let out = emu.tpm2("tpm2_nvread", &[NV_INDEX, "-C", "o", "-s", "20"]);
    assert!(emu.stop().success());
    out.stdout
}

fn lock_holders(image: &Path) -> String {
    cli(&["locks", path_str(image)]).1
}

/// Starts both sides and migrates; the source's QMP reports the outcome.
fn migrate(
    dir: &Path,
    image: &Path,
    source_key: &[&str],
    target_key: &[&str],
) -> (Side, Side, String) {
    let mut a_args = vec!["--migration", "release-lock-outgoing"];
    a_args.extend_from_slice(source_key);
    let mut b_args = vec!["--migration", "incoming"];
    b_args.extend_from_slice(target_key);
    let a = Side::start(dir, "a", image, &a_args, false);
    a.wait_log("TPM command 0x182"); // SeaBIOS ran and extended PCRs
    let mut b = Side::start(dir, "b", image, &b_args, true);
    let mut a = a;
    let outcome = run_migration(&mut a, &mut b);
    (a, b, outcome)
}

#[test]
fn a_vm_migrates_on_a_shared_image_and_the_source_never_writes_it_again() {
    if !prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    provision(&image, &[]);
    let (a, mut b, outcome) = migrate(dir.path(), &image, &[], &[]);
    assert_eq!(
        outcome,
        "completed",
        "source:\n{}\ntarget:\n{}",
        a.log_text(),
        b.log_text()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.qmp.status() != "running" {
        assert!(Instant::now() < deadline, "the target VM does not run");
        std::thread::sleep(Duration::from_millis(100));
    }
    let b_pid = b.emu.id().to_string();
    assert!(
        lock_holders(&image).contains(&b_pid),
        "the target holds the image: {}",
        lock_holders(&image)
    );
    assert!(
        b.log_text().contains("claimed for the incoming migration"),
        "{}",
        b.log_text()
    );
    assert!(a.log_text().contains("handed over"), "{}", a.log_text());
    let before = sha(&image);
    a.quit();
    assert_eq!(
        sha(&image),
        before,
        "the source wrote nothing after handing the image over"
    );
    b.quit();
    assert_qemu_check_clean(&image);
    assert_eq!(nv_data(&image, &[]), NV_DATA);
}

/// Two 256-bit key files in `dir`, mode 0600, and the `--key` options naming them.
fn two_keys(dir: &Path) -> (String, String) {
    let mut opts = Vec::new();
    for (name, byte) in [("k1", "11"), ("k2", "22")] {
        let k = dir.join(name);
        std::fs::write(&k, byte.repeat(32)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        opts.push(format!("file={},mode=aes-256-cbc", k.display()));
    }
    (opts[0].clone(), opts[1].clone())
}

/// A migration the target must refuse (its log saying `why`): it fails,
/// the source resumes and takes the image back, nothing else writes it,
/// and the NV data is intact.
fn refused_migration(
    dir: &Path,
    image: &Path,
    source_key: &[&str],
    target_key: &[&str],
    why: &str,
) {
    provision(image, source_key);
    let (a, b, outcome) = migrate(dir, image, source_key, target_key);
    assert_eq!(
        outcome,
        "failed",
        "source:\n{}\ntarget:\n{}",
        a.log_text(),
        b.log_text()
    );
    assert!(
        b.log_text().contains("refusing the incoming migration") && b.log_text().contains(why),
        "the target says why: {}",
        b.log_text()
    );
    source_recovers(a, b, image, source_key, true);
}

/// After a failed migration: the source VM runs again, takes the image back
/// on QEMU's LOCK_STORAGE, nothing else writes it (when `untouched`: the
/// target wrote nothing), the VM's firmware is served after a reset, and
/// the NV data is intact.
fn source_recovers(mut a: Side, b: Side, image: &Path, source_key: &[&str], untouched: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.qmp.status() != "running" {
        assert!(Instant::now() < deadline, "the source VM did not resume");
        std::thread::sleep(Duration::from_millis(100));
    }
    // QEMU 7.2 sends LOCK_STORAGE(300) after a failed migration to an
    // emulator that advertises it (swtpm 0.7.1 does not): the source
    // takes the image back at once. Taking it back writes nothing, and
    // the failed target wrote nothing and holds nothing.
    a.wait_log("taken back (LOCK_STORAGE)");
    let a_pid = a.emu.id().to_string();
    assert!(
        lock_holders(image).contains(&a_pid),
        "{}",
        lock_holders(image)
    );
    let after_failure = sha(image);
    drop(b);
    std::thread::sleep(Duration::from_millis(300));
    if untouched {
        assert_eq!(sha(image), after_failure, "nothing wrote the image since");
    }
    // The source serves its VM: a reset makes SeaBIOS talk to the TPM.
    let commands = a.log_text().matches("TPM command 0x182").count();
    a.qmp.run("system_reset", json!({}));
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.log_text().matches("TPM command 0x182").count() <= commands {
        assert!(
            Instant::now() < deadline,
            "SeaBIOS sent no PCR_Extend after the reset:\n{}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    if untouched {
        assert!(!a.log_text().contains("error"), "{}", a.log_text());
    }
    a.quit();
    assert_qemu_check_clean(image);
    assert_eq!(nv_data(image, source_key), NV_DATA);
}

#[test]
fn a_target_with_another_key_fails_the_migration_and_the_source_takes_the_image_back() {
    if !prerequisites() {
        return;
    }
    let dir = scratch();
    let (k1, k2) = two_keys(dir.path());
    let image = dir.path().join("nvram.qcow2");
    refused_migration(
        dir.path(),
        &image,
        &["--key", &k1],
        &["--key", &k2],
        "wrong key",
    );
}

#[test]
fn a_target_without_the_key_of_an_encrypted_store_fails_the_migration() {
    if !prerequisites() {
        return;
    }
    let dir = scratch();
    let (k1, _) = two_keys(dir.path());
    let image = dir.path().join("nvram.qcow2");
    refused_migration(
        dir.path(),
        &image,
        &["--key", &k1],
        &[],
        "the store is encrypted",
    );
}

#[test]
fn a_target_with_a_key_for_a_plaintext_store_fails_the_migration() {
    if !prerequisites() {
        return;
    }
    let dir = scratch();
    let (k1, _) = two_keys(dir.path());
    let image = dir.path().join("nvram.qcow2");
    refused_migration(dir.path(), &image, &[], &["--key", &k1], "not encrypted");
}

/// The control channel on TCP `port + 1`: one message, its 4-byte result.
fn ctrl_result(port: u16, msg: &[u8]) -> u32 {
    let r = ctrl_try(port + 1, msg, 4).unwrap();
    u32::from_be_bytes([r[0], r[1], r[2], r[3]])
}

#[test]
fn a_released_source_writes_nothing_even_on_shutdown_and_takes_the_image_back_at_the_next_command()
{
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    provision(&image, &[]);
    let emu = Emu::start(&image, &["--migration", "release-lock-outgoing"]);
    let savestate = ctrl_msg(
        0x0c,
        &[1u32.to_be_bytes(), 3u32.to_be_bytes(), 0u32.to_be_bytes()].concat(),
    );
    assert_eq!(ctrl_try(emu.port + 1, &savestate, 16).unwrap().len(), 16);
    assert!(
        !lock_holders(&image).contains(&emu.pid().to_string()),
        "released: {}",
        lock_holders(&image)
    );
    let released = sha(&image);
    // The next TPM command takes it back, then writes.
    define_counter(&emu, 0x0150_0060);
    assert!(
        lock_holders(&image).contains(&emu.pid().to_string()),
        "{}",
        lock_holders(&image)
    );
    assert_ne!(sha(&image), released);
    // Released again, the emulator's end (SHUTDOWN) writes nothing.
    assert_eq!(ctrl_try(emu.port + 1, &savestate, 16).unwrap().len(), 16);
    let released = sha(&image);
    assert_eq!(ctrl_result(emu.port, &ctrl_msg(0x03, &[])), 0);
    assert!(emu.wait().success());
    assert_eq!(sha(&image), released, "nothing written after the hand-over");
    assert_eq!(nv_data(&image, &[]), NV_DATA);
}

#[test]
fn a_target_that_cannot_lock_in_3_s_refuses_set_stateblob_and_writes_nothing() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    provision(&image, &[]);
    // The source never lets go (no release-lock-outgoing).
    let source = Emu::start(&image, &[]);
    let blob = fetch_blob(source.port, 1);
    let before = sha(&image);
    let (target, port) = incoming_target(dir.path(), &image);
    assert_eq!(ctrl_result(port, &ctrl_msg(0x0e, &[])), 0);
    let set = set_blob(1, &blob);
    let t = Instant::now();
    assert_eq!(
        ctrl_result(port, &set),
        0x1f,
        "TPM_IOERROR, as swtpm answers a target that cannot lock"
    );
    assert!(
        t.elapsed() >= Duration::from_secs(3),
        "it waited for the source"
    );
    let log = std::fs::read_to_string(dir.path().join("target.log")).unwrap();
    assert!(
        log.contains("refusing the incoming migration") && log.contains(&source.pid().to_string()),
        "{log}"
    );
    assert_eq!(sha(&image), before);
    assert!(!lock_holders(&image).contains(&target.pid().to_string()));
    drop(target);
    drop(source);
}

/// NV_DATA written into a new swtpm state directory `state`.
fn provision_swtpm(state: &Path) {
    let port = port_pair();
    let swtpm = start_swtpm(state, port, tcp_args(port));
    write_nv_data(&swtpm, &state.join("nvdata"));
    assert!(swtpm.stop().success());
}

/// The NV data a swtpm on `state` reads.
fn swtpm_nv_data(state: &Path) -> Vec<u8> {
    let port = port_pair();
    let swtpm = start_swtpm(state, port, tcp_args(port));
    let out = swtpm.tpm2("tpm2_nvread", &[NV_INDEX, "-C", "o", "-s", "20"]);
    assert!(swtpm.stop().success());
    out.stdout
}

/// swtpm 0.7.1 -> tpmstate-emu, each with its own storage; both sides
/// given `migration_key` (swtpm's `--migration-key` syntax), if any.
fn from_swtpm(migration_key: &[&str]) {
    let dir = scratch();
    let state = dir.path().join("swtpm-a");
    provision_swtpm(&state);
    let mut a = Side::start_swtpm(dir.path(), "a", &state, migration_key, false);
    let_firmware_run(&mut a);
    let image = dir.path().join("b.qcow2");
    let mut b_args = vec!["--migration", "incoming"];
    b_args.extend_from_slice(migration_key);
    let mut b = Side::start(dir.path(), "b", &image, &b_args, true);
    let outcome = run_migration(&mut a, &mut b);
    // swtpm's level-5 log is long: the target's says why.
    assert_eq!(outcome, "completed", "target:\n{}", b.log_text());
    a.quit();
    b.quit();
    assert_eq!(nv_data(&image, &[]), NV_DATA);
}

/// tpmstate-emu -> swtpm 0.7.1, each with its own storage.
fn to_swtpm(migration_key: &[&str]) {
    let dir = scratch();
    let image = dir.path().join("a.qcow2");
    provision(&image, &[]);
    let mut a = Side::start(dir.path(), "a", &image, migration_key, false);
    a.wait_log("TPM command 0x182");
    let state = dir.path().join("swtpm-b");
    let mut b = Side::start_swtpm(dir.path(), "b", &state, migration_key, true);
    let outcome = run_migration(&mut a, &mut b);
    assert_eq!(
        outcome,
        "completed",
        "source:\n{}\ntarget:\n{}",
        a.log_text(),
        b.log_text()
    );
    a.quit();
    b.quit();
    assert_eq!(swtpm_nv_data(&state), NV_DATA);
}

/// A migration key file (256-bit, hex) and a passphrase file in `dir`.
fn migration_secrets(dir: &Path) -> (String, String) {
    use std::os::unix::fs::PermissionsExt;
    let key = dir.join("migration.key");
    std::fs::write(&key, "5a".repeat(32)).unwrap();
    let pass = dir.join("migration.pass");
    std::fs::write(&pass, "a migration passphrase\n").unwrap();
    for f in [&key, &pass] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    (
        format!("file={},mode=aes-256-cbc", key.display()),
        format!("pwdfile={}", pass.display()),
    )
}

#[test]
fn a_vm_migrates_from_swtpm_0_7_1_to_tpmstate_emu_each_with_its_own_storage() {
    if !prerequisites() {
        return;
    }
    from_swtpm(&[]);
    let keys = scratch();
    let (key, pass) = migration_secrets(keys.path());
    from_swtpm(&["--migration-key", &key]);
    from_swtpm(&["--migration-key", &pass]);
}

#[test]
fn a_vm_migrates_from_tpmstate_emu_to_swtpm_0_7_1_each_with_its_own_storage() {
    if !prerequisites() {
        return;
    }
    to_swtpm(&[]);
    let keys = scratch();
    let (key, pass) = migration_secrets(keys.path());
    to_swtpm(&["--migration-key", &key]);
    to_swtpm(&["--migration-key", &pass]);
}

#[test]
fn blobs_under_a_migration_key_are_refused_by_a_target_without_it() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let (key, _) = migration_secrets(dir.path());
    let a = Emu::start(&dir.path().join("a.qcow2"), &["--migration-key", &key]);
    let blob = fetch_blob(a.port, 1);
    assert_eq!(
        blob[5] & 0x06,
        0x06,
        "migration-encrypted: header flags {:#x}",
        blob[5]
    );
    let set = set_blob(1, &blob);
    let other = dir.path().join("other.key");
    std::fs::write(&other, "5b".repeat(32)).unwrap();
    let other = format!("file={},mode=aes-256-cbc", other.display());
    for extra in [vec![], vec!["--migration-key".to_string(), other]] {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let b = Emu::start(&dir.path().join("b.qcow2"), &extra);
        assert_eq!(ctrl_result(b.port, &ctrl_msg(0x0e, &[])), 0);
        assert_eq!(ctrl_result(b.port, &set), 3, "TPM_BAD_PARAMETER");
        assert!(b.stop().success());
    }
}

/// For contrast, recorded and not asserted: the same migrations between two
/// swtpm 0.7.1 on one shared state directory (`docs/migration.md` shows
/// both side by side).
#[test]
fn for_contrast_swtpm_0_7_1_on_a_shared_directory() {
    if !prerequisites() {
        return;
    }
    let mut report = String::new();
    for (case, target_key) in [("same key", false), ("another key", true)] {
        let dir = scratch();
        let (k1, k2) = two_keys(dir.path());
        let state = dir.path().join("shared");
        std::fs::create_dir_all(&state).unwrap();
        let port = port_pair();
        let mut args = tcp_args(port);
        args.extend(["--key".to_string(), k1.clone()]);
        let swtpm = start_swtpm(&state, port, args);
        write_nv_data(&swtpm, &dir.path().join("nvdata"));
        assert!(swtpm.stop().success());
        let key_args = |k: &str| {
            vec![
                "--tpmstate".to_string(),
                format!("dir={}", state.display()),
                "--key".into(),
                k.into(),
            ]
        };
        let mut a = Side::launch(dir.path(), "a", "swtpm", key_args(&k1), false);
        let_firmware_run(&mut a);
        let b_key = if target_key { &k2 } else { &k1 };
        let mut b = Side::launch(dir.path(), "b", "swtpm", key_args(b_key), true);
        let outcome = run_migration(&mut a, &mut b);
        let source_status = a.qmp.status();
        a.quit();
        b.quit();
        // Can the source's configuration still read the shared state?
        let port = port_pair();
        let mut args = tcp_args(port);
        args.extend(["--key".to_string(), k1.clone()]);
        let readable = match Emu::spawn(
            {
                let mut c = Command::new("swtpm");
                c.args(args)
                    .arg("--tpmstate")
                    .arg(format!("dir={}", state.display()));
                c
            },
            port,
            dir.path().join("after.log"),
        ) {
            Ok(s) => {
                let out = s.tpm2("tpm2_nvread", &[NV_INDEX, "-C", "o", "-s", "20"]);
                out.stdout == NV_DATA
            }
            Err(e) => {
                report.push_str(&format!(
                    "  ({case}: swtpm with the source's key fails to start: {})\n",
                    e.lines().next().unwrap_or("")
                ));
                false
            }
        };
        report.push_str(&format!(
            "swtpm 0.7.1 shared dir, target with {case}: migration {outcome}, source VM {source_status}, \
             the source's key reads the state afterwards: {readable}\n"
        ));
    }
    eprintln!("{report}");
    std::fs::write(
        std::env::temp_dir().join("tpmstate-swtpm-contrast.txt"),
        &report,
    )
    .unwrap();
}

#[test]
fn a_target_killed_before_switchover_fails_the_migration_and_the_source_takes_the_image_back() {
    if !prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    provision(&image, &[]);
    let mut a = Side::start(
        dir.path(),
        "a",
        &image,
        &["--migration", "release-lock-outgoing"],
        false,
    );
    a.wait_log("TPM command 0x182");
    let mut b = Side::start(dir.path(), "b", &image, &["--migration", "incoming"], true);
    let caps = json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]});
    a.qmp.run("migrate-set-capabilities", caps);
    let port = port_pair();
    b.qmp.run(
        "migrate-incoming",
        json!({"uri": format!("tcp:127.0.0.1:{port}")}),
    );
    a.qmp
        .run("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.qmp.run("query-migrate", json!({}))["status"] != "pre-switchover" {
        assert!(
            Instant::now() < deadline,
            "the migration never paused before switchover"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = b.emu.kill();
    let _ = b.emu.wait();
    a.qmp
        .run("migrate-continue", json!({"state": "pre-switchover"}));
    assert_eq!(a.qmp.migration_outcome(), "failed", "{}", a.log_text());
    source_recovers(a, b, &image, &[], true);
}

#[test]
fn an_image_damaged_before_the_target_claims_fails_the_migration_and_the_source_repairs_it() {
    if !prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    provision(&image, &[]);
    let mut a = Side::start(
        dir.path(),
        "a",
        &image,
        &["--migration", "release-lock-outgoing"],
        false,
    );
    a.wait_log("TPM command 0x182");
    let mut b = Side::start(dir.path(), "b", &image, &["--migration", "incoming"], true);
    // The target waits (stopped) while the image is damaged between the
    // source's hand-over and the target's claim.
    let b_pid = nix::unistd::Pid::from_raw(b.emu.id() as i32);
    nix::sys::signal::kill(b_pid, nix::sys::signal::SIGSTOP).unwrap();
    let port = port_pair();
    b.qmp.run(
        "migrate-incoming",
        json!({"uri": format!("tcp:127.0.0.1:{port}")}),
    );
    a.qmp
        .run("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    a.wait_log("handed over");
    for slot in tpmstate::format::SLOT_OFFSETS {
        flip(&image, host_offset(&image, slot + 100), 0x40);
    }
    nix::sys::signal::kill(b_pid, nix::sys::signal::SIGCONT).unwrap();
    assert_eq!(a.qmp.migration_outcome(), "failed", "{}", a.log_text());
    b.wait_log("refusing the incoming migration");
    source_recovers(a, b, &image, &[], false);
    let log = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
    assert!(
        log.contains("damaged while handed over") && log.contains("every blob written again"),
        "{log}"
    );
}

#[test]
fn a_target_whose_state_libtpms_refuses_lets_the_image_go_unchanged() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    provision(&image, &[]);
    let source = Emu::start(&image, &["--migration", "release-lock-outgoing"]);
    let savestate = ctrl_msg(
        0x0c,
        &[1u32.to_be_bytes(), 3u32.to_be_bytes(), 0u32.to_be_bytes()].concat(),
    );
    assert_eq!(ctrl_try(source.port + 1, &savestate, 16).unwrap().len(), 16);
    let handed_over = sha(&image);
    let (target, port) = incoming_target(dir.path(), &image);
    let junk = tpmstate::swtpm::blob::wrap_for_migration(&[0x5a; 1500]).unwrap();
    let set = set_blob(1, &junk);
    assert_eq!(ctrl_result(port, &ctrl_msg(0x0e, &[])), 0);
    assert_eq!(
        ctrl_result(port, &set),
        0,
        "the claim succeeds: the store itself is sound"
    );
    assert!(lock_holders(&image).contains(&target.pid().to_string()));
    assert_eq!(
        ctrl_result(port, &ctrl_msg(0x02, &1u32.to_be_bytes())),
        9,
        "libtpms refuses the state"
    );
    assert!(
        !lock_holders(&image).contains(&target.pid().to_string()),
        "let go: {}",
        lock_holders(&image)
    );
    assert_eq!(sha(&image), handed_over, "unchanged");
    // The source takes it back at its next TPM command.
    assert_eq!(rc(&source.command(&get_random(8))), 0);
    assert!(lock_holders(&image).contains(&source.pid().to_string()));
    drop(target);
    assert!(source.stop().success());
    assert_eq!(nv_data(&image, &[]), NV_DATA);
}

/// A released source on `image` (TCP channels), and the savestate request
/// that released it.
fn released_source(image: &Path) -> Emu {
    let source = Emu::start(image, &["--migration", "release-lock-outgoing"]);
    let savestate = ctrl_msg(
        0x0c,
        &[1u32.to_be_bytes(), 3u32.to_be_bytes(), 0u32.to_be_bytes()].concat(),
    );
    assert_eq!(ctrl_try(source.port + 1, &savestate, 16).unwrap().len(), 16);
    assert!(!lock_holders(image).contains(&source.pid().to_string()));
    source
}

#[test]
fn a_source_never_takes_back_an_image_a_target_has_committed_to() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    provision(&image, &[]);
    let source = released_source(&image);
    let blob = fetch_blob(source.port, 1);
    // A target takes the state and commits.
    let (target, port) = incoming_target(dir.path(), &image);
    let set = set_blob(1, &blob);
    assert_eq!(ctrl_result(port, &ctrl_msg(0x0e, &[])), 0);
    assert_eq!(ctrl_result(port, &set), 0);
    assert_eq!(ctrl_result(port, &ctrl_msg(0x02, &1u32.to_be_bytes())), 0);
    assert!(target.stop().success());
    let committed = sha(&image);
    // The source's TPM must not resume from its stale state.
    assert_eq!(rc(&source.command(&get_random(8))), 0x101, "TPM_RC_FAILURE");
    assert_eq!(
        ctrl_result(source.port, &ctrl_msg(0x13, &10u32.to_be_bytes())),
        9
    );
    assert_eq!(sha(&image), committed, "the source wrote nothing");
    let log = std::fs::read_to_string(&source.log).unwrap();
    assert!(log.contains("cannot take the image back"), "{log}");
    drop(source);
    assert_eq!(nv_data(&image, &[]), NV_DATA);
}

#[test]
fn a_permall_damaged_while_handed_over_is_written_again_from_the_tpms_memory() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    provision(&image, &[]);
    let source = released_source(&image);
    let (_, json, _) = cli(&["info", "-U", "--json", path_str(&image)]);
    let info: serde_json::Value = serde_json::from_str(&json).unwrap();
    let permall = info["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "permall")
        .unwrap();
    let at = permall["area_offset"].as_u64().unwrap() + 100;
    flip(&image, host_offset(&image, at), 0x20);
    assert_eq!(
        ctrl_result(source.port, &ctrl_msg(0x13, &300u32.to_be_bytes())),
        0,
        "LOCK_STORAGE"
    );
    let log = std::fs::read_to_string(&source.log).unwrap();
    assert!(log.contains("every blob written again"), "{log}");
    let (code, out, err) = cli(&["check", "-U", path_str(&image)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(source.stop().success());
    assert_eq!(nv_data(&image, &[]), NV_DATA);
}

#[test]
fn a_blank_qemu_img_image_of_the_targets_own_is_formatted_inside_the_claim() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let source_image = dir.path().join("a.qcow2");
    provision(&source_image, &[]);
    let source = Emu::start(&source_image, &[]);
    let blob = fetch_blob(source.port, 1);
    let image = dir.path().join("blank.qcow2");
    qemu_img_create(&image, "cluster_size=65536", "4M");
    let before = sha(&image);
    let (target, port) = incoming_target(dir.path(), &image);
    assert_eq!(sha(&image), before, "nothing done to it at start");
    let set = set_blob(1, &blob);
    assert_eq!(ctrl_result(port, &ctrl_msg(0x0e, &[])), 0);
    assert_eq!(ctrl_result(port, &set), 0);
    assert_eq!(ctrl_result(port, &ctrl_msg(0x02, &1u32.to_be_bytes())), 0);
    assert!(target.stop().success());
    assert_eq!(nv_data(&image, &[]), NV_DATA);
}
