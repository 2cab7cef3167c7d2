//! Helpers shared by the unit tests of several modules.

use crate::config::Env;

/// Runs `future` to completion on a fresh single-threaded runtime.
pub(crate) fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
}

/// An environment with no variables set: configuration from defaults and overrides only.
pub(crate) struct NoEnv;

impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

/// Makes `name` a symbolic link to a new file `dir/outside` holding "x", and returns that
/// file: a link a backup restored, or a tampered store planted, pointing out of the folder.
pub(crate) fn link_to_x(dir: &std::path::Path, outside: &str, name: &std::path::Path) -> std::path::PathBuf {
    let target = dir.join(outside);
    std::fs::write(&target, "x").unwrap();
    std::os::unix::fs::symlink(&target, name).unwrap();
    target
}
