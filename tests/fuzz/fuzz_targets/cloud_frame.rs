//! Fuzzes what the reader does with every frame from the cloud: `Message::decode`, then the
//! dispatch table. Properties: decoding never panics; a decoded message re-encodes to a frame that
//! decodes to an equal message, and re-encoding that gives the same bytes (encode is stable); the
//! helpers the reader and modules call on any message (`destination`, `needs_ack`, `ack`, …) never
//! panic.

#![no_main]

use edgehub::message::Message;
use edgehub::router::destination;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = Message::decode(data) else {
        return;
    };
    let frame = msg.encode();
    let again = match Message::decode(frame.as_bytes()) {
        Ok(again) => again,
        Err(e) => panic!("re-encoded frame does not decode: {e}\nframe: {frame}"),
    };
    assert!(
        msg == again,
        "round trip changed the message\nfirst:  {frame}\nsecond: {}",
        again.encode()
    );
    assert_eq!(frame, again.encode(), "encode is not stable");

    let _ = destination(&msg);
    let _ = (msg.needs_ack(), msg.is_control(), msg.is_response(), msg.content_text());
    let _ = (msg.encoded_len_hint(), format!("{msg:?}"));
    let ack = msg.ack();
    assert_eq!(ack.header.parent_id, msg.header.id);
    let _ = destination(&msg.control_ack());
});
