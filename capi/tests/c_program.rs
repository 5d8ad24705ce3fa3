//! A C program compiled against include/tpmstate.h and the library (the
//! shared one and the static one) creates a store, commits, reads, nests
//! locks, meets a lock conflict from a second process and runs claims that
//! fail (a wrong key, a refusing callback) and one that succeeds; then it
//! runs under valgrind with no leak and no invalid access.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where cargo put this crate's libraries: `deps/` beside the test when
/// `cargo test` built them (a `cargo build` also copies them one level up).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    match deps.join("libtpmstate_c.so").exists() {
        true => deps.to_path_buf(),
        false => deps.parent().unwrap().to_path_buf(),
    }
}

fn tool_here(tool: &str) -> bool {
    let here = Command::new(tool).arg("--version").output().is_ok();
    if !here && std::env::var_os("CI").is_some() {
        panic!("{tool} is not installed (scripts/setup.sh installs it)");
    }
    if !here {
        eprintln!("skipped: {tool} is not installed");
    }
    here
}

fn check(what: &str, out: Output) -> Output {
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Compiles tests/c/api_test.c into `dir`, linked against the shared
/// library (or the static one); returns the program.
fn compile(dir: &Path, shared: bool) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let libs = library_dir();
    let exe = dir.join(if shared {
        "api_test"
    } else {
        "api_test_static"
    });
    let mut cc = Command::new("cc");
    cc.args([
        "-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-pthread", "-I",
    ])
    .arg(manifest.join("include"))
    .arg(manifest.join("tests/c/api_test.c"))
    .arg("-o")
    .arg(&exe);
    match shared {
        true => cc
            .arg("-L")
            .arg(&libs)
            .arg("-ltpmstate_c")
            .arg(format!("-Wl,-rpath,{}", libs.display())),
        false => cc
            .arg(libs.join("libtpmstate_c.a"))
            .args(["-lpthread", "-ldl", "-lm"]),
    };
    check("cc", cc.output().unwrap());
    exe
}

#[test]
fn a_c_program_uses_the_shared_and_the_static_library() {
    if !tool_here("cc") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for shared in [true, false] {
        let exe = compile(dir.path(), shared);
        let work = tempfile::tempdir().unwrap();
        let out = check(
            "api_test",
            Command::new(&exe).arg(work.path()).output().unwrap(),
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("all checks passed"));
    }
}

#[test]
fn the_header_compiles_as_cpp_too() {
    if !tool_here("c++") {
        return;
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("c++")
        .args(["-x", "c++", "-fsyntax-only", "-Wall", "-Werror"])
        .arg(manifest.join("include/tpmstate.h"))
        .output()
        .unwrap();
    check("c++ -fsyntax-only", out);
}

#[test]
fn the_c_program_runs_clean_under_valgrind() {
    if !tool_here("cc") || !tool_here("valgrind") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(dir.path(), true);
    let work = tempfile::tempdir().unwrap();
    let out = Command::new("valgrind")
        .args([
            "--error-exitcode=99",
            "--leak-check=full",
            "--show-leak-kinds=definite,indirect",
            "--errors-for-leak-kinds=definite,indirect",
            "--child-silent-after-fork=yes",
        ])
        .arg(&exe)
        .arg(work.path())
        .output()
        .unwrap();
    let out = check("valgrind api_test", out);
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(report.contains("ERROR SUMMARY: 0 errors"), "{report}");
}

/// The first ```c and ```text blocks of docs/c-api.md.
fn doc_blocks() -> (String, String) {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/c-api.md");
    let text = std::fs::read_to_string(doc).unwrap();
    let block = |tag: &str| {
        let start = text.find(&format!("```{tag}\n")).expect("block") + tag.len() + 4;
        let end = start + text[start..].find("```").expect("block end");
        text[start..end].to_string()
    };
    (block("c"), block("text"))
}

#[test]
fn the_example_in_docs_c_api_md_compiles_runs_and_prints_what_it_says() {
    if !tool_here("cc") {
        return;
    }
    let (program, output) = doc_blocks();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("example.c");
    std::fs::write(&source, program).unwrap();
    let libs = library_dir();
    let exe = dir.path().join("example");
    let cc = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("include"))
        .arg(&source)
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&libs)
        .arg("-ltpmstate_c")
        .arg(format!("-Wl,-rpath,{}", libs.display()))
        .output()
        .unwrap();
    check("cc example.c", cc);
    let out = check(
        "example",
        Command::new(&exe)
            .arg(dir.path().join("nvram.qcow2"))
            .output()
            .unwrap(),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), output);
}
