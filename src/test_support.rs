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
