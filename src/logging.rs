//! Where log lines go: stderr (procd, systemd and busybox init collect it) or the local syslog
//! through `/dev/log` (busybox syslogd, rsyslog). One line per event, UTC RFC 3339 times on
//! stderr; syslog adds its own time. The level can change later with `log::set_max_level`
//! (a SIGHUP reload), because the logger itself passes everything.

use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::os::unix::net::UnixDatagram;

/// The `logTarget` config key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogTarget {
    #[default]
    Stderr,
    Syslog,
}

/// Where syslog listens on Linux.
const SYSLOG_SOCKET: &str = "/dev/log";
/// syslog facility "daemon".
const FACILITY_DAEMON: u8 = 3;

/// Sets up the logger once (later calls keep the first) at `level`.
pub fn init(target: LogTarget, level: log::LevelFilter) {
    let mut builder = simplelog::ConfigBuilder::new();
    builder.set_thread_level(log::LevelFilter::Off).set_target_level(log::LevelFilter::Off);
    let installed = match target {
        LogTarget::Stderr => {
            builder.set_time_format_rfc3339();
            // simplelog writes a record in pieces; one write per line keeps lines whole for
            // whoever reads the log concurrently (procd, a tail, other processes' lines).
            let stderr = io::LineWriter::new(io::stderr());
            simplelog::WriteLogger::init(log::LevelFilter::Trace, builder.build(), stderr)
        }
        LogTarget::Syslog => match SyslogWriter::connect() {
            Ok(writer) => {
                builder.set_time_level(log::LevelFilter::Off);
                simplelog::WriteLogger::init(log::LevelFilter::Trace, builder.build(), writer)
            }
            Err(e) => {
                builder.set_time_format_rfc3339();
                let result = simplelog::WriteLogger::init(
                    log::LevelFilter::Trace,
                    builder.build(),
                    io::LineWriter::new(io::stderr()),
                );
                log::warn!("cannot log to syslog at {SYSLOG_SOCKET} ({e}); logging to stderr");
                result
            }
        },
    };
    if installed.is_ok() {
        log::set_max_level(level);
    }
}

/// Collects what simplelog writes for one record and sends it as one datagram at the newline,
/// with the priority taken from the level tag simplelog prints (`[ERROR]`, `[WARN]`, ...).
struct SyslogWriter {
    socket: UnixDatagram,
    line: Vec<u8>,
    tag: String,
}

impl SyslogWriter {
    fn connect() -> io::Result<SyslogWriter> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(SYSLOG_SOCKET)?;
        Ok(SyslogWriter {
            socket,
            line: Vec::new(),
            tag: format!("edgehub[{}]: ", std::process::id()),
        })
    }

    fn send_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end();
        let severity = severity_of(text);
        let packet =
            format!("<{}>{}{}", FACILITY_DAEMON * 8 + severity, self.tag, text.trim_start());
        // A full or restarting syslogd must not stall the agent: a lost line is the lesser harm.
        let _ = self.socket.send(packet.as_bytes());
        self.line.clear();
    }
}

/// syslog severity for a line simplelog formatted.
fn severity_of(line: &str) -> u8 {
    if line.contains("[ERROR]") {
        3
    } else if line.contains("[WARN]") {
        4
    } else if line.contains("[INFO]") {
        6
    } else {
        7
    }
}

impl Write for SyslogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                self.send_line();
            } else if self.line.len() < 8 << 10 {
                self.line.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.line.is_empty() {
            self.send_line();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_datagram_per_line_with_priority_from_the_level() {
        let dir = std::env::temp_dir().join(format!("edgehub-syslog-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("log.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let socket = UnixDatagram::unbound().unwrap();
        socket.connect(&path).unwrap();
        let mut writer = SyslogWriter { socket, line: Vec::new(), tag: "edgehub[1]: ".into() };
        write!(writer, "[WARN] cannot connect").unwrap();
        writer.write_all(b" to cloud\n[INFO] connected\n").unwrap();
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"<28>edgehub[1]: [WARN] cannot connect to cloud");
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"<30>edgehub[1]: [INFO] connected");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
