//! libvirt's way of making and starting a TPM, without libvirt: Debian's
//! `swtpm_setup` with the arguments libvirt passes manufactures the TPM in
//! a state directory, then `swtpm socket` with libvirt's arguments starts
//! it, through `scripts/swtpm-wrapper.sh` installed as `swtpm`: the state
//! is imported into `D/tpmstate.qcow2` once, the TPM answers with the same
//! EK certificate, a restart does not import again, and swtpm's files are
//! no longer where swtpm would read them.

mod common;
use common::emu::{port_pair, rc, read_response, swtpm_setup_prerequisites, Emu};
use common::{assert_qemu_check_clean, scratch};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The EK certificate's NV index (RSA 2048), which swtpm_setup writes.
const EK_CERT: u32 = 0x01c0_0002;

/// A directory whose `swtpm` is the wrapper, ahead of the system's, with
/// TPMSTATE_EMU naming the emulator built for this test.
fn wrapper_path(dir: &Path) -> String {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/swtpm-wrapper.sh");
    std::fs::copy(wrapper, bin.join("swtpm")).unwrap();
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn env_for(cmd: &mut Command, path: &str) {
    cmd.env("PATH", path)
        .env("TPMSTATE_EMU", common::emu::emu_bin());
}

/// TPM2_NV_Read of `size` bytes at `offset` of `index`, owner authorization.
fn nv_read(index: u32, size: u16, offset: u16) -> Vec<u8> {
    let mut b = 0x4000_0001u32.to_be_bytes().to_vec();
    b.extend_from_slice(&index.to_be_bytes());
    b.extend_from_slice(&9u32.to_be_bytes());
    b.extend_from_slice(&0x4000_0009u32.to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, 0, 0]);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    let mut c = 0x8002u16.to_be_bytes().to_vec();
    c.extend_from_slice(&(10 + b.len() as u32).to_be_bytes());
    c.extend_from_slice(&0x14eu32.to_be_bytes());
    c.extend_from_slice(&b);
    c
}

/// The EK certificate, read in two parts over one data connection.
fn ek_certificate(data: &mut TcpStream) -> Vec<u8> {
    let mut cert = Vec::new();
    for (size, offset) in [(512u16, 0u16), (504, 512)] {
        data.write_all(&nv_read(EK_CERT, size, offset)).unwrap();
        let resp = read_response(data).unwrap();
        assert_eq!(rc(&resp), 0, "NV_Read of the EK certificate: {resp:02x?}");
        cert.extend_from_slice(&resp[16..16 + size as usize]);
    }
    cert
}

/// The TPM started by `swtpm socket` with libvirt's arguments (plus a data
/// channel on TCP for this test; QEMU passes its own with SET_DATAFD):
/// INIT on the control socket, Startup, then the EK certificate. The data
/// connection then closes and `--terminate` ends the emulator.
fn libvirt_start(dir: &Path, state: &Path, path: &str, pass: &Path) -> Vec<u8> {
    let port = port_pair();
    let ctrl = dir.join("ctrl.sock");
    let _ = std::fs::remove_file(&ctrl);
    let log = dir.join("swtpm.log");
    let script = format!(
        "exec swtpm socket --ctrl type=unixio,path={ctrl},mode=0600 \
         --tpmstate dir={state},mode=0600 --log file={log} --terminate --tpm2 \
         --key pwdfd=3,mode=aes-256-cbc --server type=tcp,port={port} 3<{pass}",
        ctrl = ctrl.display(),
        state = state.display(),
        log = log.display(),
        pass = pass.display(),
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    env_for(&mut cmd, path);
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut control = loop {
        if let Ok(s) = UnixStream::connect(&ctrl) {
            break s;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("the emulator exited ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "no control socket in 20 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    control.write_all(&[0, 0, 0, 2, 0, 0, 0, 0]).unwrap(); // INIT
    let mut answer = [0u8; 4];
    control.read_exact(&mut answer).unwrap();
    assert_eq!(answer, [0; 4], "INIT succeeds");
    let mut data = TcpStream::connect(("127.0.0.1", port)).unwrap();
    data.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    data.write_all(&[0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x44, 0, 0])
        .unwrap(); // Startup(CLEAR)
    assert_eq!(rc(&read_response(&mut data).unwrap()), 0);
    let cert = ek_certificate(&mut data);
    drop(data);
    let emu = Emu {
        child: Some(child),
        port,
        log,
    };
    assert!(
        emu.wait().success(),
        "--terminate ends the emulator cleanly"
    );
    cert
}

#[test]
fn libvirts_swtpm_setup_then_swtpm_socket_imports_once_and_serves_the_same_ek() {
    if !swtpm_setup_prerequisites() {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let path = wrapper_path(d);
    let state = d.join("swtpm/4f8a1c2e/tpm2");
    std::fs::create_dir_all(&state).unwrap();
    let pass = d.join("secret");
    std::fs::write(&pass, b"libvirt secret value").unwrap();
    // What libvirt runs (qemu_tpm.c), the passphrase from a file here
    // instead of a descriptor; swtpm_setup finds the wrapper as `swtpm`.
    let mut setup = Command::new("swtpm_setup");
    setup
        .args(["--tpm2", "--tpm-state"])
        .arg(&state)
        .args(["--vmid", "guest:4f8a1c2e", "--logfile"])
        .arg(d.join("setup.log"))
        .args(["--createek", "--create-ek-cert", "--create-platform-cert"])
        .args(["--lock-nvram", "--not-overwrite", "--pwdfile"])
        .arg(&pass)
        .args(["--cipher", "aes-256-cbc"]);
    env_for(&mut setup, &path);
    let out = setup.output().unwrap();
    let setup_log = std::fs::read_to_string(d.join("setup.log")).unwrap_or_default();
    assert!(out.status.success(), "swtpm_setup: {out:?} {setup_log}");
    let permall = state.join("tpm2-00.permall");
    assert!(permall.exists(), "swtpm_setup ran the real swtpm");

    // The EK certificate as swtpm itself serves it.
    let swtpm_port = port_pair();
    let mut cmd = Command::new("/usr/bin/swtpm");
    cmd.args(common::emu::tcp_args(swtpm_port))
        .arg("--tpmstate")
        .arg(format!("dir={}", state.display()))
        .arg("--key")
        .arg(format!("pwdfile={},mode=aes-256-cbc", pass.display()));
    let swtpm = Emu::spawn(cmd, swtpm_port, d.join("real-swtpm.log")).unwrap();
    let mut data = TcpStream::connect(("127.0.0.1", swtpm_port)).unwrap();
    let swtpm_cert = ek_certificate(&mut data);
    drop(data);
    swtpm.stop();

    let cert = libvirt_start(d, &state, &path, &pass);
    assert_eq!(cert, swtpm_cert, "the same EK certificate");
    let image = state.join("tpmstate.qcow2");
    assert!(image.exists());
    assert_qemu_check_clean(&image);
    let log = std::fs::read_to_string(d.join("swtpm.log")).unwrap();
    assert_eq!(log.matches("imported swtpm's state").count(), 1, "{log}");
    let originals: Vec<PathBuf> = ["permall", "volatilestate", "savestate"]
        .iter()
        .map(|n| state.join(format!("tpm2-00.{n}")))
        .collect();
    assert!(originals.iter().all(|p| !p.exists()), "swtpm's files moved");
    let aside = state.join("swtpm-imported/tpm2-00.permall");
    let moved = std::fs::read(&aside).unwrap();

    let again = libvirt_start(d, &state, &path, &pass);
    assert_eq!(again, swtpm_cert, "a restart serves the same TPM");
    let log = std::fs::read_to_string(d.join("swtpm.log")).unwrap();
    assert_eq!(
        log.matches("imported swtpm's state").count(),
        1,
        "no second import: {log}"
    );
    assert_eq!(
        std::fs::read(&aside).unwrap(),
        moved,
        "the moved files stay as they are"
    );
}

/// tpmstate-emu on state directory `state` (`--tpmstate dir=`), on TCP.
fn start_on_dir(state: &Path, log: &Path) -> Result<Emu, String> {
    let port = port_pair();
    let mut cmd = Command::new(common::emu::emu_bin());
    cmd.args(common::emu::tcp_args(port))
        .arg("--tpmstate")
        .arg(format!("dir={}", state.display()))
        .arg("--log")
        .arg(format!("file={}", log.display()));
    Emu::spawn(cmd, port, log.to_path_buf())
}

#[test]
fn swtpm_files_beside_the_image_move_aside_only_when_they_hold_the_images_state() {
    if !swtpm_setup_prerequisites() {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let state = d.join("tpm2");
    std::fs::create_dir(&state).unwrap();
    let out = Command::new("swtpm_setup")
        .args(["--tpm2", "--tpm-state"])
        .arg(&state)
        .args(["--createek", "--overwrite"])
        .output()
        .unwrap();
    assert!(out.status.success(), "swtpm_setup: {out:?}");
    let image = state.join("tpmstate.qcow2");
    let s = |p: &Path| p.display().to_string();
    let log = d.join("emu.log");

    // An import cut short before the move: the image and the same files.
    let (code, _, err) = common::cli(&["import-swtpm", &s(&state), &s(&image)]);
    assert_eq!(code, 0, "{err}");
    start_on_dir(&state, &log).expect("starts").stop();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("hold what"), "{text}");
    assert!(!state.join("tpm2-00.permall").exists());

    // swtpm ran on the directory after an export: its newer state is not
    // dropped, and neither is the image's.
    let (code, _, err) = common::cli(&["export-swtpm", &s(&image), &s(&state)]);
    assert_eq!(code, 0, "{err}");
    let port = port_pair();
    let mut cmd = Command::new("/usr/bin/swtpm");
    cmd.args(common::emu::tcp_args(port))
        .arg("--tpmstate")
        .arg(format!("dir={}", state.display()));
    let swtpm = Emu::spawn(cmd, port, d.join("swtpm.log")).unwrap();
    swtpm.tpm2_ok(
        "tpm2_nvdefine",
        &[
            "0x1500030",
            "-C",
            "o",
            "-s",
            "8",
            "-a",
            "ownerread|ownerwrite",
        ],
    );
    swtpm.stop();
    let image_before = std::fs::read(&image).unwrap();
    let permall_before = std::fs::read(state.join("tpm2-00.permall")).unwrap();
    let err = start_on_dir(&state, &log)
        .err()
        .expect("the start is refused");
    assert!(
        err.contains("refusing to choose") && err.contains("tpm2-00.permall"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&image).unwrap(),
        image_before,
        "the image is untouched"
    );
    assert_eq!(
        std::fs::read(state.join("tpm2-00.permall")).unwrap(),
        permall_before,
        "swtpm's file stays where it is"
    );
}
