//! Process signals as channel messages: SIGTERM and SIGINT (stop) and SIGHUP (reload). They are
//! blocked in every thread and taken synchronously by one `eh-signals` thread with sigwait(3), so
//! no code runs in a signal handler and the agent reacts in its ordinary threads.
//! Call [`block`] first thing in `main`, before any thread starts (threads inherit the mask).

#![allow(unsafe_code)] // sigprocmask/sigwait have no std wrapper; each call is checked below.

use crossbeam_channel::{bounded, Receiver};
use std::os::raw::c_int;

/// `sigset_t` is 1024 bits on Linux for both glibc and musl.
#[repr(C)]
struct SigSet([u64; 16]);

extern "C" {
    fn sigemptyset(set: *mut SigSet) -> c_int;
    fn sigaddset(set: *mut SigSet, signum: c_int) -> c_int;
    fn pthread_sigmask(how: c_int, set: *const SigSet, old: *mut SigSet) -> c_int;
    fn sigwait(set: *const SigSet, sig: *mut c_int) -> c_int;
}

// The same numbers on every Linux architecture edgehub targets (x86, ARM, MIPS).
pub const SIGHUP: c_int = 1;
pub const SIGINT: c_int = 2;
pub const SIGTERM: c_int = 15;
// SIG_BLOCK differs on MIPS.
#[cfg(any(target_arch = "mips", target_arch = "mips64"))]
const SIG_BLOCK: c_int = 1;
#[cfg(not(any(target_arch = "mips", target_arch = "mips64")))]
const SIG_BLOCK: c_int = 0;

/// What a signal asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGHUP.
    Reload,
}

fn handled_set() -> SigSet {
    let mut set = SigSet([0; 16]);
    // SAFETY: `set` is a valid, writable sigset_t-sized buffer; the signal numbers are valid.
    unsafe {
        sigemptyset(&mut set);
        for sig in [SIGHUP, SIGINT, SIGTERM] {
            sigaddset(&mut set, sig);
        }
    }
    set
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread and in every thread it starts later.
pub fn block() {
    let set = handled_set();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { pthread_sigmask(SIG_BLOCK, &set, std::ptr::null_mut()) };
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
                let rc = unsafe { sigwait(&set, &mut sig) };
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
