//! Where log lines go: stderr (procd, systemd and busybox init collect it) or the local syslog
//! through `/dev/log` (busybox syslogd, rsyslog). One line per event, UTC RFC 3339 times on
//! stderr; syslog adds its own time. The level can change later with `log::set_max_level`
//! (a SIGHUP reload), because the logger itself passes everything.
//! Text from outside (the cloud, a local client, a server answering a join) goes into a line only
//! through [`shown`], so it can neither forge a second line nor make one line megabytes long.

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

/// Most characters of one outside text shown in a log line (or an error that may be logged).
pub const MAX_SHOWN_CHARS: usize = 256;

/// `text`, safe to put in one log line: control characters (newlines, escape sequences), the
/// Unicode line separators and bidirectional overrides, and backslashes are escaped as Rust
/// escapes (`\n`, `\u{1b}`), and the text is cut after [`MAX_SHOWN_CHARS`] characters with
/// `…(<n> bytes)` saying how long it was. Use it for every value from the network or a local
/// client that goes into a log line or an error message: IDs, resources, groups, paths, bodies.
pub fn shown(text: &str) -> Shown<'_> {
    Shown(text)
}

/// The [`shown`] form of a text; formats without allocating.
#[derive(Clone, Copy)]
pub struct Shown<'a>(&'a str);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        for (count, c) in self.0.chars().enumerate() {
            if count == MAX_SHOWN_CHARS {
                return write!(f, "…({} bytes)", self.0.len());
            }
            if needs_escape(c) {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for Shown<'_> {
    /// Quoted, for values that read better in quotes (`"default/pod/p"`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Characters that could end or rewrite a log line, or make an escape ambiguous.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || c == '\\'
        || c == '"'
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

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
    fn shown_escapes_line_breaks_and_control_characters() {
        let forged = "id\n2026-01-01T00:00:00Z [ERROR] FORGED\r\u{1b}[2J\u{2028}x\\n\"";
        let text = shown(forged).to_string();
        assert!(!text.contains(['\n', '\r', '\u{1b}', '\u{2028}']), "{text}");
        assert_eq!(
            text,
            "id\\n2026-01-01T00:00:00Z [ERROR] FORGED\\r\\u{1b}[2J\\u{2028}x\\\\n\\\""
        );
        assert_eq!(format!("{:?}", shown("a\tb")), "\"a\\tb\"");
        assert_eq!(shown("plain/ümlaut").to_string(), "plain/ümlaut");
    }

    #[test]
    fn shown_cuts_long_text_and_says_how_long_it_was() {
        let exact = "x".repeat(MAX_SHOWN_CHARS);
        assert_eq!(shown(&exact).to_string(), exact);
        let long = "é".repeat(MAX_SHOWN_CHARS + 1);
        let text = shown(&long).to_string();
        assert_eq!(text, format!("{}…({} bytes)", "é".repeat(MAX_SHOWN_CHARS), long.len()));
        let huge = "y".repeat(2 << 20);
        assert!(shown(&huge).to_string().len() < MAX_SHOWN_CHARS + 32);
    }

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
