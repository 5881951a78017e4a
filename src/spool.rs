//! The outbox's disk copy: append-only segment files in `<stateDir>/spool`, so messages accepted for
//! the cloud survive an agent or device restart. Knows records and files, not queues or policies.
//!
//! Record: `len: u32 LE | crc32: u32 LE | kind: u8 | seq: u64 LE | enqueued_ms: i64 LE | payload`,
//! where `len` counts from `kind` to the end, the CRC covers the same bytes, `kind` 1 is a put
//! (payload = the message's wire JSON) and 2 a done (empty payload: the put with that `seq` was
//! sent, replaced, expired or dropped). Segments are named `seg-<first seq>.log`; a new process
//! always starts a new segment, and a segment is deleted once every put in it is done.
//!
//! Durability: every record is written with one `write` (so an agent crash loses nothing), and the
//! segment is fsynced at most every `sync_interval` (so a power cut loses at most that much). A torn
//! or corrupt tail is detected by length and CRC on open, logged, and cut off; records before it
//! are kept. A failing disk (full, read-only) is logged and the outbox goes on in memory.
//!
//! Privacy: the spool holds every upstream message, so the folder (and `stateDir`, when the spool
//! creates it) is 0700 and segments are 0600 whatever the umask; a looser folder or segment left
//! by an older version is tightened on open.

use crate::error::{ErrorKind, Result};
use crate::message::Message;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const KIND_PUT: u8 = 1;
const KIND_DONE: u8 = 2;
const HEADER_BYTES: usize = 8; // len + crc
const FIXED_BODY_BYTES: usize = 1 + 8 + 8; // kind + seq + enqueued_ms
/// Upper bound on one record, so a corrupt length cannot make us allocate gigabytes.
pub const MAX_RECORD_BYTES: usize = 64 << 20;
/// Highest seq a record may carry; anything above is treated as corrupt.
pub const MAX_SEQ: u64 = 1 << 62;
/// A segment is closed and a new one started past this size.
pub const SEGMENT_BYTES: u64 = 1 << 20;
/// The spool folder (and a `stateDir` it creates): the agent's user only.
pub const DIR_MODE: u32 = 0o700;
/// Segment files: the agent's user only.
pub const SEGMENT_MODE: u32 = 0o600;

/// A message read back from the spool.
#[derive(Debug)]
pub struct Recovered {
    pub seq: u64,
    pub enqueued_ms: i64,
    pub message: Message,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// Puts in this segment not yet done.
    live: usize,
}

/// The open spool.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    /// First seq of each segment → segment; the last one is the one being written.
    segments: BTreeMap<u64, Segment>,
    file: Option<File>,
    file_bytes: u64,
    sync_interval: Duration,
    last_sync: Instant,
    dirty: bool,
    /// Set after a write error; cleared when a write succeeds again. Avoids a log line per message.
    failing: bool,
    /// One past the highest seq ever put: names a segment started only to hold done records.
    next_seq: u64,
    /// A put's record, or a batch of done records, is encoded here (kept unless it grew past
    /// `KEPT_RECORD_BUF_BYTES`).
    record_buf: Vec<u8>,
}

/// Largest record buffer kept between puts; a bigger message's buffer is freed after use.
const KEPT_RECORD_BUF_BYTES: usize = 16 << 10;

/// CRC-32 (IEEE) lookup tables for slicing by 8, built at compile time: `CRC_TABLES[0]` is the
/// classic byte table, `CRC_TABLES[k][i]` the CRC of byte `i` followed by `k` zero bytes.
const CRC_TABLES: [[u32; 256]; 8] = {
    let mut tables = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            bit += 1;
        }
        tables[0][i] = crc;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = tables[k - 1][i];
            tables[k][i] = (prev >> 8) ^ tables[0][(prev & 0xFF) as usize];
            i += 1;
        }
        k += 1;
    }
    tables
};

/// CRC-32 (IEEE), eight bytes per step (slicing by 8): no dependency, and about 4× faster than a
/// table lookup per byte, which was a tenth of the sending thread's CPU at 10k messages/s
/// (scripts/bench.sh, issue 14).
pub fn crc32(bytes: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut crc = 0xFFFF_FFFFu32;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let lo = crc ^ u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = t[7][(lo & 0xFF) as usize]
            ^ t[6][((lo >> 8) & 0xFF) as usize]
            ^ t[5][((lo >> 16) & 0xFF) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xFF) as usize]
            ^ t[2][((hi >> 8) & 0xFF) as usize]
            ^ t[1][((hi >> 16) & 0xFF) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ t[0][((crc ^ u32::from(b)) & 0xFF) as usize];
    }
    !crc
}

/// Encodes one record.
pub fn encode_record(kind: u8, seq: u64, enqueued_ms: i64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + FIXED_BODY_BYTES + payload.len());
    encode_record_into(&mut out, kind, seq, enqueued_ms, payload);
    out
}

/// Encodes one record at the end of `out` (empty, or holding whole records).
pub fn encode_record_into(out: &mut Vec<u8>, kind: u8, seq: u64, enqueued_ms: i64, payload: &[u8]) {
    let start = out.len();
    let body_len = FIXED_BODY_BYTES + payload.len();
    out.reserve(HEADER_BYTES + body_len);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]); // crc, filled below
    out.push(kind);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&enqueued_ms.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32(&out[start + HEADER_BYTES..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// One record decoded from a segment.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: u8,
    pub seq: u64,
    pub enqueued_ms: i64,
    pub payload: &'a [u8],
}

/// Decodes the records of a segment. Returns them and the byte offset where valid data ends:
/// anything after it (a torn or corrupt tail) is not a record.
pub fn decode_segment(bytes: &[u8]) -> (Vec<Record<'_>>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= HEADER_BYTES {
        let len =
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let crc = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        if !(FIXED_BODY_BYTES..=MAX_RECORD_BYTES).contains(&len)
            || bytes.len() - at - HEADER_BYTES < len
        {
            break;
        }
        let body = &bytes[at + HEADER_BYTES..at + HEADER_BYTES + len];
        if crc32(body) != crc {
            break;
        }
        let kind = body[0];
        if kind != KIND_PUT && kind != KIND_DONE {
            break;
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&body[1..9]);
        let mut ms = [0u8; 8];
        ms.copy_from_slice(&body[9..17]);
        records.push(Record {
            kind,
            seq: u64::from_le_bytes(seq),
            enqueued_ms: i64::from_le_bytes(ms),
            payload: &body[FIXED_BODY_BYTES..],
        });
        at += HEADER_BYTES + len;
    }
    (records, at)
}

fn segment_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.log")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?.strip_suffix(".log")?.parse().ok()
}

impl Spool {
    /// Opens (creating) the spool in `dir` and reads back every put not yet done, in `seq` order.
    /// Torn tails are cut off; unreadable segments are logged and set aside, never fatal.
    ///
    /// # Errors
    /// `Io` only when the directory itself cannot be created or listed.
    pub fn open(dir: &Path, sync_interval: Duration) -> Result<(Spool, Vec<Recovered>)> {
        crate::dirs::create_durable(dir, DIR_MODE)
            .map_err(|e| ErrorKind::Io.msg(format!("create spool dir {}", dir.display())).src(e))?;
        match crate::dirs::restrict(dir, DIR_MODE) {
            Ok(true) => log::info!("spool: {} was readable by others; now 0700", dir.display()),
            Ok(false) => {}
            Err(e) => log::warn!("spool: cannot make {} private: {e}", dir.display()),
        }
        let mut firsts: Vec<(u64, PathBuf)> = fs::read_dir(dir)
            .map_err(|e| ErrorKind::Io.msg(format!("list spool dir {}", dir.display())).src(e))?
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let first = parse_segment_name(entry.file_name().to_str()?)?;
                Some((first, entry.path()))
            })
            .collect();
        firsts.sort();

        let mut puts: BTreeMap<u64, (i64, Message, u64)> = BTreeMap::new(); // seq → (ms, msg, segment)
        let mut dones = Vec::new();
        let mut segments = BTreeMap::new();
        for (first, path) in firsts {
            if let Err(e) = crate::dirs::restrict(&path, SEGMENT_MODE) {
                log::warn!("spool: cannot make {} private: {e}", path.display());
            }
            let bytes = match read_all(&path) {
                Ok(bytes) => bytes,
                Err(e) => {
                    log::error!("spool: cannot read {}: {e}; skipping it", path.display());
                    continue;
                }
            };
            let (records, valid) = decode_segment(&bytes);
            if valid < bytes.len() {
                log::warn!(
                    "spool: {} has a torn or corrupt tail at byte {valid} of {}; cutting it off",
                    path.display(),
                    bytes.len()
                );
                if let Err(e) =
                    OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(valid as u64))
                {
                    log::error!("spool: cannot truncate {}: {e}", path.display());
                }
            }
            for record in records {
                if record.seq > MAX_SEQ {
                    // Never written by us (2^62 messages would take millennia): corrupt or
                    // foreign. Skipped, so next_seq cannot overflow and segment names stay unique.
                    log::error!(
                        "spool: record with impossible seq {} in {}; skipped",
                        record.seq,
                        path.display()
                    );
                    continue;
                }
                match record.kind {
                    KIND_PUT => match Message::decode(record.payload) {
                        Ok(message) => {
                            puts.insert(record.seq, (record.enqueued_ms, message, first));
                        }
                        Err(e) => log::error!(
                            "spool: record {} in {} is not a message: {e}",
                            record.seq,
                            path.display()
                        ),
                    },
                    _ => dones.push(record.seq),
                }
            }
            segments.insert(first, Segment { path, live: 0 });
        }
        for seq in dones {
            puts.remove(&seq);
        }
        for (_, _, segment) in puts.values() {
            if let Some(s) = segments.get_mut(segment) {
                s.live += 1;
            }
        }
        // Segments with nothing live are finished: remove them now.
        segments.retain(|_, s| {
            if s.live == 0 {
                let _ = fs::remove_file(&s.path);
                false
            } else {
                true
            }
        });
        let next_seq = puts.keys().next_back().map_or(0, |seq| seq + 1);
        let recovered = puts
            .into_iter()
            .map(|(seq, (enqueued_ms, message, _))| Recovered { seq, enqueued_ms, message })
            .collect();
        let spool = Spool {
            dir: dir.to_owned(),
            segments,
            file: None,
            file_bytes: 0,
            sync_interval,
            last_sync: Instant::now(),
            dirty: false,
            failing: false,
            next_seq,
            record_buf: Vec::new(),
        };
        Ok((spool, recovered))
    }

    /// Appends a put. Returns false (after logging) when the disk refused it; the caller keeps
    /// the message in memory anyway.
    pub fn put(&mut self, seq: u64, enqueued_ms: i64, message: &Message) -> bool {
        self.put_encoded(seq, enqueued_ms, &message.encode())
    }

    /// [`Spool::put`] of a message already encoded (`Message::encode`), so the caller can use
    /// the same text on the wire.
    pub fn put_encoded(&mut self, seq: u64, enqueued_ms: i64, wire: &str) -> bool {
        self.next_seq = self.next_seq.max(seq + 1);
        if self.file.is_none() || self.file_bytes >= SEGMENT_BYTES {
            if let Err(e) = self.start_segment(seq) {
                self.report(e);
                return false;
            }
        }
        // Encoded into a buffer kept between calls: no allocation per message (issue 14).
        let mut record = std::mem::take(&mut self.record_buf);
        encode_record_into(&mut record, KIND_PUT, seq, enqueued_ms, wire.as_bytes());
        let appended = self.append(&record);
        if record.capacity() <= KEPT_RECORD_BUF_BYTES {
            record.clear();
            self.record_buf = record;
        }
        match appended {
            Ok(()) => {
                if let Some((_, segment)) = self.segments.iter_mut().next_back() {
                    segment.live += 1;
                }
                true
            }
            Err(e) => {
                self.report(e);
                false
            }
        }
    }

    /// Records that the puts in `seqs` are finished (sent, replaced, expired or dropped), and
    /// deletes segments left with nothing live.
    pub fn done(&mut self, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        // Into the buffer puts use too: no allocation per batch.
        let mut batch = std::mem::take(&mut self.record_buf);
        batch.reserve(seqs.len() * (HEADER_BYTES + FIXED_BODY_BYTES));
        for &seq in seqs {
            encode_record_into(&mut batch, KIND_DONE, seq, 0, &[]);
        }
        // Recovered puts live in old segments; their done records go to a new one.
        let started = self.file.is_some() || {
            let first = self.next_seq;
            self.start_segment(first).map_err(|e| self.report(e)).is_ok()
        };
        if started {
            if let Err(e) = self.append(&batch) {
                self.report(e);
            }
        }
        if batch.capacity() <= KEPT_RECORD_BUF_BYTES {
            batch.clear();
            self.record_buf = batch;
        }
        let current = self.segments.keys().next_back().copied();
        for &seq in seqs {
            let Some((&first, segment)) = self.segments.range_mut(..=seq).next_back() else {
                continue;
            };
            segment.live = segment.live.saturating_sub(1);
            if segment.live == 0 && Some(first) != current {
                let path = segment.path.clone();
                self.segments.remove(&first);
                if let Err(e) = fs::remove_file(&path) {
                    log::warn!("spool: cannot delete finished segment {}: {e}", path.display());
                }
            }
        }
    }

    /// How long until what was written since the last sync is due for its fsync (zero: now);
    /// `None` when nothing waits for one.
    pub fn sync_due_in(&self) -> Option<Duration> {
        (self.dirty && self.file.is_some())
            .then(|| self.sync_interval.saturating_sub(self.last_sync.elapsed()))
    }

    /// Fsyncs the current segment if something was written since the last sync.
    pub fn sync(&mut self) {
        if let (true, Some(file)) = (self.dirty, self.file.as_ref()) {
            if let Err(e) = file.sync_data() {
                self.report(ErrorKind::Io.msg("fsync spool segment").src(e));
            }
            self.dirty = false;
            self.last_sync = Instant::now();
        }
    }

    /// Bytes of segment files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.segments.values().filter_map(|s| fs::metadata(&s.path).ok()).map(|m| m.len()).sum()
    }

    fn start_segment(&mut self, first_seq: u64) -> Result<()> {
        self.sync();
        let path = self.dir.join(segment_name(first_seq));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(SEGMENT_MODE)
            .open(&path)
            .and_then(|file| {
                // Exactly 0600, whatever the umask.
                file.set_permissions(fs::Permissions::from_mode(SEGMENT_MODE))?;
                Ok(file)
            })
            .map_err(|e| {
                ErrorKind::Io.msg(format!("create spool segment {}", path.display())).src(e)
            })?;
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all(); // make the new name durable
        }
        // The previous segment may now be finished.
        if let Some((&first, segment)) = self.segments.iter().next_back() {
            if segment.live == 0 && first != first_seq {
                let _ = fs::remove_file(&segment.path);
                self.segments.remove(&first);
            }
        }
        // Re-opening the same segment after a write error keeps its live count.
        self.segments.entry(first_seq).or_insert(Segment { path, live: 0 });
        self.file = Some(file);
        self.file_bytes = 0;
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Err(ErrorKind::Io.msg("spool has no open segment"));
        };
        file.write_all(bytes).map_err(|e| ErrorKind::Io.msg("append to spool segment").src(e))?;
        self.file_bytes += bytes.len() as u64;
        self.dirty = true;
        if self.failing {
            log::info!("spool: writing to disk again");
            self.failing = false;
        }
        if self.last_sync.elapsed() >= self.sync_interval {
            self.sync();
        }
        Ok(())
    }

    fn report(&mut self, e: crate::Error) {
        if !self.failing {
            log::error!("spool: {e}; messages are kept in memory only until the disk recovers");
            self.failing = true;
        }
        // Drop the handle: the next put starts a fresh segment once the disk works again.
        self.file = None;
    }
}

fn read_all(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.sync();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Route;

    fn msg(n: u64) -> Message {
        Message::with_text(Route { resource: format!("default/x/{n}"), ..Route::default() }, "v")
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("edgehub-spool-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        // Slicing by 8 agrees with the bit-by-bit definition at every length and alignment.
        let bitwise = |bytes: &[u8]| {
            let mut crc = 0xFFFF_FFFFu32;
            for &b in bytes {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
                }
            }
            !crc
        };
        let data: Vec<u8> =
            (0..300u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for start in 0..9 {
            for end in start..data.len() {
                assert_eq!(crc32(&data[start..end]), bitwise(&data[start..end]), "{start}..{end}");
            }
        }
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_stops_decoding() {
        let mut bytes = encode_record(KIND_PUT, 7, 99, b"{\"a\":1}");
        bytes.extend(encode_record(KIND_DONE, 7, 0, b""));
        let full = bytes.len();
        let (records, valid) = decode_segment(&bytes);
        assert_eq!(valid, full);
        assert_eq!(
            records[0],
            Record { kind: KIND_PUT, seq: 7, enqueued_ms: 99, payload: b"{\"a\":1}" }
        );
        assert_eq!(records[1].kind, KIND_DONE);
        for cut in 1..full {
            let (records, valid) = decode_segment(&bytes[..cut]);
            assert!(valid <= cut && records.len() <= 1, "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[12] ^= 1;
        assert_eq!(decode_segment(&flipped).0.len(), 0);
        let huge = [0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0, 1];
        assert_eq!(decode_segment(&huge), (vec![], 0));
    }

    #[test]
    fn puts_survive_reopen_and_dones_do_not() {
        let d = dir("reopen");
        {
            let (mut spool, recovered) = Spool::open(&d, Duration::ZERO).unwrap();
            assert!(recovered.is_empty());
            for n in 0..5 {
                assert!(spool.put(n, 1000 + n as i64, &msg(n)));
            }
            spool.done(&[0, 2]);
        }
        let (mut spool, recovered) = Spool::open(&d, Duration::ZERO).unwrap();
        let seqs: Vec<u64> = recovered.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 3, 4]);
        assert_eq!(recovered[0].message.route.resource, "default/x/1");
        assert_eq!(recovered[0].enqueued_ms, 1001);
        // Finishing everything deletes the old segment; the new one holds the new put.
        spool.done(&[1, 3, 4]);
        assert!(spool.put(10, 0, &msg(10)));
        let files = fs::read_dir(&d).unwrap().count();
        assert_eq!(files, 1, "only the current segment is left");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn torn_tail_after_a_power_cut_keeps_earlier_records() {
        let d = dir("torn");
        {
            let (mut spool, _) = Spool::open(&d, Duration::ZERO).unwrap();
            for n in 0..3 {
                spool.put(n, 0, &msg(n));
            }
        }
        let seg = fs::read_dir(&d).unwrap().next().unwrap().unwrap().path();
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - 5).unwrap();
        let (_, recovered) = Spool::open(&d, Duration::ZERO).unwrap();
        assert_eq!(recovered.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1]);
        assert!(fs::metadata(&seg).unwrap().len() < len - 5, "the torn record was cut off");
        let _ = fs::remove_dir_all(&d);
    }
}
