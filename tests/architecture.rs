//! The layout is the architecture: `src/` is a sans-IO core. This test walks
//! `src/` and fails if a core file uses actix, awc, tokio networking, a socket
//! or reads a clock. The binary's entry (`main.rs`) and the `actors` mount are
//! the only exceptions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

/// What the core must not touch.
const FORBIDDEN: &[&str] = &[
    "actix",
    "awc::",
    "tokio::net",
    "std::net::TcpStream",
    "std::net::TcpListener",
    "std::net::UdpSocket",
    "Instant::now",
    "SystemTime::now",
    "rand::",
    "std::fs",
];

/// Lines that may name the runtime: the `#[path]` mount of `actors/`.
fn is_mount(line: &str) -> bool {
    let line = line.trim();
    line == "#[path = \"../actors/mod.rs\"]" || line == "pub mod actors;"
}

/// Scans a file up to its `#[cfg(test)]` module (unit tests sit at the bottom
/// and may read a clock to fabricate instants).
fn violations(text: &str) -> Vec<(usize, &'static str)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim() == "#[cfg(test)]" {
            break;
        }
        if is_mount(line) || line.trim_start().starts_with("//") {
            continue;
        }
        for word in FORBIDDEN {
            if line.contains(word) {
                found.push((n + 1, *word));
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_core_does_no_io() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.retain(|f| f != &src.join("main.rs"));
    assert!(
        files.len() >= 10,
        "scanned only {} files in src/",
        files.len()
    );
    let mut report = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (line, word) in violations(&text) {
            report.push(format!("{}:{line}: uses {word}", file.display()));
        }
    }
    assert!(
        report.is_empty(),
        "IO in the sans-IO core:\n{}",
        report.join("\n")
    );
}

#[test]
fn the_scan_catches_a_planted_violation() {
    let planted = "fn f() {\n    let t = std::time::Instant::now();\n}\nuse actix::prelude::*;\n";
    assert_eq!(violations(planted), vec![(2, "Instant::now"), (4, "actix")]);
    assert_eq!(
        violations("let s = tokio::net::TcpStream::connect(a);"),
        vec![(1, "tokio::net")]
    );
    let after_tests = "fn f() {}\n#[cfg(test)]\nmod tests { fn t() { Instant::now(); } }";
    assert!(violations(after_tests).is_empty());
    assert!(violations("#[path = \"../actors/mod.rs\"]\npub mod actors;").is_empty());
}

#[test]
fn actors_are_mounted_from_lib() {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    assert!(lib.contains("#[path = \"../actors/mod.rs\"]"));
}
