//! tpmstate-emu with real libtpms and real tpm2-tools through the swtpm
//! TCTI: TPM state survives restarts, with and without encryption; the
//! image is locked against QEMU's tools and a second emulator while it
//! runs; bad state and bad control input are refused by name.

mod common;
use common::emu::*;
use common::*;
use std::path::Path;

const NV_DATA: &str = "0x1500016";
const COUNTER: u32 = 0x0150_0017;

/// The TPM work the issue names, through tpm2-tools.
fn make_state(emu: &Emu, dir: &Path) {
    let rand = emu.tpm2_ok("tpm2_getrandom", &["--hex", "16"]);
    assert_eq!(rand.trim().len(), 32, "{rand}");
    emu.tpm2_ok(
        "tpm2_nvdefine",
        &[NV_DATA, "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite"],
    );
    let data = dir.join("nvdata");
    std::fs::write(&data, b"tpmstate keeps this NV data").unwrap();
    emu.tpm2_ok("tpm2_nvwrite", &[NV_DATA, "-C", "o", "-i", path_str(&data)]);
    define_counter(emu, COUNTER);
    for _ in 0..3 {
        emu.tpm2_ok("tpm2_nvincrement", &[&format!("0x{COUNTER:x}"), "-C", "o"]);
    }
    emu.tpm2_ok(
        "tpm2_pcrextend",
        &[&format!("16:sha256={}", "ab".repeat(32))],
    );
    let pcr = emu.tpm2_ok("tpm2_pcrread", &["sha256:16"]);
    assert!(
        !pcr.contains("0x0000000000000000000000000000000000000000000000000000000000000000"),
        "{pcr}"
    );
    let ctx = dir.join("primary.ctx");
    emu.tpm2_ok(
        "tpm2_createprimary",
        &["-C", "o", "-c", path_str(&ctx), "-Q"],
    );
    emu.tpm2_ok(
        "tpm2_evictcontrol",
        &["-C", "o", "-c", path_str(&ctx), "0x81000001"],
    );
}

/// What make_state left must be there after a restart.
fn check_state(emu: &Emu) {
    let out = emu.tpm2("tpm2_nvread", &[NV_DATA, "-C", "o", "-s", "27"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(&out.stdout[..], b"tpmstate keeps this NV data");
    assert_eq!(counter_of(&emu.command(&nv_read8(COUNTER))), 3);
    let handles = emu.tpm2_ok("tpm2_getcap", &["handles-persistent"]);
    assert!(handles.contains("0x81000001"), "{handles}");
    emu.tpm2_ok("tpm2_readpublic", &["-c", "0x81000001"]);
}

#[test]
fn tpm_state_survives_a_restart_of_the_emulator() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    let emu = Emu::start(&image, &[]);
    make_state(&emu, dir.path());
    assert!(emu.stop().success(), "SIGTERM is a clean exit");
    assert_qemu_check_clean(&image);
    let emu = Emu::start(&image, &[]);
    check_state(&emu);
    assert!(emu.stop().success());
    assert_qemu_check_clean(&image);
}

#[test]
fn an_encrypted_store_keeps_state_under_swtpm_key_options_and_refuses_another_key() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    let key = dir.path().join("key");
    std::fs::write(&key, "00112233445566778899aabbccddeeff\n").unwrap();
    let key_opt = format!("file={}", key.display());
    let emu = Emu::start(&image, &["--key", &key_opt]);
    make_state(&emu, dir.path());
    assert!(emu.stop().success());
    let (code, info, _) = cli(&["info", path_str(&image)]);
    assert_eq!(code, 0);
    assert!(info.contains("encrypted:      yes"), "{info}");
    let emu = Emu::start(&image, &["--key", &key_opt]);
    check_state(&emu);
    assert!(emu.stop().success());
    // The permall blob is sealed: its bytes are nowhere in the image.
    let raw = std::fs::read(&image).unwrap();
    assert!(!raw.windows(27).any(|w| w == b"tpmstate keeps this NV data"));
    std::fs::write(&key, "ffeeddccbbaa99887766554433221100\n").unwrap();
    let err = Emu::try_start(&image, &["--key", &key_opt])
        .err()
        .expect("a wrong key is refused");
    assert!(err.contains("nvram.qcow2") && err.contains("key"), "{err}");
    let err = Emu::try_start(&image, &[])
        .err()
        .expect("no key is refused");
    assert!(err.contains("nvram.qcow2"), "{err}");
}

#[test]
fn a_running_emulator_locks_out_qemu_tools_and_a_second_emulator() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    let emu = Emu::start(&image, &[]);
    let (code, _, err) = qemu_img(&["info", path_str(&image)]);
    assert_ne!(code, 0);
    assert!(err.contains("lock"), "{err}");
    let (code, _, err) = decode(
        std::process::Command::new("qemu-io")
            .args(["-c", "read 0 4k", path_str(&image)])
            .output()
            .unwrap(),
    );
    assert_ne!(code, 0);
    assert!(err.contains("lock"), "qemu-io is refused too: {err}");
    let second = Emu::try_start(&image, &[])
        .err()
        .expect("a second emulator is refused");
    assert!(
        second.contains(&format!("pid {}", emu.pid())) && second.contains("tpmstate-emu"),
        "{second}"
    );
    let (code, out, err) = cli(&["info", "-U", path_str(&image)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("permall"), "{out}");
    let (code, out, err) = cli(&["locks", path_str(&image)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&emu.pid().to_string()), "{out}");
    let (code, out, err) = qemu_img(&["check", "-U", path_str(&image)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(emu.stop().success());
    let (code, _, err) = qemu_img(&["info", path_str(&image)]);
    assert_eq!(code, 0, "the lock is released at exit: {err}");
}

#[test]
fn a_blank_qemu_img_image_is_formatted_on_first_use() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("blank.qcow2");
    qemu_img_create(&image, "cluster_size=65536", "4M");
    let emu = Emu::start(&image, &[]);
    assert_eq!(rc(&emu.command(&get_random(8))), 0);
    assert!(emu.stop().success());
    let (code, out, _) = cli(&["info", path_str(&image)]);
    assert_eq!(code, 0);
    assert!(out.contains("permall"), "{out}");
    // An image holding other data is not taken over.
    let other = dir.path().join("other.qcow2");
    qemu_img_create(&other, "cluster_size=65536", "4M");
    let (code, _, err) = decode(
        std::process::Command::new("qemu-io")
            .args(["-c", "write -P 0x55 0 64k", path_str(&other)])
            .output()
            .unwrap(),
    );
    assert_eq!(code, 0, "{err}");
    let err = Emu::try_start(&other, &[])
        .err()
        .expect("an image with data is refused");
    assert!(err.contains("other.qcow2"), "{err}");
}

#[test]
fn a_state_libtpms_refuses_is_named_and_the_image_is_left_as_it_was() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    let emu = Emu::start(&image, &[]);
    assert!(emu.stop().success());
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x5a; 2000]).unwrap();
    let (code, _, err) = cli(&["put", path_str(&image), "permall", path_str(&junk)]);
    assert_eq!(code, 0, "{err}");
    let before = sha(&image);
    let err = Emu::try_start(&image, &[])
        .err()
        .expect("a state libtpms refuses stops the start");
    assert!(
        err.contains("nvram.qcow2") && err.contains("did not start"),
        "{err}"
    );
    assert_eq!(sha(&image), before, "the image is left as it was");
    let log: String = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".log"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(
        log.contains("refuses the state") && log.contains("permall (2000 bytes, from the image)"),
        "the log names the refused blob: {log}"
    );
}

#[test]
fn sigint_shutdown_and_a_closed_connection_under_terminate_end_it_cleanly() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    // SHUTDOWN on the control channel.
    let emu = Emu::start(&image, &[]);
    assert_eq!(emu.ctrl(&ctrl_msg(3, &[]), 4), [0, 0, 0, 0]);
    assert!(emu.wait().success());
    // SIGINT.
    let emu = Emu::start(&image, &[]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(emu.pid() as i32),
        nix::sys::signal::SIGINT,
    )
    .unwrap();
    assert!(emu.wait().success());
    // --terminate: the control connection's end (here: the start-up probe's).
    let emu = Emu::start(&image, &["--terminate"]);
    assert!(emu.wait().success());
    // --terminate: the data connection's end, with no control channel.
    let port = port_pair();
    let mut child = std::process::Command::new(emu_bin())
        .args([
            "socket",
            "--tpm2",
            "--terminate",
            "--flags",
            "startup-clear",
        ])
        .args(["--server", &format!("type=tcp,port={port}"), "--tpmstate"])
        .arg(format!("backend-uri=qcow2://{}", image.display()))
        .spawn()
        .unwrap();
    let mut tries = 0;
    let mut data = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if tries < 500 => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(e) => panic!("no data channel: {e}"),
        }
        tries += 1;
    };
    std::io::Write::write_all(&mut data, &get_random(4)).unwrap();
    assert_eq!(rc(&read_response(&mut data).unwrap()), 0);
    drop(data);
    assert!(child.wait().unwrap().success());
    // --ctrl ...,terminate.
    let port = port_pair();
    let mut cmd = std::process::Command::new(emu_bin());
    cmd.args([
        "socket",
        "--tpm2",
        "--server",
        &format!("type=tcp,port={port}"),
    ])
    .args(["--ctrl", &format!("type=tcp,port={},terminate", port + 1)])
    .args(["--tpmstate"])
    .arg(format!("backend-uri=qcow2://{}", image.display()));
    let emu = Emu::spawn(cmd, port, dir.path().join("log")).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        emu.wait().success(),
        "ended when the probe's control connection closed"
    );
    assert_qemu_check_clean(&image);
}

#[test]
fn a_256_bit_swtpm_key_file_opens_the_image_with_the_tpmstate_cli_too() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    let key = dir.path().join("vtpm.key");
    std::fs::write(&key, "0x".to_string() + &"3c".repeat(31) + "a5\n").unwrap();
    let emu = Emu::start(
        &image,
        &["--key", &format!("file={},mode=aes-256-cbc", key.display())],
    );
    assert!(emu.stop().success());
    // The CLI takes 64 hex digits without the 0x.
    let plain = dir.path().join("plain.key");
    std::fs::write(&plain, "3c".repeat(31) + "a5").unwrap();
    let (code, _, err) = cli(&["check", path_str(&image), "--key-file", path_str(&plain)]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(&[
        "get",
        path_str(&image),
        "permall",
        "--key-file",
        path_str(&plain),
        "-o",
        path_str(&dir.path().join("out")),
    ]);
    assert_eq!(code, 0, "{err}");
}
