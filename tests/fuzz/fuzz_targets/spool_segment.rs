//! Fuzzes reading the outbox's disk spool, which a power cut or a bad disk can leave holding
//! anything. Properties:
//! - `decode_segment` never panics, and the valid prefix it reports is within the input;
//! - the format is canonical: re-encoding the decoded records with `encode_record` gives back
//!   exactly that prefix, and decoding it again gives the same records;
//! - `Spool::open` on a directory holding the input as a segment file never panics, recovers
//!   exactly the puts that decode as messages and have no done record, and leaves either no file
//!   (nothing live) or the valid prefix, which decodes cleanly to its end.

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

fuzz_target!(|data: &[u8]| {
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

    let got: Vec<(u64, i64, &Message)> =
        recovered.iter().map(|r| (r.seq, r.enqueued_ms, &r.message)).collect();
    let want: Vec<(u64, i64, &Message)> =
        expected.iter().map(|(&seq, (ms, msg))| (seq, *ms, msg)).collect();
    assert!(got == want, "recovered {:?}, expected {:?}", got, want);

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
});
