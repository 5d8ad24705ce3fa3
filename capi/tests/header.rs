//! include/tpmstate.h is what cbindgen generates from the crate: the C
//! header and the Rust side cannot drift. `TPMSTATE_BLESS=1 cargo test -p
//! tpmstate-c --test header` rewrites it after a change.

use std::path::Path;

#[test]
fn the_c_header_is_what_cbindgen_generates_from_the_crate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen reads the crate")
        .write(&mut generated);
    let path = dir.join("include/tpmstate.h");
    if std::env::var_os("TPMSTATE_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} differs from what cbindgen generates; run TPMSTATE_BLESS=1 cargo test -p tpmstate-c --test header and review the diff",
        path.display()
    );
}
