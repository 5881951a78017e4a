//! Process signals as channel messages: SIGTERM and SIGINT (stop) and SIGHUP (reload). They are
//! blocked in every thread and taken synchronously by one `eh-signals` thread with sigwait(3), so
//! no code runs in a signal handler and the agent reacts in its ordinary threads.
//! Call [`block`] first thing in `main`, before any thread starts (threads inherit the mask).

#![allow(unsafe_code)] // sigprocmask/sigwait have no std wrapper; each call is checked below.

use crossbeam_channel::{bounded, Receiver};
use libc::{c_int, sigset_t};
use std::mem::MaybeUninit;

// `sigset_t`, the signal numbers and `SIG_BLOCK` come from the `libc` crate, which has them right
// for each libc and architecture (the set's size differs, and MIPS numbers `SIG_BLOCK` its own way).
pub use libc::{SIGHUP, SIGINT, SIGTERM};

/// What a signal asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGHUP.
    Reload,
}

fn handled_set() -> sigset_t {
    let mut set = MaybeUninit::<sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the whole set it is given (a valid, writable sigset_t), so
    // it is initialised before `assume_init`; sigaddset only fails for an invalid signal number,
    // and these three are valid on every Linux.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for sig in [SIGHUP, SIGINT, SIGTERM] {
            libc::sigaddset(set.as_mut_ptr(), sig);
        }
        set.assume_init()
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread and in every thread it starts later.
pub fn block() {
    let set = handled_set();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        log::error!("cannot block signals (error {rc}); SIGTERM will kill without a clean stop");
    }
}

/// Starts the `eh-signals` thread and returns the channel it reports on. The thread lives for
/// the rest of the process (it is blocked in sigwait; the process exit ends it), which is why it
/// is the one thread that is not joined.
pub fn listen() -> std::io::Result<Receiver<Signal>> {
    let (tx, rx) = bounded(4);
    std::thread::Builder::new().name("eh-signals".to_owned()).stack_size(64 << 10).spawn(
        move || {
            let set = handled_set();
            loop {
                let mut sig: c_int = 0;
                // SAFETY: `set` is initialised and `sig` is a valid out-pointer.
                let rc = unsafe { libc::sigwait(&set, &mut sig) };
                if rc != 0 {
                    continue;
                }
                let signal = if sig == SIGHUP { Signal::Reload } else { Signal::Stop };
                match tx.try_send(signal) {
                    // Full: the same request is already pending.
                    Ok(()) | Err(crossbeam_channel::TrySendError::Full(_)) => {}
                    Err(crossbeam_channel::TrySendError::Disconnected(_)) => return,
                }
            }
        },
    )?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The set holds exactly the three signals the agent takes: a `sigset_t` of the wrong size or
    /// layout for the target (issue 11, item 12) would not read back this way through libc.
    #[test]
    fn the_handled_set_holds_the_three_signals_and_no_other() {
        let set = handled_set();
        // SAFETY: `set` is an initialised sigset_t; every number below is a valid signal.
        let member = |sig: c_int| unsafe { libc::sigismember(&set, sig) };
        for sig in [SIGHUP, SIGINT, SIGTERM] {
            assert_eq!(member(sig), 1, "signal {sig}");
        }
        for sig in [libc::SIGUSR1, libc::SIGKILL, libc::SIGCHLD, libc::SIGPIPE] {
            assert_eq!(member(sig), 0, "signal {sig}");
        }
    }
}
