//! What tests take from the machine: temporary directories and the
//! programs Debian packages install (nginx, HAProxy, chromium), which
//! `bash .ci/run` installs when missing.

#![allow(clippy::print_stderr)] // a test skipped for a missing package says so

use std::path::{Path, PathBuf};
use std::process::Command;

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new, empty directory named after `name` and this process.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("zlt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// `name` inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where `program` is (on the PATH, or in /usr/sbin, which a user's PATH
/// may lack); else says why the test is skipped.
pub fn installed(program: &str, package: &str) -> Option<PathBuf> {
    let found = [PathBuf::from(program), Path::new("/usr/sbin").join(program)]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok());
    if found.is_none() {
        eprintln!("skipped: {program} not found (apt-get install {package}; `bash .ci/run` does)");
    }
    found
}
