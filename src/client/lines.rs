//! Splits input into lines of bounded length; a line that is too long is reported, not fatal.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::Decoder;

/// One input line, or the news that a line was too long and skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A line without its `\n` (nor `\r`).
    Text(Bytes),
    /// A line longer than the limit; its bytes were discarded.
    TooLong,
}

/// Splits on `\n`, holding at most `max` bytes of one line in memory (and its `\r`).
#[derive(Debug)]
pub struct LineDecoder {
    max: usize,
    /// Skipping the rest of a line that was too long.
    discarding: bool,
    /// Bytes of the buffer already searched for `\n`.
    searched: usize,
}

impl LineDecoder {
    /// A decoder for lines of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            discarding: false,
            searched: 0,
        }
    }
}

impl Decoder for LineDecoder {
    type Item = Line;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Line>, std::io::Error> {
        loop {
            let newline = buf[self.searched..].iter().position(|b| *b == b'\n');
            match (newline, self.discarding) {
                (Some(at), true) => {
                    buf.advance(self.searched + at + 1);
                    self.searched = 0;
                    self.discarding = false;
                    // The too-long line was reported when it passed the limit; go on with the next.
                }
                (Some(at), false) => {
                    let end = self.searched + at;
                    self.searched = 0;
                    let mut line = buf.split_to(end + 1);
                    line.truncate(end);
                    if line.last() == Some(&b'\r') {
                        line.truncate(end - 1);
                    }
                    if line.len() > self.max {
                        return Ok(Some(Line::TooLong));
                    }
                    return Ok(Some(Line::Text(line.freeze())));
                }
                (None, true) => {
                    buf.clear();
                    self.searched = 0;
                    return Ok(None);
                }
                // A last `\r` may be the start of the line's `\r\n`, not part of the line.
                (None, false) if buf.len() > self.max + usize::from(buf.last() == Some(&b'\r')) => {
                    buf.clear();
                    self.searched = 0;
                    self.discarding = true;
                    return Ok(Some(Line::TooLong));
                }
                (None, false) => {
                    self.searched = buf.len();
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Line>, std::io::Error> {
        if let Some(line) = self.decode(buf)? {
            return Ok(Some(line));
        }
        self.searched = 0;
        if self.discarding || buf.is_empty() {
            buf.clear();
            self.discarding = false;
            return Ok(None);
        }
        // A last line without a newline.
        let mut line = buf.split();
        if line.last() == Some(&b'\r') {
            line.truncate(line.len() - 1);
        }
        Ok(Some(Line::Text(line.freeze())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], max: usize, chunk: usize) -> Vec<Line> {
        let mut d = LineDecoder::new(max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for part in input.chunks(chunk) {
            buf.extend_from_slice(part);
            while let Some(l) = d.decode(&mut buf).unwrap() {
                out.push(l);
            }
        }
        while let Some(l) = d.decode_eof(&mut buf).unwrap() {
            out.push(l);
        }
        out
    }

    fn text(s: &str) -> Line {
        Line::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn splits_lines_in_any_chunking() {
        let input = b"a\r\nbb\n\nccc";
        for chunk in 1..=input.len() {
            assert_eq!(
                decode_all(input, 10, chunk),
                [text("a"), text("bb"), text(""), text("ccc")],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn a_too_long_line_is_reported_once_and_the_next_lines_go_on() {
        let input = b"ok\n0123456789ABCDEF\nnext\n";
        for chunk in 1..=input.len() {
            assert_eq!(
                decode_all(input, 8, chunk),
                [text("ok"), Line::TooLong, text("next")],
                "chunk {chunk}"
            );
        }
        assert_eq!(decode_all(b"0123456789", 4, 3), [Line::TooLong]);
    }

    #[test]
    fn a_line_at_the_limit_ending_in_crlf_is_text_in_any_chunking() {
        // Found by fuzz/fuzz_targets/jobline.rs: the `\r` of a `\r\n` (or of a last line)
        // counted towards the limit while the newline had not arrived yet.
        let input = b"abcd\r\nefgh\r";
        for chunk in 1..=input.len() {
            assert_eq!(
                decode_all(input, 4, chunk),
                [text("abcd"), text("efgh")],
                "chunk {chunk}"
            );
        }
        assert_eq!(decode_all(b"abcde\r\nx", 4, 2), [Line::TooLong, text("x")]);
    }
}
