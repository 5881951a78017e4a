//! Fuzzes reading the outbox's disk spool, which a power cut or a bad disk can leave holding
//! anything. Properties:
//! - `decode_segment` never panics, and the valid prefix it reports is within the input;
//! - the format is canonical: re-encoding the decoded records with `encode_record` gives back
//!   exactly that prefix, and decoding it again gives the same records;
//! - `Spool::open` on a directory holding the input as a segment file never panics, recovers
//!   exactly the puts that decode as messages and have no done record, and leaves either no file
//!   (nothing live) or the valid prefix, which decodes cleanly to its end.
//!
//! Each input is checked twice: as raw segment bytes, and as a script of records that are encoded
//! with valid CRCs (see [`segment_from_script`]). Random bytes almost never carry a valid CRC, so
//! without the second form the fuzzer only ever reshuffles the seed records and never tries new
//! kinds, sequence numbers or payloads.

#![no_main]

use edgehub::message::Message;
use edgehub::spool::{decode_segment, encode_record, Spool};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

const SEGMENT: &str = "seg-00000000000000000000.log";
const KIND_PUT: u8 = 1;
/// See the recovery check below.
const HIGHEST_SANE_SEQ: u64 = i64::MAX as u64;

/// One directory per fuzzing process, created empty once; each input leaves at most the one
/// segment file behind (checked below), which the next input overwrites.
fn spool_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("edgehub-fuzz-spool-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create fuzz spool dir");
        dir
    })
}

/// Builds a segment from `script`: records `kind: u8 | seq: u64 LE | enqueued_ms: i64 LE |
/// payload length: u16 LE | payload`, encoded with `encode_record` (valid CRC), and whatever is
/// left when the next record does not fit appended as is (a torn or corrupt tail).
fn segment_from_script(mut script: &[u8]) -> Vec<u8> {
    let mut segment = Vec::new();
    while script.len() >= 19 {
        let (head, rest) = script.split_at(19);
        let payload_len = usize::from(u16::from_le_bytes([head[17], head[18]]));
        if rest.len() < payload_len {
            break;
        }
        let (payload, rest) = rest.split_at(payload_len);
        let seq = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes"));
        let enqueued_ms = i64::from_le_bytes(head[9..17].try_into().expect("8 bytes"));
        segment.extend_from_slice(&encode_record(head[0], seq, enqueued_ms, payload));
        script = rest;
    }
    segment.extend_from_slice(script);
    segment
}

fuzz_target!(|data: &[u8]| {
    check_segment(data);
    check_segment(&segment_from_script(data));
});

fn check_segment(data: &[u8]) {
    let (records, valid) = decode_segment(data);
    assert!(valid <= data.len(), "valid prefix {valid} beyond input {}", data.len());

    let mut reencoded = Vec::with_capacity(valid);
    for r in &records {
        reencoded.extend_from_slice(&encode_record(r.kind, r.seq, r.enqueued_ms, r.payload));
    }
    assert!(reencoded == data[..valid], "re-encoded records differ from the valid prefix");
    let (again, again_valid) = decode_segment(&reencoded);
    assert_eq!(again, records);
    assert_eq!(again_valid, reencoded.len());

    // What open must recover: the last put per seq that decodes as a message, minus done seqs.
    let mut expected: BTreeMap<u64, (i64, Message)> = BTreeMap::new();
    let mut dones = Vec::new();
    for r in &records {
        if r.kind == KIND_PUT {
            if let Ok(msg) = Message::decode(r.payload) {
                expected.insert(r.seq, (r.enqueued_ms, msg));
            }
        } else {
            dones.push(r.seq);
        }
    }
    for seq in dones {
        expected.remove(&seq);
    }

    let dir = spool_dir();
    let path = dir.join(SEGMENT);
    fs::write(&path, data).expect("write fuzz segment");
    let (spool, recovered) = Spool::open(dir, Duration::ZERO).expect("open spool");
    drop(spool);

    // A seq above i64::MAX is one no outbox reaches: open may recover such a put or skip it as
    // corrupt (so that `seq + 1` cannot overflow); every other expected put must be recovered.
    let got: Vec<(u64, i64, &Message)> =
        recovered.iter().map(|r| (r.seq, r.enqueued_ms, &r.message)).collect();
    let want: Vec<(u64, i64, &Message)> = expected
        .iter()
        .map(|(&seq, (ms, msg))| (seq, *ms, msg))
        .filter(|&(seq, _, _)| seq <= HIGHEST_SANE_SEQ || got.iter().any(|g| g.0 == seq))
        .collect();
    assert!(got == want, "recovered {:?}, expected {:?}", got, want);
    expected.retain(|&seq, _| got.iter().any(|g| g.0 == seq));

    match fs::read(&path) {
        Ok(left) => {
            assert!(!expected.is_empty(), "segment with nothing live was kept");
            assert!(left == data[..valid], "segment left is not the valid prefix");
            let (_, left_valid) = decode_segment(&left);
            assert_eq!(left_valid, left.len(), "segment left does not decode cleanly");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(expected.is_empty(), "segment with live puts was deleted");
        }
        Err(e) => panic!("read segment back: {e}"),
    }
    let others = fs::read_dir(dir).expect("list fuzz spool dir").count();
    assert!(others <= 1, "open created {others} files");
}
