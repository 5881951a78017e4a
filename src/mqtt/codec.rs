//! MQTT 3.1.1 packets, exactly the ones a client of one broker needs: it encodes CONNECT,
//! PUBLISH (QoS 0/1), PUBACK, SUBSCRIBE, UNSUBSCRIBE, PINGREQ and DISCONNECT, and decodes what a
//! broker sends back (CONNACK, PUBLISH, PUBACK, SUBACK, UNSUBACK, PINGRESP). Pure: bytes in, bytes
//! out, no I/O, so the decoder is fuzzed on its own. A packet longer than the caller's limit is
//! reported with its length so the reader can skip it instead of allocating it.

use std::fmt;

/// Largest "remaining length" MQTT can express (four 7-bit groups).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// A packet from the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    ConnAck { session_present: bool, code: u8 },
    Publish(IncomingPublish),
    PubAck { packet_id: u16 },
    SubAck { packet_id: u16, codes: Vec<u8> },
    UnsubAck { packet_id: u16 },
    PingResp,
}

/// A PUBLISH as received: `packet_id` is set for QoS 1 (it must be acknowledged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncomingPublish {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub packet_id: Option<u16>,
}

/// Why bytes from the broker are not a packet we accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The packet is `total` bytes long (header included), more than the limit: skip that many.
    TooLarge { total: usize },
    /// The bytes break MQTT 3.1.1 (or are a packet a broker never sends a client).
    Malformed(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge { total } => write!(f, "packet of {total} bytes is too large"),
            DecodeError::Malformed(why) => write!(f, "malformed packet: {why}"),
        }
    }
}

/// The connection request. `keep_alive_secs` 0 turns keep-alive off on the broker's side.
#[derive(Clone, Debug)]
pub struct Connect<'a> {
    pub client_id: &'a str,
    pub keep_alive_secs: u16,
    pub clean_session: bool,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
}

/// CONNACK return codes (MQTT 3.1.1 §3.2.2.3), for the log.
pub fn connack_reason(code: u8) -> &'static str {
    match code {
        0 => "accepted",
        1 => "unacceptable protocol version",
        2 => "client identifier rejected",
        3 => "server unavailable",
        4 => "bad user name or password",
        5 => "not authorised",
        _ => "unknown return code",
    }
}

pub fn encode_connect(c: &Connect<'_>) -> Vec<u8> {
    let mut body = Vec::with_capacity(32 + c.client_id.len());
    put_str(&mut body, "MQTT");
    body.push(4); // protocol level 3.1.1
    let mut flags = 0u8;
    if c.clean_session {
        flags |= 0x02;
    }
    if c.username.is_some() {
        flags |= 0x80;
        if c.password.is_some() {
            flags |= 0x40; // 3.1.1 allows a password only with a user name
        }
    }
    body.push(flags);
    body.extend_from_slice(&c.keep_alive_secs.to_be_bytes());
    put_str(&mut body, c.client_id);
    if let Some(user) = c.username {
        put_str(&mut body, user);
        if let Some(password) = c.password {
            put_bytes(&mut body, password);
        }
    }
    frame(0x10, &body)
}

/// A PUBLISH. `packet_id` must be `Some` exactly when `qos` is 1.
pub fn encode_publish(
    topic: &str,
    payload: &[u8],
    qos: u8,
    retain: bool,
    dup: bool,
    packet_id: Option<u16>,
) -> Vec<u8> {
    let mut first = 0x30 | ((qos & 0x03) << 1);
    if retain {
        first |= 0x01;
    }
    if dup {
        first |= 0x08;
    }
    // Written straight after the fixed header: the payload is copied once, not via a body.
    let body_len =
        2 + topic.len().min(usize::from(u16::MAX)) + packet_id.map_or(0, |_| 2) + payload.len();
    let mut out = frame_header(first, body_len);
    put_str(&mut out, topic);
    if let Some(id) = packet_id {
        out.extend_from_slice(&id.to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

pub fn encode_puback(packet_id: u16) -> Vec<u8> {
    frame(0x40, &packet_id.to_be_bytes())
}

/// SUBSCRIBE for `filters`, each with its maximum QoS.
pub fn encode_subscribe(packet_id: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    for (filter, qos) in filters {
        put_str(&mut body, filter);
        body.push(*qos);
    }
    frame(0x82, &body)
}

pub fn encode_unsubscribe(packet_id: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    for filter in filters {
        put_str(&mut body, filter);
    }
    frame(0xA2, &body)
}

pub fn encode_pingreq() -> Vec<u8> {
    vec![0xC0, 0]
}

pub fn encode_disconnect() -> Vec<u8> {
    vec![0xE0, 0]
}

/// Decodes the first packet in `buf`. `Ok(None)`: more bytes are needed. `Ok(Some((packet,
/// used)))`: `used` bytes made the packet. A packet longer than `max_packet` bytes is
/// `TooLarge` (even before all of it has arrived), so nothing that big is ever buffered.
///
/// # Errors
/// `TooLarge` with the packet's total length; `Malformed` for anything else that is not a
/// packet a broker sends a 3.1.1 client (the connection cannot be trusted after that).
pub fn decode(buf: &[u8], max_packet: usize) -> Result<Option<(Packet, usize)>, DecodeError> {
    let Some(&first) = buf.first() else { return Ok(None) };
    let Some((remaining, len_bytes)) = remaining_length(&buf[1..])? else { return Ok(None) };
    let total = 1 + len_bytes + remaining;
    if total > max_packet {
        return Err(DecodeError::TooLarge { total });
    }
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[1 + len_bytes..total];
    let flags = first & 0x0F;
    let packet = match first >> 4 {
        2 => {
            if flags != 0 || body.len() != 2 {
                return Err(DecodeError::Malformed("CONNACK is not 2 bytes"));
            }
            Packet::ConnAck { session_present: body[0] & 1 == 1, code: body[1] }
        }
        3 => Packet::Publish(decode_publish(flags, body)?),
        4 => Packet::PubAck { packet_id: id_only(flags, 0, body, "PUBACK")? },
        9 => {
            if flags != 0 || body.len() < 3 {
                return Err(DecodeError::Malformed("SUBACK shorter than 3 bytes"));
            }
            let codes = body[2..].to_vec();
            if codes.iter().any(|&c| c > 2 && c != 0x80) {
                return Err(DecodeError::Malformed("SUBACK return code not 0, 1, 2 or 0x80"));
            }
            Packet::SubAck { packet_id: u16::from_be_bytes([body[0], body[1]]), codes }
        }
        11 => Packet::UnsubAck { packet_id: id_only(flags, 0, body, "UNSUBACK")? },
        13 => {
            if flags != 0 || !body.is_empty() {
                return Err(DecodeError::Malformed("PINGRESP with flags or a body"));
            }
            Packet::PingResp
        }
        _ => return Err(DecodeError::Malformed("packet type a broker does not send a client")),
    };
    Ok(Some((packet, total)))
}

fn decode_publish(flags: u8, body: &[u8]) -> Result<IncomingPublish, DecodeError> {
    let qos = (flags >> 1) & 0x03;
    if qos > 1 {
        // We subscribe with at most QoS 1, so a broker never sends QoS 2 (and 3 is invalid).
        return Err(DecodeError::Malformed("PUBLISH with QoS above 1"));
    }
    let (topic, rest) = take_str(body).ok_or(DecodeError::Malformed("PUBLISH topic"))?;
    if topic.is_empty() || topic.contains(['+', '#']) {
        return Err(DecodeError::Malformed("PUBLISH topic empty or with a wildcard"));
    }
    let (packet_id, payload) = if qos == 1 {
        if rest.len() < 2 {
            return Err(DecodeError::Malformed("PUBLISH QoS 1 without a packet id"));
        }
        let id = u16::from_be_bytes([rest[0], rest[1]]);
        if id == 0 {
            return Err(DecodeError::Malformed("PUBLISH packet id 0"));
        }
        (Some(id), &rest[2..])
    } else {
        (None, rest)
    };
    Ok(IncomingPublish {
        topic: topic.to_owned(),
        payload: payload.to_vec(),
        qos,
        retain: flags & 1 == 1,
        packet_id,
    })
}

fn id_only(flags: u8, want: u8, body: &[u8], name: &'static str) -> Result<u16, DecodeError> {
    if flags != want || body.len() != 2 {
        return Err(DecodeError::Malformed(name));
    }
    Ok(u16::from_be_bytes([body[0], body[1]]))
}

/// The variable-length "remaining length": `Ok(None)` when its bytes have not all arrived.
fn remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value = 0usize;
    for (i, &byte) in buf.iter().enumerate().take(4) {
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= 4 {
        return Err(DecodeError::Malformed("remaining length longer than 4 bytes"));
    }
    Ok(None)
}

/// A UTF-8 string with its 2-byte length, and what follows it.
fn take_str(buf: &[u8]) -> Option<(&str, &[u8])> {
    if buf.len() < 2 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
    let bytes = buf.get(2..2 + len)?;
    let text = std::str::from_utf8(bytes).ok()?;
    if text.contains('\0') {
        return None; // MQTT-1.5.3-2
    }
    Some((text, &buf[2 + len..]))
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

/// Strings and binary fields are at most 65535 bytes; callers check topics and filters, and a
/// longer field is cut rather than written with a wrong length.
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len().min(usize::from(u16::MAX));
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&bytes[..len]);
}

fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = frame_header(first, body.len());
    out.extend_from_slice(body);
    out
}

/// The fixed header of a packet with a `body_len`-byte body, with room for the body.
fn frame_header(first: u8, body_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body_len);
    out.push(first);
    let mut len = body_len;
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    /// What a broker would send: the client-side encoder with the broker's packet types.
    fn broker_publish(topic: &str, payload: &[u8], qos: u8, id: Option<u16>) -> Vec<u8> {
        encode_publish(topic, payload, qos, false, false, id)
    }

    #[test]
    fn publish_round_trips_at_qos_0_and_1() {
        let bytes = broker_publish("a/b", b"{\"x\":1}", 1, Some(7));
        let (packet, used) = decode(&bytes, MAX).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(
            packet,
            Packet::Publish(IncomingPublish {
                topic: "a/b".into(),
                payload: b"{\"x\":1}".to_vec(),
                qos: 1,
                retain: false,
                packet_id: Some(7)
            })
        );
        let bytes = broker_publish("t", b"", 0, None);
        let (packet, _) = decode(&bytes, MAX).unwrap().unwrap();
        assert!(
            matches!(packet, Packet::Publish(p) if p.packet_id.is_none() && p.payload.is_empty())
        );
    }

    #[test]
    fn long_remaining_lengths_encode_and_decode() {
        for len in [0usize, 127, 128, 16_383, 16_384, 300_000] {
            let bytes = broker_publish("t", &vec![b'x'; len], 0, None);
            let (packet, used) = decode(&bytes, MAX).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            assert!(matches!(packet, Packet::Publish(p) if p.payload.len() == len));
            // Every prefix is "need more", never an error.
            for cut in [0, 1, 2, 3, bytes.len() - 1] {
                assert_eq!(decode(&bytes[..cut], MAX), Ok(None), "len {len} cut {cut}");
            }
        }
    }

    #[test]
    fn a_packet_over_the_limit_is_reported_with_its_length_before_it_arrives() {
        let bytes = broker_publish("t", &[0u8; 2000], 0, None);
        assert_eq!(decode(&bytes[..5], 1000), Err(DecodeError::TooLarge { total: bytes.len() }));
    }

    #[test]
    fn acks_and_pings_decode() {
        assert_eq!(
            decode(&[0x20, 2, 0, 5], MAX),
            Ok(Some((Packet::ConnAck { session_present: false, code: 5 }, 4)))
        );
        assert_eq!(decode(&[0x40, 2, 1, 2], MAX), Ok(Some((Packet::PubAck { packet_id: 258 }, 4))));
        assert_eq!(
            decode(&[0x90, 4, 0, 9, 1, 0x80], MAX),
            Ok(Some((Packet::SubAck { packet_id: 9, codes: vec![1, 0x80] }, 6)))
        );
        assert_eq!(decode(&[0xB0, 2, 0, 3], MAX), Ok(Some((Packet::UnsubAck { packet_id: 3 }, 4))));
        assert_eq!(decode(&[0xD0, 0], MAX), Ok(Some((Packet::PingResp, 2))));
    }

    #[test]
    fn malformed_packets_are_errors() {
        for bad in [
            &[0x20, 3, 0, 0, 0][..],             // CONNACK of 3 bytes
            &[0x34, 5, 0, 1, b't', 0, 1][..],    // QoS 2
            &[0x32, 3, 0, 1, b't'][..],          // QoS 1 without id
            &[0x30, 3, 0, 1, b'#'][..],          // wildcard topic
            &[0x30, 3, 0, 2, b't'][..],          // topic length past the end
            &[0x30, 4, 0, 2, 0xff, 0xfe][..],    // topic not UTF-8
            &[0x10, 0][..],                      // CONNECT from a broker
            &[0x30, 0xff, 0xff, 0xff, 0xff][..], // five-byte length
            &[0x90, 3, 0, 1, 7][..],             // bad SUBACK code
        ] {
            assert!(matches!(decode(bad, MAX), Err(DecodeError::Malformed(_))), "{bad:?}");
        }
    }

    #[test]
    fn connect_carries_credentials_and_keep_alive() {
        let bytes = encode_connect(&Connect {
            client_id: "id",
            keep_alive_secs: 30,
            clean_session: true,
            username: Some("u"),
            password: Some(b"p"),
        });
        assert_eq!(
            bytes,
            [
                0x10, 20, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 30, 0, 2, b'i', b'd', 0, 1,
                b'u', 0, 1, b'p'
            ]
        );
    }

    /// Fuzz-style: random and mutated byte strings never panic, never claim more bytes than
    /// given, and decoding is consistent on every prefix.
    #[test]
    fn decoder_survives_random_and_mutated_input() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let seeds = [
            broker_publish("$hw/events/device/d/twin/update", b"{}", 1, Some(1)),
            vec![0x90, 3, 0, 1, 1],
            vec![0x20, 2, 0, 0],
            vec![0xD0, 0],
        ];
        for round in 0..20_000 {
            let mut bytes = if round % 2 == 0 {
                seeds[(next() % 4) as usize].clone()
            } else {
                (0..next() % 40).map(|_| next() as u8).collect()
            };
            for _ in 0..(next() % 4) {
                if !bytes.is_empty() {
                    let at = (next() as usize) % bytes.len();
                    bytes[at] = next() as u8;
                }
            }
            if let Ok(Some((_, used))) = decode(&bytes, 4096) {
                assert!(used <= bytes.len());
            }
        }
    }
}
