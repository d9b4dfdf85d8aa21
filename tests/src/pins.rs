//! A private bpffs pin directory per test, removed (with everything pinned
//! in it) when the guard drops, also on panic.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `/sys/fs/bpf/PREFIX-PID-N`, unique per process and call.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new(prefix: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!("/sys/fs/bpf/{prefix}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Unpinning a link detaches it once no process holds it.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
