//! The control channel: every command with good and bad bodies, state
//! blobs between two emulators (and from swtpm), SET_DATAFD over a unix
//! socket as QEMU uses it, and hostile SET_STATEBLOB input refused with
//! nothing written.

mod common;
use common::emu::*;
use common::*;
use std::io::{IoSlice, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const COUNTER: u32 = 0x0150_0020;
const TPM_BAD_PARAMETER: u32 = 3;
const TPM_BAD_ORDINAL: u32 = 0x0a;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// GET_STATEBLOB (decrypted): its whole answer, header and blob.
fn get_state_blob(port: u16, blob_type: u32) -> Vec<u8> {
    let msg = ctrl_msg(
        0x0c,
        &[
            1u32.to_be_bytes(),
            blob_type.to_be_bytes(),
            0u32.to_be_bytes(),
        ]
        .concat(),
    );
    let head = ctrl_try(port, &msg, 16).unwrap();
    let total = be32(&head, 12) as usize;
    let whole = ctrl_try(port, &msg, 16 + total).unwrap();
    assert_eq!(
        be32(&whole, 8) as usize,
        total,
        "totlength = length from offset 0"
    );
    whole
}

fn generation(image: &Path) -> String {
    let (_, out, _) = cli(&["info", "-U", path_str(image)]);
    out.lines()
        .find(|l| l.starts_with("generation"))
        .unwrap_or("")
        .to_string()
}

#[test]
fn every_control_command_answers_in_swtpms_layout() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let emu = Emu::start(&dir.path().join("nv.qcow2"), &[]);
    let r = |code: u32, body: &[u8], len: usize| emu.ctrl(&ctrl_msg(code, body), len);
    assert_eq!(
        r(0x01, &[], 8),
        [0, 0, 0, 0, 0, 1, 0xff, 0xff],
        "GET_CAPABILITY: 4 zero bytes, then the flags"
    );
    assert_eq!(be32(&r(0x02, &0u32.to_be_bytes(), 4), 0), 0, "INIT");
    let est = r(0x04, &[], 8);
    assert_eq!(be32(&est, 0), 0, "GET_TPMESTABLISHED");
    assert_eq!(
        be32(&r(0x05, &[5, 0, 0, 0], 4), 0),
        0x3d,
        "SET_LOCALITY 5 is TPM_BAD_LOCALITY"
    );
    assert_eq!(be32(&r(0x05, &[0, 0, 0, 0], 4), 0), 0);
    assert_eq!(be32(&r(0x06, &[], 4), 0), 0, "HASH_START");
    assert_eq!(
        be32(&r(0x07, &[&3u32.to_be_bytes()[..], b"abc"].concat(), 4), 0),
        0,
        "HASH_DATA"
    );
    assert_eq!(be32(&r(0x08, &[], 4), 0), 0, "HASH_END");
    assert_eq!(be32(&r(0x09, &[], 4), 0), 0, "CANCEL_TPM_CMD");
    assert_eq!(be32(&r(0x0a, &[], 4), 0), 0, "STORE_VOLATILE");
    let (_, out, _) = cli(&["info", "-U", path_str(&dir.path().join("nv.qcow2"))]);
    assert!(
        out.contains("volatilestate"),
        "STORE_VOLATILE commits the volatile state: {out}"
    );
    assert_eq!(
        be32(&r(0x0b, &[3, 0, 0, 0], 4), 0),
        0,
        "RESET_TPMESTABLISHED at locality 3"
    );
    let perm = get_state_blob(emu.port + 1, 1);
    assert_eq!(be32(&perm, 0), 0);
    assert_eq!(
        &perm[16..22],
        &[2, 1, 0, 10, 0, 4],
        "swtpm's blob header, migration data"
    );
    let missing = r(
        0x0c,
        &[
            &1u32.to_be_bytes()[..],
            &3u32.to_be_bytes(),
            &0u32.to_be_bytes(),
        ]
        .concat(),
        16,
    );
    assert_eq!(
        be32(&missing, 0),
        0x800,
        "no savestate: TPM_RETRY, as swtpm"
    );
    assert_eq!(
        be32(&r(0x11, &8192u32.to_be_bytes(), 4), 0),
        TPM_BAD_ORDINAL,
        "SET_BUFFERSIZE while running"
    );
    let size = r(0x11, &0u32.to_be_bytes(), 16);
    assert_eq!(
        (be32(&size, 0), be32(&size, 4)),
        (0, 4096),
        "SET_BUFFERSIZE query"
    );
    let config = r(0x0f, &[], 8);
    assert_eq!(
        (be32(&config, 0), be32(&config, 4)),
        (0, 0),
        "GET_CONFIG: no key"
    );
    let info = ctrl_all(
        emu.port + 1,
        &ctrl_msg(0x12, &[&1u64.to_be_bytes()[..], &[0; 8]].concat()),
        Duration::from_millis(300),
    );
    assert_eq!(be32(&info, 0), 0);
    assert_eq!(
        be32(&info, 4) as usize,
        info.len() - 12,
        "GET_INFO: totlength covers the text and its NUL"
    );
    assert!(String::from_utf8_lossy(&info[12..]).contains("TPMSpecification"));
    assert_eq!(
        be32(&r(0x10, &[], 4), 0),
        0x1f,
        "SET_DATAFD on a TCP channel is TPM_IOERROR"
    );
    assert_eq!(
        be32(&r(0x13, &300u32.to_be_bytes(), 4), 0),
        0,
        "LOCK_STORAGE: the lock is held already"
    );
    assert_eq!(be32(&r(0x0e, &[], 4), 0), 0, "STOP");
    assert_eq!(
        be32(&r(0x04, &[], 4), 0),
        TPM_BAD_ORDINAL,
        "a stopped TPM has no established bit"
    );
    assert_eq!(
        rc(&emu.command(&get_random(4))),
        0x101,
        "a stopped TPM answers TPM_RC_FAILURE"
    );
    assert_eq!(
        be32(&r(0x11, &3000u32.to_be_bytes(), 16), 4),
        3000,
        "SET_BUFFERSIZE while stopped"
    );
    assert_eq!(
        be32(&r(0x55, &[], 4), 0),
        TPM_BAD_ORDINAL,
        "an unknown command"
    );
    assert_eq!(
        be32(&r(0x02, &[0, 0], 4), 0),
        TPM_BAD_PARAMETER,
        "a short INIT"
    );
    assert_eq!(be32(&r(0x03, &[], 4), 0), 0, "SHUTDOWN");
    assert!(emu.wait().success());
}

#[test]
fn hostile_state_blobs_are_refused_and_nothing_is_written() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nv.qcow2");
    let emu = Emu::start(&image, &[]);
    let port = emu.port + 1;
    let good = get_state_blob(port, 1)[16..].to_vec();
    let before = generation(&image);
    let send = |msg: &[u8]| be32(&ctrl_try(port, msg, 4).unwrap(), 0);
    assert_eq!(
        send(&set_state_blob_msg(1, good.len() as u32, &good)),
        TPM_BAD_ORDINAL,
        "without STOP first"
    );
    assert_eq!(send(&ctrl_msg(0x0e, &[])), 0);
    for n in [1usize, 5, 9] {
        assert_eq!(
            send(&set_state_blob_msg(1, n as u32, &good[..n])),
            TPM_BAD_PARAMETER,
            "{n}-byte blob"
        );
    }
    assert_eq!(
        send(&set_state_blob_msg(1, 512 * 1024 + 1, &good)),
        TPM_BAD_PARAMETER,
        "over 512 KiB"
    );
    assert_eq!(
        send(&set_state_blob_msg(1, 20, &good[..40])),
        TPM_BAD_PARAMETER,
        "more data than its length"
    );
    let mut lying = good.clone();
    lying[9] ^= 1; // the blob header's total length
    assert_eq!(
        send(&set_state_blob_msg(1, lying.len() as u32, &lying)),
        TPM_BAD_PARAMETER,
        "header length disagrees"
    );
    assert_eq!(
        send(&set_state_blob_msg(9, good.len() as u32, &good)),
        TPM_BAD_PARAMETER,
        "unknown blob type"
    );
    // A blob cut short: the sender stops writing before its length.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&set_state_blob_msg(1, 4000, &good[..100]))
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = [0u8; 4];
    std::io::Read::read_exact(&mut s, &mut answer).unwrap();
    assert_eq!(be32(&answer, 0), 0x1f, "a cut-short blob is TPM_IOERROR");
    assert_eq!(
        generation(&image),
        before,
        "no refused blob reached the image"
    );
    // A well-formed blob whose state libtpms refuses is held, and the INIT
    // that would start from it fails and writes nothing; a retried INIT
    // fails too (it must not quietly start the image's older TPM), until
    // an empty SET_STATEBLOB drops the held blob.
    let junk = tpmstate::swtpm::blob::wrap_for_migration(&[0x5a; 1500]).unwrap();
    assert_eq!(send(&set_state_blob_msg(1, junk.len() as u32, &junk)), 0);
    assert_eq!(send(&ctrl_msg(0x02, &0u32.to_be_bytes())), 9, "TPM_FAIL");
    assert_eq!(generation(&image), before, "a refused start wrote nothing");
    assert_eq!(
        send(&ctrl_msg(0x02, &0u32.to_be_bytes())),
        9,
        "the held blob is still held"
    );
    assert_eq!(send(&set_state_blob_msg(1, 0, &[])), 0);
    assert_eq!(
        send(&ctrl_msg(0x02, &0u32.to_be_bytes())),
        0,
        "starts from the image"
    );
    assert_eq!(send(&ctrl_msg(0x0e, &[])), 0);
    // A blob whose rest comes too late is refused, and the connection
    // closed, so its tail cannot run as commands (00000003 is SHUTDOWN).
    let mut late = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    late.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    late.write_all(&set_state_blob_msg(1, 14, &good[..10]))
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = late.write_all(&[0, 0, 0, 3]);
    let mut answers = Vec::new();
    let _ = std::io::Read::read_to_end(&mut late, &mut answers);
    assert_eq!(
        answers,
        [0, 0, 0, 0x1f],
        "one answer, then the connection closes"
    );
    assert_eq!(
        be32(&emu.ctrl(&ctrl_msg(0x01, &[]), 8), 4),
        0x1ffff,
        "and the emulator still runs"
    );
    // The good blob is taken, and the TPM runs from it.
    assert_eq!(send(&set_state_blob_msg(1, good.len() as u32, &good)), 0);
    assert_eq!(send(&ctrl_msg(0x02, &1u32.to_be_bytes())), 0);
    assert_eq!(
        rc(&emu.command(&get_random(4))),
        0x100,
        "TPM_RC_INITIALIZE: running, Startup expected"
    );
}

/// Moves permanent and volatile state from the emulator on `from` to a
/// stopped tpmstate-emu on `to`, as QEMU does in a migration.
fn move_state(from: u16, to: &Emu) {
    let perm = get_state_blob(from, 1);
    let vol = get_state_blob(from, 2);
    let send = |msg: &[u8]| be32(&to.ctrl(msg, 4), 0);
    assert_eq!(send(&ctrl_msg(0x0e, &[])), 0, "STOP");
    for (t, blob) in [(1u32, &perm[16..]), (2, &vol[16..])] {
        assert_eq!(
            send(&set_state_blob_msg(t, blob.len() as u32, blob)),
            0,
            "SET_STATEBLOB {t}"
        );
    }
    assert_eq!(
        send(&ctrl_msg(0x02, &1u32.to_be_bytes())),
        0,
        "INIT with DELETE_VOLATILE"
    );
}

#[test]
fn state_blobs_move_a_tpm_between_two_emulators() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let a = Emu::start(&dir.path().join("a.qcow2"), &[]);
    define_counter(&a, COUNTER);
    for _ in 0..5 {
        assert_eq!(rc(&a.command(&nv_increment(COUNTER))), 0);
    }
    let b = Emu::start(&dir.path().join("b.qcow2"), &[]);
    move_state(a.port + 1, &b);
    assert_eq!(
        counter_of(&b.command(&nv_read8(COUNTER))),
        5,
        "B resumes A's TPM, no Startup needed"
    );
    assert!(b.stop().success());
    let b = Emu::start(&dir.path().join("b.qcow2"), &[]);
    assert_eq!(
        counter_of(&b.command(&nv_read8(COUNTER))),
        5,
        "and keeps it in its own image"
    );
}

#[test]
fn a_tpm_moves_from_swtpm_to_tpmstate_emu() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let port = port_pair();
    let swtpm = start_swtpm(&dir.path().join("swtpm"), port, tcp_args(port));
    define_counter(&swtpm, COUNTER);
    for _ in 0..7 {
        assert_eq!(rc(&swtpm.command(&nv_increment(COUNTER))), 0);
    }
    let emu = Emu::start(&dir.path().join("nv.qcow2"), &[]);
    move_state(swtpm.port + 1, &emu);
    assert_eq!(counter_of(&emu.command(&nv_read8(COUNTER))), 7);
}

#[test]
fn qemus_set_datafd_over_a_unix_control_socket_carries_the_data_channel() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nv.qcow2");
    let sock = dir.path().join("ctrl.sock");
    let mut child = Command::new(emu_bin())
        .args(["socket", "--tpm2", "--ctrl"])
        .arg(format!("type=unixio,path={},mode=0600", sock.display()))
        .arg("--tpmstate")
        .arg(format!("backend-uri=qcow2://{}", image.display()))
        .arg("--terminate")
        .spawn()
        .unwrap();
    let mut waited = 0;
    while !sock.exists() {
        std::thread::sleep(Duration::from_millis(20));
        waited += 1;
        assert!(waited < 500, "no control socket");
    }
    let ctrl = UnixStream::connect(&sock).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds = [theirs.as_raw_fd()];
    let code = 0x10u32.to_be_bytes();
    sendmsg::<()>(
        ctrl.as_raw_fd(),
        &[IoSlice::new(&code)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    drop(theirs);
    let mut answer = [0u8; 4];
    std::io::Read::read_exact(&mut &ctrl, &mut answer).unwrap();
    assert_eq!(answer, [0; 4], "SET_DATAFD");
    (&ctrl)
        .write_all(&ctrl_msg(0x02, &0u32.to_be_bytes()))
        .unwrap();
    std::io::Read::read_exact(&mut &ctrl, &mut answer).unwrap();
    assert_eq!(answer, [0; 4], "INIT");
    let startup = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0];
    (&ours).write_all(&startup).unwrap();
    assert_eq!(
        rc(&read_response(&mut &ours).unwrap()),
        0,
        "TPM2_Startup over the passed socket"
    );
    drop(ours);
    drop(ctrl);
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "--terminate ends it when QEMU's sockets close"
    );
    assert!(!sock.exists(), "the control socket is removed");
}

#[test]
fn data_channel_frames_split_pipelined_and_header_wrapped_commands() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let emu = Emu::start(&dir.path().join("nv.qcow2"), &[]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", emu.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let cmd = get_random(8);
    // Split: the header in one write, the rest later.
    s.write_all(&cmd[..4]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    s.write_all(&cmd[4..]).unwrap();
    assert_eq!(rc(&read_response(&mut s).unwrap()), 0);
    // Two commands in one write: two answers, in order.
    s.write_all(&[cmd.clone(), get_random(4)].concat()).unwrap();
    let first = read_response(&mut s).unwrap();
    let second = read_response(&mut s).unwrap();
    assert_eq!(
        (rc(&first), first.len(), rc(&second), second.len()),
        (0, 20, 0, 16)
    );
    // The send-command header: {8, locality, size} in, {size, response, 0} out.
    let mut framed = 8u32.to_be_bytes().to_vec();
    framed.push(0);
    framed.extend_from_slice(&(cmd.len() as u32).to_be_bytes());
    framed.extend_from_slice(&cmd);
    s.write_all(&framed).unwrap();
    let mut size = [0u8; 4];
    std::io::Read::read_exact(&mut s, &mut size).unwrap();
    let resp = read_response(&mut s).unwrap();
    assert_eq!(u32::from_be_bytes(size) as usize, resp.len());
    let mut ack = [0xffu8; 4];
    std::io::Read::read_exact(&mut s, &mut ack).unwrap();
    assert_eq!((rc(&resp), ack), (0, [0; 4]));
    // A command claiming more than a TPM takes closes the connection.
    s.write_all(&[0x80, 0x01, 0x7f, 0xff, 0xff, 0xff, 0, 0, 1, 0x7b])
        .unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut s, &mut buf).unwrap_or(0), 0);
    assert_eq!(
        rc(&emu.command(&cmd)),
        0,
        "and the emulator serves the next client"
    );
}

#[test]
fn a_start_that_fails_after_libtpms_wrote_commits_nothing() {
    if !emulator_prerequisites() {
        return;
    }
    // No not-need-init: nothing is started, so the image holds no TPM yet.
    let dir = scratch();
    let image = dir.path().join("nv.qcow2");
    let port = port_pair();
    let mut cmd = Command::new(emu_bin());
    cmd.args([
        "socket",
        "--tpm2",
        "--server",
        &format!("type=tcp,port={port}"),
    ])
    .args([
        "--ctrl",
        &format!("type=tcp,port={}", port + 1),
        "--tpmstate",
    ])
    .arg(format!("backend-uri=qcow2://{}", image.display()));
    let emu = Emu::spawn(cmd, port, dir.path().join("log")).unwrap_or_else(|e| panic!("{e}"));
    let before = generation(&image);
    let send = |msg: &[u8]| be32(&emu.ctrl(msg, 4), 0);
    assert_eq!(send(&ctrl_msg(0x0e, &[])), 0);
    // libtpms manufactures a permall while starting, then refuses the volatile state.
    let junk = tpmstate::swtpm::blob::wrap_for_migration(&[0x77; 3000]).unwrap();
    assert_eq!(send(&set_state_blob_msg(2, junk.len() as u32, &junk)), 0);
    assert_eq!(send(&ctrl_msg(0x02, &0u32.to_be_bytes())), 9, "TPM_FAIL");
    assert_eq!(
        generation(&image),
        before,
        "the permall libtpms wrote while starting is not committed"
    );
    let (_, info, _) = cli(&["info", "-U", path_str(&image)]);
    assert!(
        info.contains("no blobs") || !info.contains("permall"),
        "{info}"
    );
}

#[test]
fn a_slow_or_stuck_client_holds_the_others_for_at_most_its_deadline() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let emu = Emu::start(&dir.path().join("nv.qcow2"), &[]);
    // A control client starts a 100 000-byte SET_STATEBLOB and drips.
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", emu.port + 1)).unwrap();
    slow.write_all(&set_state_blob_msg(1, 100_000, &[2]))
        .unwrap();
    let dripper = std::thread::spawn(move || {
        for _ in 0..6 {
            std::thread::sleep(Duration::from_millis(400));
            if slow.write_all(&[1]).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(50));
    let t = std::time::Instant::now();
    assert_eq!(rc(&emu.command(&get_random(8))), 0);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the data channel waited {:?}",
        t.elapsed()
    );
    dripper.join().unwrap();
    // A data client that sends and never reads is dropped; control still answers.
    let mut greedy = std::net::TcpStream::connect(("127.0.0.1", emu.port)).unwrap();
    greedy
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let cmd = get_random(32);
    let flood = std::thread::spawn(move || {
        for _ in 0..200_000 {
            if greedy.write_all(&cmd).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    let t = std::time::Instant::now();
    assert_eq!(emu.ctrl(&ctrl_msg(0x01, &[]), 8).len(), 8);
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "control waited {:?}",
        t.elapsed()
    );
    flood.join().unwrap();
    assert!(emu.stop().success());
}

#[test]
fn a_server_fd_is_a_connection_whose_end_ends_the_emulator() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let (ours, theirs) = UnixStream::pair().unwrap();
    // Inherited by the child: clear close-on-exec on its end.
    nix::fcntl::fcntl(
        theirs.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let mut child = Command::new(emu_bin())
        .args(["socket", "--tpm2", "--flags", "startup-clear", "--server"])
        .arg(format!("type=unixio,fd={}", theirs.as_raw_fd()))
        .arg("--tpmstate")
        .arg(format!(
            "backend-uri=qcow2://{}",
            dir.path().join("nv.qcow2").display()
        ))
        .spawn()
        .unwrap();
    drop(theirs);
    (&ours).write_all(&get_random(8)).unwrap();
    assert_eq!(rc(&read_response(&mut &ours).unwrap()), 0);
    drop(ours);
    assert!(child.wait().unwrap().success());
}
