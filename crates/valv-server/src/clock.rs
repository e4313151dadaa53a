//! What time it is. The server asks a [`Clock`] instead of the system, so tests can move time
//! (session timeouts, lockouts, TOTP windows, enrollment expiry) without waiting.

use std::path::PathBuf;

pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        crate::now_ms()
    }
}

/// A clock read from a file holding milliseconds since the epoch, re-read on every call; the
/// system clock while the file is missing or unreadable. Only debug builds honour it (the
/// `VALV_TEST_CLOCK_FILE` variable of the test suite); release builds refuse to start with it.
pub struct FileClock(pub PathBuf);

impl Clock for FileClock {
    fn now_ms(&self) -> i64 {
        std::fs::read_to_string(&self.0).ok().and_then(|s| s.trim().parse().ok()).unwrap_or_else(crate::now_ms)
    }
}

/// The clock to use: the system's, or in debug builds the file named by `VALV_TEST_CLOCK_FILE`.
pub fn from_env() -> Result<std::sync::Arc<dyn Clock>, String> {
    match std::env::var_os("VALV_TEST_CLOCK_FILE") {
        None => Ok(std::sync::Arc::new(SystemClock)),
        Some(_) if !cfg!(debug_assertions) => Err("VALV_TEST_CLOCK_FILE is set, but a release build only uses the system clock; unset it".into()),
        Some(path) => {
            // Said on stderr too: this runs before logging is set up.
            eprintln!("valv: using the test clock in VALV_TEST_CLOCK_FILE: times are not the system's");
            tracing::warn!("using the test clock in VALV_TEST_CLOCK_FILE: times are not the system's");
            Ok(std::sync::Arc::new(FileClock(PathBuf::from(path))))
        }
    }
}
