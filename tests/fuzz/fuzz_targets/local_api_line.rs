//! Fuzzes what the local API does with the bytes a client writes to its socket: the bounded line
//! reader, then `parse_request`, the checks a request passes before the agent acts on it.
//! Properties: `parse_request` never panics on any bytes; `read_line` over a small-buffer
//! `BufReader` (7 bytes, so lines straddle refills) yields exactly the input's `\n`-split lines,
//! a line over the limit as `TooLong(its length)` with nothing kept, and never holds more than the
//! limit. The limit comes from the first byte (1..=1021), so both short and request-sized limits
//! are exercised.

#![no_main]

use edgehub::modules::local_api::{parse_request, read_line, Line};
use libfuzzer_sys::fuzz_target;
use std::io::{BufReader, Cursor};

fuzz_target!(|data: &[u8]| {
    let _ = parse_request(data);

    let max = usize::from(data.first().copied().unwrap_or(0)) * 4 + 1;
    // What read_line must find: the `\n`-split lines, where a trailing `\n` ends the last line
    // rather than starting an empty one.
    let mut expected: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    if data.is_empty() || data.ends_with(b"\n") {
        expected.pop();
    }

    let mut reader = BufReader::with_capacity(7, Cursor::new(data));
    let mut line = Vec::new();
    for (index, want) in expected.iter().enumerate() {
        let found = match read_line(&mut reader, &mut line, max) {
            Ok(found) => found,
            Err(e) => panic!("line {index}: read from memory failed: {e}"),
        };
        assert!(line.len() <= max, "line {index}: holds {} bytes over limit {max}", line.len());
        assert!(
            line.capacity() <= (2 * max).max(8),
            "line {index}: capacity {} for limit {max}",
            line.capacity()
        );
        if want.len() > max {
            assert_eq!(found, Line::TooLong(want.len()), "line {index}, limit {max}");
            assert!(line.is_empty(), "line {index}: a too-long line kept {} bytes", line.len());
        } else {
            assert_eq!(found, Line::Complete, "line {index}, limit {max}");
            assert_eq!(line.as_slice(), *want, "line {index}, limit {max}");
            // What the client thread does with a line.
            if !line.iter().all(u8::is_ascii_whitespace) {
                let _ = parse_request(&line);
            }
        }
    }
    assert_eq!(read_line(&mut reader, &mut line, max).ok(), Some(Line::Eof), "limit {max}");
    assert!(line.is_empty());
});
