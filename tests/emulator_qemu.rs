//! Real QEMU (Debian's qemu-system-x86 7.2 with SeaBIOS, no guest disk)
//! drives tpmstate-emu through `-tpmdev emulator` on a unix control socket:
//! SET_DATAFD, QEMU's start-up sequence, SeaBIOS's TPM2_Startup and
//! PCR_Extends; `qemu-img check -U` stays clean meanwhile; QEMU quits and a
//! fresh emulator serves the image.

mod common;
use common::emu::*;
use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn qemu_present() -> bool {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok()
    {
        return true;
    }
    let msg = "qemu-system-x86_64 is not installed (scripts/setup.sh installs Debian's qemu-system-x86 and seabios)";
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("skipped: {msg}");
    false
}

/// Waits until `log` holds every one of `needles`.
fn wait_for_log(log: &Path, needles: &[&str], limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if needles.iter().all(|n| text.contains(n)) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{needles:?} not all in the emulator's log within {limit:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_qemu(ctrl: &Path) -> Child {
    Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35,accel=tcg",
            "-nographic",
            "-nodefaults",
            "-m",
            "128",
        ])
        .args(["-display", "none", "-monitor", "none", "-serial", "none"])
        .arg("-chardev")
        .arg(format!("socket,id=chrtpm,path={}", ctrl.display()))
        .args([
            "-tpmdev",
            "emulator,id=tpm0,chardev=chrtpm",
            "-device",
            "tpm-tis,tpmdev=tpm0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 starts")
}

#[test]
fn qemu_with_seabios_drives_the_emulator_and_a_fresh_one_serves_the_image_after() {
    if !emulator_prerequisites() || !qemu_present() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    let ctrl = dir.path().join("tpm.sock");
    let log = dir.path().join("emu.log");
    // The TPM holds an NV marker before QEMU uses it.
    let setup = Emu::start(&image, &[]);
    setup.tpm2_ok(
        "tpm2_nvdefine",
        &[
            "0x1500018",
            "-C",
            "o",
            "-s",
            "8",
            "-a",
            "ownerread|ownerwrite",
        ],
    );
    let marker = dir.path().join("marker");
    std::fs::write(&marker, b"qemu-run").unwrap();
    setup.tpm2_ok(
        "tpm2_nvwrite",
        &["0x1500018", "-C", "o", "-i", path_str(&marker)],
    );
    assert!(setup.stop().success());
    let generation = || {
        let (_, out, _) = cli(&["info", "-U", path_str(&image)]);
        let line = out
            .lines()
            .find(|l| l.starts_with("generation"))
            .unwrap_or("")
            .to_string();
        line.split_whitespace()
            .nth(1)
            .and_then(|g| g.parse::<u64>().ok())
            .unwrap()
    };
    let before_qemu = generation();
    let mut emu = Command::new(emu_bin())
        .args(["socket", "--tpm2", "--terminate"])
        .arg("--ctrl")
        .arg(format!("type=unixio,path={},mode=0600", ctrl.display()))
        .arg("--tpmstate")
        .arg(format!("backend-uri=qcow2://{}", image.display()))
        .arg("--log")
        .arg(format!("file={},level=5", log.display()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ctrl.exists() {
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut qemu = start_qemu(&ctrl);
    // QEMU's start-up, then SeaBIOS: TPM2_Startup (0x144) and PCR_Extend (0x182).
    let text = wait_for_log(
        &log,
        &[
            "SetDatafd",
            "GetCapability",
            "Init",
            "TPM command 0x144",
            "TPM command 0x182",
        ],
        Duration::from_secs(60),
    );
    assert!(!text.contains("error"), "{text}");
    let (code, out, err) = qemu_img(&["check", "-U", path_str(&image)]);
    assert_eq!(
        code, 0,
        "qemu-img check -U beside the running VM: {out}{err}"
    );
    let (code, _, err) = qemu_img(&["info", path_str(&image)]);
    assert_ne!(code, 0, "the image is locked while the VM runs: {err}");
    // QEMU quits (SIGTERM is an orderly exit): the emulator ends with it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    assert!(qemu.wait().unwrap().code().is_some());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = emu.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the emulator outlived QEMU");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert_qemu_check_clean(&image);
    assert!(
        generation() > before_qemu,
        "QEMU's session committed the TPM's state"
    );
    // A fresh emulator on the image: the same TPM, marker and all.
    let emu = Emu::start(&image, &[]);
    let out = emu.tpm2("tpm2_nvread", &["0x1500018", "-C", "o", "-s", "8"]);
    assert_eq!(
        &out.stdout[..],
        b"qemu-run",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(emu.stop().success());
    assert_qemu_check_clean(&image);
}
