//! The host facts behind the node's status (/proc, /etc and the state directory's filesystem,
//! with a fallback for every file), the node's stable UID, Kubernetes' architecture names and the
//! RFC 3339 clock text. The `node` module builds the registration and status reports from them.

use serde_json::{json, Value};
use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

/// Largest host file read; the ones read here are a few KiB at most.
const MAX_HOST_FILE_BYTES: u64 = 64 << 10;
/// Namespace of the UUID v5 that becomes the node's `UID` (fixed, so the UID is stable).
const UID_NAMESPACE: [u8; 16] = [
    0x6a, 0xa8, 0xa0, 0x54, 0x56, 0x76, 0x46, 0x22, 0xa5, 0x58, 0x8a, 0x4a, 0x8e, 0x95, 0x11, 0xaf,
];

/// The host, read afresh for each report. Every field has a fallback: a missing file gives an
/// empty string or 0, never an error.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFacts {
    pub cpus: usize,
    pub memory_kib: u64,
    pub machine_id: String,
    pub boot_id: String,
    pub kernel_version: String,
    pub os_image: String,
    pub uptime_secs: u64,
    /// 1, 5 and 15 minute load averages, as /proc/loadavg writes them.
    pub load: [String; 3],
    pub mem_available_kib: u64,
    /// Size and space available of the state directory's filesystem, when known.
    pub state_dir_kib: Option<(u64, u64)>,
}

impl HostFacts {
    pub fn read() -> HostFacts {
        let os_release = match read_host_file("/etc/os-release") {
            text if text.is_empty() => read_host_file("/usr/lib/os-release"),
            text => text,
        };
        HostFacts {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_kib: mem_total_kib(&read_host_file("/proc/meminfo")),
            machine_id: read_host_file("/etc/machine-id"),
            boot_id: read_host_file("/proc/sys/kernel/random/boot_id"),
            kernel_version: read_host_file("/proc/sys/kernel/osrelease"),
            os_image: pretty_name(&os_release),
            uptime_secs: first_number(&read_host_file("/proc/uptime")),
            load: load_averages(&read_host_file("/proc/loadavg")),
            mem_available_kib: meminfo_kib(&read_host_file("/proc/meminfo"), "MemAvailable:"),
            state_dir_kib: None,
        }
    }

    /// [`HostFacts::read`], plus the space of `state_dir`'s filesystem when given and known.
    pub fn read_with_state_dir(state_dir: Option<&std::path::Path>) -> HostFacts {
        let mut facts = HostFacts::read();
        if let Some((total, available)) = state_dir.and_then(crate::disk::space) {
            facts.state_dir_kib = Some((total / 1024, available / 1024));
        }
        facts
    }
}

/// The host's live state, sent beside a status request (CloudHub's decoder ignores the key).
pub fn host_state(facts: &HostFacts) -> Value {
    json!({
        "uptimeSeconds": facts.uptime_secs,
        "load": facts.load,
        "memAvailableKi": facts.mem_available_kib,
        "stateDirTotalKi": facts.state_dir_kib.map(|(total, _)| total),
        "stateDirAvailableKi": facts.state_dir_kib.map(|(_, available)| available),
    })
}

/// The first number of a /proc file such as /proc/uptime (`"12345.67 ..."` → 12345).
fn first_number(text: &str) -> u64 {
    text.split(|c: char| c.is_whitespace() || c == '.')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The three load averages of /proc/loadavg, `"0"` where missing.
fn load_averages(text: &str) -> [String; 3] {
    let mut fields = text.split_whitespace().map(str::to_owned);
    [(); 3].map(|_| fields.next().unwrap_or_else(|| "0".to_owned()))
}

/// A `Key:   123 kB` line of /proc/meminfo, in KiB (the kernel's "kB" are KiB); 0 when absent.
fn meminfo_kib(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Rust's architecture name as Go's `GOARCH`, which is what a kubelet reports (and what node
/// selectors such as `kubernetes.io/arch=arm64` match). Unknown names pass through.
pub fn k8s_arch(rust_arch: &str, little_endian: bool) -> &str {
    match (rust_arch, little_endian) {
        ("x86_64", _) => "amd64",
        ("x86", _) => "386",
        ("aarch64", _) => "arm64",
        ("arm", _) => "arm",
        ("mips", true) => "mipsle",
        ("mips", false) => "mips",
        ("mips64", true) => "mips64le",
        ("mips64", false) => "mips64",
        ("powerpc64", true) => "ppc64le",
        ("powerpc64", false) => "ppc64",
        ("loongarch64", _) => "loong64",
        (other, _) => other,
    }
}

/// A stable node UID: a UUID v5 of the machine ID and node name (the node name alone when the
/// machine has no ID), so it survives restarts and differs between agents sharing a host.
pub fn node_uid(machine_id: &str, node: &str) -> String {
    let name = if machine_id.is_empty() { node.to_owned() } else { format!("{machine_id}/{node}") };
    uuid_v5(&UID_NAMESPACE, name.as_bytes())
}

/// RFC 4122 name-based UUID (SHA-1), lower-case hex.
fn uuid_v5(namespace: &[u8; 16], name: &[u8]) -> String {
    let mut input = namespace.to_vec();
    input.extend_from_slice(name);
    let digest = openssl::sha::sha1(&input);
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x50; // version 5
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// `MemTotal` in KiB from /proc/meminfo text (the kernel's "kB" are KiB); 0 when absent.
pub fn mem_total_kib(meminfo: &str) -> u64 {
    meminfo_kib(meminfo, "MemTotal:")
}

/// `PRETTY_NAME` from os-release text, unquoted and unescaped (os-release(5)); "" when absent.
pub fn pretty_name(os_release: &str) -> String {
    let Some(value) = os_release.lines().find_map(|line| line.trim().strip_prefix("PRETTY_NAME="))
    else {
        return String::new();
    };
    let value = value.trim();
    let unquoted = ['"', '\'']
        .iter()
        .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
        .unwrap_or(value);
    let mut out = String::with_capacity(unquoted.len());
    let mut chars = unquoted.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' { chars.next().unwrap_or('\\') } else { c });
    }
    out
}

/// A small host file, trimmed; "" when it is missing or unreadable.
fn read_host_file(path: &str) -> String {
    let mut text = String::new();
    match std::fs::File::open(path) {
        Ok(file) => {
            if let Err(e) = file.take(MAX_HOST_FILE_BYTES).read_to_string(&mut text) {
                log::debug!("node_status: read {path}: {e}");
                text.clear();
            }
        }
        Err(e) => log::debug!("node_status: open {path}: {e}"),
    }
    text.trim().to_owned()
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Seconds since the Unix epoch as RFC 3339 UTC (`2022-02-16T08:00:10Z`), Go's `metav1.Time` form.
pub fn rfc3339(secs: i64) -> String {
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let second_of_day = secs.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar: Howard
/// Hinnant's `civil_from_days`, which counts in 400-year eras starting on 1 March so that the
/// leap day falls at the end of each year.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097); // [0, 146096]
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153; // [0, 11], 0 = March
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month as u32, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_at_known_epochs() {
        for (secs, text) in [
            (0, "1970-01-01T00:00:00Z"),
            (-1, "1969-12-31T23:59:59Z"),
            (951_868_799, "2000-02-29T23:59:59Z"), // 2000 is a leap year (divisible by 400)
            (951_868_800, "2000-03-01T00:00:00Z"),
            (1_644_998_410, "2022-02-16T08:00:10Z"),
            (1_709_210_096, "2024-02-29T12:34:56Z"),
            (2_147_483_648, "2038-01-19T03:14:08Z"), // past i32 seconds
            (4_107_542_399, "2100-02-28T23:59:59Z"), // 2100 is not (divisible by 100)
            (4_107_542_400, "2100-03-01T00:00:00Z"),
        ] {
            assert_eq!(rfc3339(secs), text, "{secs}");
        }
    }

    #[test]
    fn every_day_of_a_leap_cycle_is_consecutive() {
        let mut previous = civil_from_days(-1);
        for days in 0..(4 * 366 + 400 * 366) {
            let (y, m, d) = civil_from_days(days);
            let (py, pm, pd) = previous;
            let next_day = (y, m, d) == (py, pm, pd + 1);
            let next_month =
                d == 1 && ((y == py && m == pm + 1) || (y == py + 1 && m == 1 && pm == 12));
            assert!(next_day || next_month, "{previous:?} → {:?}", (y, m, d));
            if next_month {
                let leap = (py % 4 == 0 && py % 100 != 0) || py % 400 == 0;
                let month_days =
                    [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
                assert_eq!(pd, month_days[pm as usize - 1], "{previous:?} ends its month");
            }
            previous = (y, m, d);
        }
    }

    #[test]
    fn architectures_map_to_goarch() {
        assert_eq!(k8s_arch("x86_64", true), "amd64");
        assert_eq!(k8s_arch("aarch64", true), "arm64");
        assert_eq!(k8s_arch("arm", true), "arm");
        assert_eq!(k8s_arch("x86", true), "386");
        assert_eq!(k8s_arch("mips", false), "mips");
        assert_eq!(k8s_arch("mips", true), "mipsle");
        assert_eq!(k8s_arch("mips64", true), "mips64le");
        assert_eq!(k8s_arch("powerpc64", true), "ppc64le");
        assert_eq!(k8s_arch("riscv64", true), "riscv64");
        assert_eq!(k8s_arch("loongarch64", true), "loong64");
        assert_eq!(k8s_arch("s390x", false), "s390x");
    }

    #[test]
    fn uid_is_a_stable_uuid_v5() {
        // RFC 4122 / Python's uuid5(NAMESPACE_DNS, "python.org").
        let dns = [
            0x6b, 0xa7, 0xb8, 0x10, 0x9d, 0xad, 0x11, 0xd1, 0x80, 0xb4, 0x00, 0xc0, 0x4f, 0xd4,
            0x30, 0xc8,
        ];
        assert_eq!(uuid_v5(&dns, b"python.org"), "886313e1-3b8a-5372-9b90-0c9aee199e5d");
        let uid = node_uid("3d1219c7c4c5404aaa1f6d2a48adfda4", "gw-1");
        assert_eq!(uid, node_uid("3d1219c7c4c5404aaa1f6d2a48adfda4", "gw-1"));
        assert_ne!(uid, node_uid("3d1219c7c4c5404aaa1f6d2a48adfda4", "gw-2"));
        assert_ne!(node_uid("", "gw-1"), node_uid("", "gw-2"));
        assert_eq!(uid.len(), 36);
        assert_eq!(&uid[14..15], "5");
    }

    #[test]
    fn host_files_parse_with_fallbacks() {
        let meminfo = "MemTotal:        8049864 kB\nMemFree:          123 kB\n";
        assert_eq!(mem_total_kib(meminfo), 8_049_864);
        assert_eq!(mem_total_kib(""), 0);
        assert_eq!(mem_total_kib("MemTotal: lots kB"), 0);
        assert_eq!(
            pretty_name("NAME=Debian\nPRETTY_NAME=\"Debian GNU/Linux 11 (bullseye)\"\n"),
            "Debian GNU/Linux 11 (bullseye)"
        );
        assert_eq!(pretty_name("PRETTY_NAME='Alpine Linux v3.19'"), "Alpine Linux v3.19");
        assert_eq!(pretty_name("PRETTY_NAME=Plain"), "Plain");
        assert_eq!(pretty_name(r#"PRETTY_NAME="Say \"hi\"""#), "Say \"hi\"");
        assert_eq!(pretty_name("NAME=x"), "");
        assert_eq!(read_host_file("/nonexistent/edgehub"), "");
        let facts = HostFacts::read();
        assert!(facts.cpus >= 1);
    }

    #[test]
    fn host_state_parsers() {
        assert_eq!(first_number("12345.67 54321.00\n"), 12345);
        assert_eq!(first_number(""), 0);
        assert_eq!(load_averages("0.52 0.58 0.59 1/467 12345\n"), ["0.52", "0.58", "0.59"]);
        assert_eq!(load_averages(""), ["0", "0", "0"]);
        assert_eq!(meminfo_kib("MemTotal: 1000 kB\nMemAvailable:  600 kB\n", "MemAvailable:"), 600);
        let mut facts =
            HostFacts { memory_kib: 1000, mem_available_kib: 640, ..HostFacts::default() };
        facts.state_dir_kib = Some((2000, 890));
        let state = host_state(&facts);
        assert_eq!(state["stateDirAvailableKi"], 890);
        assert_eq!(state["memAvailableKi"], 640);
    }
}
