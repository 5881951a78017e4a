//! The join at start, retried. When the pair is unusable and a token is configured, `run` joins
//! before it starts the agent; a join that fails (the cloud not reachable yet: WAN still down at
//! boot) is tried again after 2 s, doubling up to `joinRetryMax`, until it succeeds or a stop
//! signal arrives. So neither procd nor systemd has to respawn the process, and give up, for it.

use super::{ensure, CertInfo, Token};
use crate::config::Config;
use crate::error::Result;
use crate::signals::Signal;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::time::Duration;

/// The first wait after a failed join (as the rotation's backoff).
const FIRST_RETRY: Duration = Duration::from_secs(2);

/// How [`ensure_retrying`] ended, when it did not fail for good.
#[derive(Debug)]
pub enum BootJoin {
    /// The pair is usable (it was, or a join installed it).
    Ready(CertInfo),
    /// A stop signal arrived between two attempts: nothing was started.
    Stopped,
}

/// [`ensure`], with failed joins retried until one succeeds or `signals` says stop. SIGHUP
/// between two attempts makes the next one start at once.
///
/// # Errors
/// What [`ensure`] returns when retrying cannot help: no token (or one that cannot be read), a
/// configuration error.
pub fn ensure_retrying(config: &Config, signals: &Receiver<Signal>) -> Result<BootJoin> {
    let ceiling = config.join_retry_max.0;
    let mut delay = FIRST_RETRY.min(ceiling);
    let mut attempt: u32 = 1;
    loop {
        let e = match ensure(config) {
            Ok(info) => return Ok(BootJoin::Ready(info)),
            Err(e) => e,
        };
        // Only a join that was actually tried can succeed later.
        if !e.is_retryable() || !matches!(Token::configured(config), Ok(Some(_))) {
            return Err(e);
        }
        log::warn!("join attempt {attempt} failed; next in {:.1} s: {e}", delay.as_secs_f64());
        match signals.recv_timeout(delay) {
            Ok(Signal::Stop) => {
                log::info!("stopping before the agent started: the join had not succeeded yet");
                return Ok(BootJoin::Stopped);
            }
            Ok(Signal::Reload) => log::info!("reload while joining: trying again now"),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Err(e),
        }
        delay = delay.saturating_mul(2).min(ceiling);
        attempt = attempt.saturating_add(1);
    }
}
