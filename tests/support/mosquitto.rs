//! A real mosquitto broker for the MQTT tests: started on a free 127.0.0.1 port with a config file
//! the test writes, ready once it accepts connections, restartable on the same port, killed on
//! drop. Where mosquitto is missing the tests skip with a message, except in CI (`CI=true`), where
//! a missing broker fails them.

use super::TempDir;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a broker may take to accept connections (qemu is slow).
const START_PATIENCE: Duration = Duration::from_secs(20);

pub struct Mosquitto {
    pub port: u16,
    pub dir: TempDir,
    conf: PathBuf,
    binary: PathBuf,
    child: Option<Child>,
}

/// The mosquitto binary, if installed.
pub fn binary() -> Option<PathBuf> {
    let candidates = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto"];
    if let Some(found) = candidates.iter().map(PathBuf::from).find(|p| p.exists()) {
        return Some(found);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("mosquitto")).find(|p| p.exists())
}

impl Mosquitto {
    /// Starts a broker accepting anonymous clients, or `None` (after saying so) when mosquitto
    /// is not installed outside CI. Panics in CI without mosquitto.
    pub fn start_or_skip(test: &str) -> Option<Mosquitto> {
        Mosquitto::start_with_or_skip(test, "")
    }

    /// The same, with `extra` lines appended to the broker's config.
    pub fn start_with_or_skip(test: &str, extra: &str) -> Option<Mosquitto> {
        let Some(binary) = binary() else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{test}: mosquitto is not installed, and CI=true: run scripts/setup.sh");
            }
            eprintln!("SKIPPED {test}: mosquitto is not installed (scripts/setup.sh installs it)");
            return None;
        };
        let dir = TempDir::new("mosquitto");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        let text = format!(
            // `user root`: run as root (CI containers), mosquitto would otherwise switch to the
            // `mosquitto` user and could not read the test's 0600 key files; ignored otherwise.
            "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             log_dest stderr\nlog_type error\nlog_type warning\n{extra}\n"
        );
        std::fs::write(&conf, text).unwrap();
        let mut broker = Mosquitto { port, dir, conf, binary, child: None };
        broker.launch();
        Some(broker)
    }

    /// `tcp://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn launch(&mut self) {
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("mosquitto.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.binary.display()));
        self.child = Some(child);
        let deadline = Instant::now() + START_PATIENCE;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let err = std::fs::read_to_string(self.dir.path().join("mosquitto.log"))
                    .unwrap_or_default();
                panic!("mosquitto exited ({status}) on port {}: {err}", self.port);
            }
            assert!(Instant::now() < deadline, "mosquitto not listening within {START_PATIENCE:?}");
            std::thread::sleep(Duration::from_millis(20)); // poll with a deadline for a port
        }
    }

    /// Kills the broker (like a crash: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills it and starts a fresh one on the same port (nothing it held survives).
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Adds a password file with `user`/`password` and turns anonymous access off (restart to
    /// apply).
    pub fn require_password(&mut self, user: &str, password: &str) {
        let file = self.dir.path().join("passwd");
        let status = Command::new("mosquitto_passwd")
            .args(["-c", "-b"])
            .arg(&file)
            .args([user, password])
            .status()
            .expect("run mosquitto_passwd");
        assert!(status.success(), "mosquitto_passwd failed");
        let text = std::fs::read_to_string(&self.conf).unwrap().replace(
            "allow_anonymous true",
            &format!("allow_anonymous false\npassword_file {}", file.display()),
        );
        let mut f = std::fs::File::create(&self.conf).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
