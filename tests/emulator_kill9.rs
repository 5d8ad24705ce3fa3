//! kill -9 during a stream of NV writes, 50 times (TPMSTATE_EMU_KILLS=N for
//! a campaign; docs/testing.md records one): every restart serves a
//! TPM at least as new as the last acknowledged write (and at most the one
//! write in flight newer), and `qemu-img check` stays clean each time.
//! An emulator answers a command only after its state write committed.

mod common;
use common::emu::*;
use common::*;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const COUNTER: u32 = 0x0150_0030;
/// Kills in a run: 50, or TPMSTATE_EMU_KILLS.
fn kills() -> usize {
    std::env::var("TPMSTATE_EMU_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

/// Increments the counter until the connection dies; counts the acknowledged ones.
fn stream_increments(port: u16, acked: Arc<AtomicU64>) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let cmd = nv_increment(COUNTER);
    loop {
        if s.write_all(&cmd).is_err() {
            return;
        }
        match read_response(&mut s) {
            Ok(r) if rc(&r) == 0 => {
                acked.fetch_add(1, Ordering::SeqCst);
            }
            Ok(r) => panic!("NV_Increment failed: {r:02x?}"),
            Err(_) => return,
        }
    }
}

#[test]
fn every_restart_after_kill_9_serves_the_last_acknowledged_nv_write() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    let emu = Emu::start(&image, &[]);
    define_counter(&emu, COUNTER);
    assert_eq!(rc(&emu.command(&nv_increment(COUNTER))), 0);
    let mut known = 1u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7e57);
    let mut emu = Some(emu);
    let mut writes = 0;
    let kills = kills();
    for round in 0..kills {
        let running = emu.take().unwrap();
        let acked = Arc::new(AtomicU64::new(0));
        let client = {
            let (port, acked) = (running.port, acked.clone());
            std::thread::spawn(move || stream_increments(port, acked))
        };
        std::thread::sleep(Duration::from_millis(rng.gen_range(5..60)));
        running.kill9();
        client.join().unwrap();
        let acked = acked.load(Ordering::SeqCst);
        writes += acked;
        assert_qemu_check_clean(&image);
        let restarted = Emu::start(&image, &[]);
        let value = counter_of(&restarted.command(&nv_read8(COUNTER)));
        assert!(
            value >= known + acked && value <= known + acked + 1,
            "round {round}: counter {value}, but {known} before and {acked} acknowledged since"
        );
        known = value;
        emu = Some(restarted);
    }
    assert!(
        writes > kills as u64,
        "the kills landed during writes ({writes} acknowledged)"
    );
    assert!(emu.take().unwrap().stop().success());
    assert_qemu_check_clean(&image);
    eprintln!("{kills} kills, {writes} acknowledged NV writes, none lost");
}
