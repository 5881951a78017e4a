//! Size and free space of a filesystem, with statvfs(3): what the node status reports for the
//! state directory. The crate's second and last `unsafe`, kept to one checked call.

#![allow(unsafe_code)] // statvfs has no std wrapper.

use std::ffi::CString;
use std::os::raw::{c_char, c_int, c_ulong};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

extern "C" {
    // glibc's 64-bit-counter variant exists on every glibc target; musl's statvfs always has
    // 64-bit counters (and it dropped the *64 names).
    #[cfg_attr(not(target_env = "musl"), link_name = "statvfs64")]
    fn statvfs(path: *const c_char, buf: *mut u64) -> c_int;
}

/// Bytes in the filesystem holding `path`, and bytes available to an unprivileged user.
/// `None` if it cannot be asked.
pub fn space(path: &Path) -> Option<(u64, u64)> {
    let path = CString::new(path.as_os_str().as_bytes()).ok()?;
    // Larger than any `struct statvfs[64]`, and 8-byte aligned for the u64 counters.
    let mut buf = [0u64; 32];
    // SAFETY: `path` is NUL-terminated and lives across the call; `buf` is writable, aligned and
    // bigger than the struct the call fills.
    let rc = unsafe { statvfs(path.as_ptr(), buf.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // Layout shared by glibc's statvfs64 and musl's statvfs: two unsigned longs (f_bsize,
    // f_frsize), then u64 f_blocks, f_bfree, f_bavail at the next 8-byte boundary.
    let word = std::mem::size_of::<c_ulong>();
    let bytes: &[u8] = &native_bytes(&buf);
    let ulong = |at: usize| -> u64 {
        let mut b = [0u8; 8];
        b[..word].copy_from_slice(&bytes[at..at + word]);
        if cfg!(target_endian = "big") && word == 4 {
            u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        } else if word == 4 {
            u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        } else {
            u64::from_ne_bytes(b)
        }
    };
    let u64_at = |at: usize| -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_ne_bytes(b)
    };
    let frsize = match ulong(word) {
        0 => ulong(0),
        f => f,
    };
    let counters = (2 * word).next_multiple_of(8);
    let blocks = u64_at(counters);
    let available = u64_at(counters + 16);
    Some((blocks.saturating_mul(frsize), available.saturating_mul(frsize)))
}

fn native_bytes(words: &[u64; 32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
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
}
