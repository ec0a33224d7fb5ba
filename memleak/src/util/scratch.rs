//! Scratch directories for tests (the library's and the binary's); not part of the API.
use std::{
    fs,
    path::{Path, PathBuf},
};

/// A fresh directory under the system temp dir, removed when dropped.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("memleak-test-{}-{name}", std::process::id()));
        // Left over from an earlier run with the same pid that was killed mid-test.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("creating a scratch directory");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
