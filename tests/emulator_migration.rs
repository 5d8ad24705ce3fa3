//! Live migration of a VM with a vTPM on a shared image, with real QEMU 7.2
//! (Debian's) and SeaBIOS: two QEMUs, two tpmstate-emu, one image. The
//! source hands the image over once QEMU fetched the savestate blob
//! (`--migration release-lock-outgoing`); the target claims it at the
//! first SET_STATEBLOB (`--migration incoming`): exclusive lock, the whole
//! store validated and decrypted with its own key, then writer.

mod common;
use common::emu::*;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NV_INDEX: &str = "0x1500019";
const NV_DATA: &[u8] = b"survives a migration";

/// A QMP connection.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("QMP {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        q.line(); // the greeting
        q.run("qmp_capabilities", json!({}));
        q
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.reader.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP said {l:?}: {e}"))
    }

    /// Runs a command; its "return" (events in between are skipped).
    fn run(&mut self, cmd: &str, args: Value) -> Value {
        let msg = json!({ "execute": cmd, "arguments": args });
        writeln!(self.writer, "{msg}").unwrap();
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            if let Some(e) = v.get("error") {
                panic!("QMP {cmd}: {e}");
            }
        }
    }

    /// Polls query-migrate until it is completed or failed.
    fn migration_outcome(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.run("query-migrate", json!({}))["status"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if ["completed", "failed", "cancelled"].contains(&status.as_str()) {
                return status;
            }
            assert!(Instant::now() < deadline, "migration still {status}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn status(&mut self) -> String {
        self.run("query-status", json!({}))["status"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

/// One side: a tpmstate-emu and its QEMU.
struct Side {
    emu: Child,
    qemu: Child,
    qmp: Qmp,
    log: PathBuf,
}

impl Side {
    /// tpmstate-emu on `image` (with `emu_args`) and its QEMU.
    fn start(dir: &Path, name: &str, image: &Path, emu_args: &[&str], incoming: bool) -> Side {
        let mut args = vec![
            "--tpmstate".to_string(),
            format!("backend-uri=qcow2://{}", image.display()),
        ];
        args.extend(emu_args.iter().map(|a| a.to_string()));
        Side::launch(dir, name, emu_bin(), args, incoming)
    }

    /// Debian's swtpm 0.7.1 on state directory `state` and its QEMU.
    fn start_swtpm(dir: &Path, name: &str, state: &Path, incoming: bool) -> Side {
        std::fs::create_dir_all(state).unwrap();
        let args = vec!["--tpmstate".to_string(), format!("dir={}", state.display())];
        Side::launch(dir, name, "swtpm", args, incoming)
    }

    /// `program` (tpmstate-emu or swtpm, with `state_args`) on a unix
    /// control socket, and a QEMU driving it.
    fn launch(
        dir: &Path,
        name: &str,
        program: &str,
        state_args: Vec<String>,
        incoming: bool,
    ) -> Side {
        let ctrl = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let emu = Command::new(program)
            .args(["socket", "--tpm2", "--terminate", "--ctrl"])
            .arg(format!("type=unixio,path={}", ctrl.display()))
            .arg("--log")
            .arg(format!("file={},level=5", log.display()))
            .args(state_args)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ctrl.exists() {
            assert!(Instant::now() < deadline, "no control socket for {name}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let qmp_path = dir.join(format!("{name}.qmp"));
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(["-machine", "q35,accel=tcg", "-nodefaults", "-m", "128"])
            .args(["-display", "none", "-serial", "none", "-monitor", "none"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .arg("-chardev")
            .arg(format!("socket,id=chrtpm,path={}", ctrl.display()))
            .args([
                "-tpmdev",
                "emulator,id=tpm0,chardev=chrtpm",
                "-device",
                "tpm-tis,tpmdev=tpm0",
            ]);
        if incoming {
            qemu.args(["-incoming", "defer"]);
        }
        let qemu = qemu
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{name}.qemu.err"))).unwrap())
            .spawn()
            .unwrap();
        let mut qmp = Qmp::connect(&qmp_path);
        qmp.run(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "return-path", "state": true}]}),
        );
        Side {
            emu,
            qemu,
            qmp,
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle:?} not in {}:\n{}",
                self.log.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Quits QEMU; the emulator ends with it (--terminate).
    fn quit(mut self) {
        // QEMU may close QMP before it answers "quit".
        let _ = writeln!(self.qmp.writer, "{}", json!({ "execute": "quit" }));
        let _ = self.qemu.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.emu.try_wait().unwrap() {
                assert!(status.success(), "{status}: {}", self.log_text());
                return;
            }
            assert!(Instant::now() < deadline, "the emulator outlived its QEMU");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.emu.kill();
        let _ = self.qemu.wait();
        let _ = self.emu.wait();
    }
}

fn prerequisites() -> bool {
    emulator_prerequisites()
        && Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_ok()
}

/// Provisions a TPM with an NV index holding NV_DATA, by running the emulator alone.
fn provision(image: &Path, key: &[&str]) {
    let emu = Emu::start(image, key);
    emu.tpm2_ok(
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
    let data = image.with_extension("nvdata");
    std::fs::write(&data, NV_DATA).unwrap();
    emu.tpm2_ok(
        "tpm2_nvwrite",
        &[NV_INDEX, "-C", "o", "-i", path_str(&data)],
    );
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

/// Migrates `a`'s VM to `b` (started with -incoming defer); the outcome
/// as the source's QMP reports it.
fn run_migration(a: &mut Side, b: &mut Side) -> String {
    let port = port_pair();
    b.qmp.run(
        "migrate-incoming",
        json!({"uri": format!("tcp:127.0.0.1:{port}")}),
    );
    a.qmp
        .run("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    a.qmp.migration_outcome()
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
    let (mut a, b, outcome) = migrate(dir, image, source_key, target_key);
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
    assert_eq!(sha(image), after_failure, "nothing wrote the image since");
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
    assert!(!a.log_text().contains("error"), "{}", a.log_text());
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
    let perm = ctrl_msg(
        0x0c,
        &[1u32.to_be_bytes(), 1u32.to_be_bytes(), 0u32.to_be_bytes()].concat(),
    );
    let head = ctrl_try(source.port + 1, &perm, 16).unwrap();
    let total = u32::from_be_bytes([head[12], head[13], head[14], head[15]]) as usize;
    let blob = ctrl_try(source.port + 1, &perm, 16 + total).unwrap()[16..].to_vec();
    let before = sha(&image);
    let port = port_pair();
    let mut cmd = Command::new(emu_bin());
    cmd.args(channel_args(port))
        .args(["--migration", "incoming", "--tpmstate"])
        .arg(format!("backend-uri=qcow2://{}", image.display()))
        .arg("--log")
        .arg(format!("file={}", dir.path().join("target.log").display()));
    let target =
        Emu::spawn(cmd, port, dir.path().join("target.log")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ctrl_result(port, &ctrl_msg(0x0e, &[])), 0);
    let set = ctrl_msg(
        0x0d,
        &[
            &0u32.to_be_bytes()[..],
            &1u32.to_be_bytes(),
            &(blob.len() as u32).to_be_bytes(),
            &blob,
        ]
        .concat(),
    );
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
    swtpm.tpm2_ok(
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
    let data = state.join("nvdata");
    std::fs::write(&data, NV_DATA).unwrap();
    swtpm.tpm2_ok(
        "tpm2_nvwrite",
        &[NV_INDEX, "-C", "o", "-i", path_str(&data)],
    );
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

/// Waits until the VM runs, and a moment for SeaBIOS's TPM commands.
fn let_firmware_run(side: &mut Side) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while side.qmp.status() != "running" {
        assert!(Instant::now() < deadline, "the VM does not run");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
}

#[test]
fn a_vm_migrates_from_swtpm_0_7_1_to_tpmstate_emu_each_with_its_own_storage() {
    if !prerequisites() {
        return;
    }
    let dir = scratch();
    let state = dir.path().join("swtpm-a");
    provision_swtpm(&state);
    let mut a = Side::start_swtpm(dir.path(), "a", &state, false);
    let_firmware_run(&mut a);
    let image = dir.path().join("b.qcow2");
    let mut b = Side::start(dir.path(), "b", &image, &["--migration", "incoming"], true);
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
    assert_eq!(nv_data(&image, &[]), NV_DATA);
}

#[test]
fn a_vm_migrates_from_tpmstate_emu_to_swtpm_0_7_1_each_with_its_own_storage() {
    if !prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("a.qcow2");
    provision(&image, &[]);
    let mut a = Side::start(dir.path(), "a", &image, &[], false);
    a.wait_log("TPM command 0x182");
    let state = dir.path().join("swtpm-b");
    let mut b = Side::start_swtpm(dir.path(), "b", &state, true);
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
