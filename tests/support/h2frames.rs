//! Raw HTTP/2 for hostile peers: frames, HPACK literals, a header flood, reading frames by type.
//! Standalone (std and tokio only), so that the benches include it too (`#[path]`).
#![allow(dead_code)]

use tokio::io::{AsyncRead, AsyncReadExt};

// HTTP/2 frame types and flags (RFC 9113, section 6).
pub const DATA_FRAME_MAX: usize = 16_384;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;
pub const END_HEADERS: u8 = 0x4;

/// One frame: the 9-byte header, then `payload`.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .expect("a frame under 16 MiB")
        .to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541, section 5.1).
pub fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header as "literal without indexing, new name", no Huffman coding.
pub fn literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// The frames of a health check on stream 1 whose header block holds `flood` bytes of 4 KiB
/// headers, split into a HEADERS frame and CONTINUATION frames of the default maximum frame size.
pub fn flood_request(flood: usize) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/grpc.health.v1.Health/Check"),
        (":authority", "batchd"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        literal(&mut block, name, value.as_bytes());
    }
    let chunk = vec![b'x'; 4096];
    for i in 0..flood / chunk.len() {
        literal(&mut block, &format!("x-flood-{i}"), &chunk);
    }
    let mut out = Vec::new();
    let parts: Vec<&[u8]> = block.chunks(DATA_FRAME_MAX).collect();
    for (i, part) in parts.iter().enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let flags = if i + 1 == parts.len() { END_HEADERS } else { 0 };
        out.extend(frame(kind, flags, 1, part));
    }
    out
}

/// Reads frames until one of `kinds` arrives or the connection ends: the kind seen, if any.
pub async fn read_until(conn: &mut (impl AsyncRead + Unpin), kinds: &[u8]) -> Option<u8> {
    let mut head = [0u8; 9];
    loop {
        conn.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).await.ok()?;
        if kinds.contains(&head[3]) {
            return Some(head[3]);
        }
    }
}
