//! Regression tests for bugs found by fuzzing (`scripts/fuzz.sh`, targets in `tests/fuzz`). Each
//! test is named after its fuzz target and holds the minimised input that crashed it, so the bug
//! stays fixed without running the fuzzer.

use edgehub::message::{now_millis, Message, Route};
use edgehub::outbox::{Limits, Outbox, SpoolOptions};
use edgehub::spool::{encode_record, Spool};
use edgehub::Config;
use std::path::PathBuf;
use std::time::Duration;

/// Fuzz target `config`, input `{"quic":45e48}`: serde_json's default float parser is not
/// correctly rounded (it read 45e48 as 4.5000000000000003e49), so a number in a pasted `quic`
/// section changed each time the `check-config` dump was parsed back. Fixed by serde_json's
/// `float_roundtrip` feature.
#[test]
fn config_redacted_dump_parses_back_to_the_same_dump() {
    for input in
        [r#"{"quic":45e48}"#, r#"{"quic":{"x":304474444444444444444444444444444444444444444}}"#]
    {
        let dump = Config::from_json(input).unwrap().to_redacted_json();
        assert!(dump.contains("4.5e+49") || dump.contains("3.0447444444444446e+44"), "{dump}");
        let again = Config::from_json(&dump).unwrap().to_redacted_json();
        assert_eq!(again, dump, "input {input}");
    }
}

/// Fuzz target `spool_segment`, found after 225 s (minimised: one CRC-valid put of `{"":0}` with
/// seq `u64::MAX`). Opening the spool computes the next seq as `seq + 1`, which overflows: a panic
/// with overflow checks, a wrap to 0 without them, after which new segments reuse old names. With
/// `u64::MAX - 1` the open succeeds and the next push overflows instead (`outbox.rs`,
/// `next_seq += 1`). Bad bytes on disk must never stop the agent.
/// Fixed: records above `spool::MAX_SEQ` (2^62) are skipped as corrupt when the spool opens.
#[test]
fn spool_segment_with_a_seq_at_the_top_of_the_range_opens_and_accepts_new_messages() {
    for seq in [u64::MAX, u64::MAX - 1] {
        let dir = scratch_dir(&format!("spool-seq-{seq}"));
        let message = b"{\"header\":{\"msg_id\":\"m\"},\"route\":{\"group\":\"user\"}}\n";
        std::fs::write(
            dir.join("seg-00000000000000000000.log"),
            encode_record(1, seq, now_millis(), message),
        )
        .unwrap();
        let options = SpoolOptions { dir: dir.clone(), sync_interval: Duration::ZERO };
        let outbox = Outbox::open(Limits::simple(10, 1 << 20, 100, 100), &options).unwrap();
        let route = Route { group: "user".into(), operation: "upload".into(), ..Route::default() };
        outbox.push(Message::with_text(route, "after")).unwrap();
        drop(outbox);
        // Whatever the spool made of the bad record, the new message survives a restart.
        let (_, recovered) = Spool::open(&dir, Duration::ZERO).unwrap();
        assert!(
            recovered.iter().any(|r| r.message.content_text().as_deref() == Some("after")),
            "seq {seq}: the message pushed after the bad record was not spooled"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edgehub-regression-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
