//! Size and free space of a filesystem, with statvfs(3): what the node status reports for the
//! state directory. The crate's second and last `unsafe`, kept to one checked call.

#![allow(unsafe_code)] // statvfs has no std wrapper.

use std::ffi::CString;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

// The struct and the call come from the `libc` crate, which lays the struct out per libc and
// architecture. glibc's `statvfs` has 32-bit block counters on 32-bit targets (a 16 TiB disk
// would wrap), so there the 64-bit-counter variant is used; musl has only 64-bit counters.
// (`statvfs` names both the struct and the function.)
#[cfg(not(target_env = "gnu"))]
use libc::statvfs;
#[cfg(target_env = "gnu")]
use libc::statvfs64 as statvfs;

/// Bytes in the filesystem holding `path`, and bytes available to an unprivileged user.
/// `None` if it cannot be asked.
pub fn space(path: &Path) -> Option<(u64, u64)> {
    let path = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut buf = MaybeUninit::<statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and lives across the call; `buf` is a writable struct of
    // exactly the type the call fills.
    let rc = unsafe { statvfs(path.as_ptr(), buf.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: the call succeeded, so it filled the whole struct.
    let stat = unsafe { buf.assume_init() };
    // Counters are in units of the fragment size; a filesystem that reports none uses the block size.
    #[allow(clippy::unnecessary_cast)] // the field types differ per target (u32 or u64)
    let frsize = match stat.f_frsize as u64 {
        0 => stat.f_bsize as u64,
        f => f,
    };
    #[allow(clippy::unnecessary_cast)]
    let (blocks, available) = (stat.f_blocks as u64, stat.f_bavail as u64);
    Some((blocks.saturating_mul(frsize), available.saturating_mul(frsize)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_temp_dir_has_a_size_and_free_space_within_it() {
        let (total, available) = space(&std::env::temp_dir()).unwrap();
        assert!(total > 1 << 20, "total {total}");
        assert!(available <= total);
        assert!(space(Path::new("/nonexistent/edgehub")).is_none());
    }

    /// The figures match what coreutils' `stat -f` reads through its own libc: a struct laid out
    /// wrongly for the target (issue 11, item 12) gives other numbers. Skipped where `stat` is
    /// missing (busybox-only systems have it too, but not every builder does).
    #[test]
    fn figures_match_stat_f() {
        let dir = std::env::temp_dir();
        let Ok(out) =
            std::process::Command::new("stat").args(["-f", "-c", "%S %b %a"]).arg(&dir).output()
        else {
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let numbers: Vec<u64> = text.split_whitespace().filter_map(|n| n.parse().ok()).collect();
        let [frsize, blocks, available] = numbers[..] else { return };
        let (total, free) = space(&dir).unwrap();
        assert_eq!(total, blocks * frsize, "stat -f said {text}");
        // Free space moves while tests write files: allow 1 GiB of drift.
        assert!(free.abs_diff(available * frsize) < 1 << 30, "{free} vs stat -f {text}");
    }
}
