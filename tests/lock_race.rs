//! Eight processes increment a counter blob under the writer lock: no update
//! is lost and no two processes ever hold the lock at the same time.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tpmstate::{OpenOptions, Store};

const CHILD_ENV: &str = "TPMSTATE_RACE_CHILD";

fn now_ns() -> u128 {
    // CLOCK_REALTIME is shared by all processes; nanoseconds since the epoch.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[test]
#[ignore = "child-process entry point: its parent test runs it with --ignored"]
fn race_child_increment_loop() {
    let Ok(image) = std::env::var(CHILD_ENV) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let opts = OpenOptions {
            lock_timeout: Some(Duration::from_secs(10)),
            ..Default::default()
        };
        let mut store = Store::open(Path::new(&image), opts).unwrap();
        let start = now_ns();
        let n = store
            .get("counter")
            .unwrap()
            .map(|v| u64::from_le_bytes(v[..8].try_into().unwrap()))
            .unwrap_or(0);
        store.put("counter", &(n + 1).to_le_bytes()).unwrap();
        let end = now_ns();
        drop(store);
        println!("held {start} {end}");
    }
}

#[test]
fn eight_processes_incrementing_under_the_writer_lock_lose_nothing_and_never_overlap() {
    let dir = scratch();
    let img = dir.path().join("race.qcow2");
    assert_eq!(cli(&["create", path_str(&img)]).0, 0);
    let children: Vec<_> = (0..8)
        .map(|_| {
            child_test("race_child_increment_loop", CHILD_ENV, &img)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut intervals = Vec::new();
    for mut c in children {
        for line in BufReader::new(c.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
        {
            if let Some((_, rest)) = line.split_once("held ") {
                let mut it = rest.split(' ').map(|s| s.parse::<u128>().unwrap());
                intervals.push((it.next().unwrap(), it.next().unwrap()));
            }
        }
        assert!(c.wait().unwrap().success());
    }
    let store = tpmstate::ReadOnlyStore::open(&img, OpenOptions::default()).unwrap();
    let counter = u64::from_le_bytes(
        store.get_required("counter").unwrap()[..8]
            .try_into()
            .unwrap(),
    );
    assert_eq!(counter, intervals.len() as u64, "lost updates");
    assert!(
        intervals.len() > 16,
        "too few increments to mean anything: {}",
        intervals.len()
    );
    intervals.sort();
    for w in intervals.windows(2) {
        assert!(w[0].1 <= w[1].0, "holding intervals overlap: {w:?}");
    }
    assert_qemu_check_clean(&img);
}
