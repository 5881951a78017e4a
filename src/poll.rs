//! Waiting for a socket to become readable or writable, with poll(2). This is the crate's only
//! `unsafe`: it lets the reader thread sleep on the socket without holding the TLS stream's lock,
//! so the writer never waits behind an idle reader and an idle agent uses no CPU.

#![allow(unsafe_code)] // poll(2) has no safe std wrapper; the one call below is checked.

// The struct, the constants and the function come from the `libc` crate, which declares them
// per libc and architecture, rather than being written out by hand here.
use libc::{c_int, nfds_t, poll, pollfd, POLLIN, POLLOUT};
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// What to wait for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interest {
    Read,
    Write,
}

/// Waits until `socket` is ready for `interest`, or `timeout` passes. Returns `true` when ready
/// (including error and hang-up conditions, which the next read or write reports), `false` on
/// timeout. An interrupted call is retried with the same timeout; callers work from deadlines.
pub fn wait(socket: &impl AsRawFd, interest: Interest, timeout: Duration) -> io::Result<bool> {
    let events = match interest {
        Interest::Read => POLLIN,
        Interest::Write => POLLOUT,
    };
    let mut fd = pollfd { fd: socket.as_raw_fd(), events, revents: 0 };
    // Round up so a 0.4 ms remainder does not become a busy 0 ms poll.
    let millis = timeout.as_micros().div_ceil(1000).min(c_int::MAX as u128) as c_int;
    loop {
        // SAFETY: `fd` is a valid, initialised pollfd that lives across the call, and nfds is 1,
        // the number of pollfds it points to.
        let n = unsafe { poll(&mut fd, 1 as nfds_t, millis) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn readable_only_after_data_arrives() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert!(!wait(&server, Interest::Read, Duration::from_millis(20)).unwrap());
        assert!(wait(&server, Interest::Write, Duration::from_millis(20)).unwrap());
        client.write_all(b"x").unwrap();
        assert!(wait(&server, Interest::Read, Duration::from_secs(5)).unwrap());
    }

    #[test]
    fn shutdown_wakes_a_waiting_reader() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let nudge = server.try_clone().unwrap();
        let waiter =
            std::thread::spawn(move || wait(&server, Interest::Read, Duration::from_secs(30)));
        nudge.shutdown(std::net::Shutdown::Both).unwrap();
        assert!(waiter.join().unwrap().unwrap());
    }
}
