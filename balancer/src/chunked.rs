//! HTTP/1.1 body framing shared by the client side and the upstream side: the chunked
//! decoder (strict: a bad chunk size is an error, never a guess) and the chunk encoder.

use bytes::{Buf, Bytes, BytesMut};

/// A chunk-size line or trailer line longer than this is malformed.
const MAX_LINE: usize = 4096;
/// Total trailer bytes accepted (they are read and dropped, like hyper does).
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("invalid chunked encoding: {0}")]
pub struct BadChunk(pub &'static str);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    Data(u64),
    DataEnd,
    Trailer(usize),
    Done,
}

/// Incremental chunked decoder over a connection's read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoder(State);

/// What one decoding step produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Data(Bytes),
    /// Read more bytes into the buffer, then call again.
    NeedMore,
    /// The last chunk and the trailers have been consumed.
    Done,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// The length of the line at the front of `buf` (`crlf`: where its CRLF is), or as much
/// of it as is known: a CR at the very end may be the start of the CRLF. The limits are
/// checked against this, so that a line is refused, or not, whatever the reads' sizes.
fn line_len(buf: &[u8], crlf: Option<usize>) -> usize {
    crlf.unwrap_or_else(|| buf.len() - usize::from(buf.ends_with(b"\r")))
}

/// Hex size of a chunk-size line (`1a;ext=x` allowed, whitespace before `;` allowed).
fn parse_size(line: &[u8]) -> Result<u64, BadChunk> {
    let mut size: u64 = 0;
    let mut digits = 0;
    let mut rest = line;
    while let Some((&c, tail)) = rest.split_first() {
        let v = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => break,
        };
        digits += 1;
        if digits > 16 {
            return Err(BadChunk("chunk size overflows"));
        }
        size = size << 4 | v as u64;
        rest = tail;
    }
    if digits == 0 {
        return Err(BadChunk("chunk size is not hex"));
    }
    let rest = rest
        .iter()
        .position(|&c| c != b' ' && c != b'\t')
        .map_or(&[][..], |i| &rest[i..]);
    match rest.first() {
        None | Some(b';') => Ok(size),
        _ => Err(BadChunk("junk after chunk size")),
    }
}

impl Decoder {
    pub fn new() -> Self {
        Decoder(State::Size)
    }

    pub fn is_done(&self) -> bool {
        self.0 == State::Done
    }

    /// Consumes what it can of `buf`; data comes out without copying.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, BadChunk> {
        loop {
            match self.0 {
                State::Size => {
                    let found = find_crlf(buf);
                    if line_len(buf, found) > MAX_LINE {
                        return Err(BadChunk("chunk size line too long"));
                    }
                    let Some(pos) = found else {
                        return Ok(Step::NeedMore);
                    };
                    let size = parse_size(&buf[..pos])?;
                    buf.advance(pos + 2);
                    self.0 = if size == 0 {
                        State::Trailer(0)
                    } else {
                        State::Data(size)
                    };
                }
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = (buf.len() as u64).min(left) as usize;
                    let data = buf.split_to(n).freeze();
                    self.0 = if left == n as u64 {
                        State::DataEnd
                    } else {
                        State::Data(left - n as u64)
                    };
                    return Ok(Step::Data(data));
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(BadChunk("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.0 = State::Size;
                }
                State::Trailer(seen) => {
                    let found = find_crlf(buf);
                    if seen + line_len(buf, found) > MAX_TRAILERS {
                        return Err(BadChunk("trailers too large"));
                    }
                    let Some(pos) = found else {
                        return Ok(Step::NeedMore);
                    };
                    buf.advance(pos + 2);
                    if pos == 0 {
                        self.0 = State::Done;
                        return Ok(Step::Done);
                    }
                    self.0 = State::Trailer(seen + pos + 2);
                }
                State::Done => return Ok(Step::Done),
            }
        }
    }
}

/// Appends the chunk header of a `len`-byte chunk (`len` > 0).
pub fn chunk_head(out: &mut Vec<u8>, len: usize) {
    use std::io::Write;
    let _ = write!(out, "{len:x}\r\n");
}

pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], split: usize) -> Result<(Vec<u8>, bool), BadChunk> {
        let mut d = Decoder::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(split.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                match d.step(&mut buf)? {
                    Step::Data(b) => out.extend_from_slice(&b),
                    Step::NeedMore => break,
                    Step::Done => return Ok((out, buf.is_empty())),
                }
            }
        }
        Ok((out, false))
    }

    #[test]
    fn decodes_across_every_split_point() {
        let wire = b"5\r\nhello\r\n1;ext=1\r\n \r\nA \r\n0123456789\r\n0\r\nx-t: 1\r\n\r\n";
        for split in 1..wire.len() {
            let (out, done) = decode_all(wire, split).unwrap();
            assert_eq!(out, b"hello 0123456789", "split {split}");
            assert!(done, "split {split}");
        }
    }

    #[test]
    fn leaves_the_next_message_in_the_buffer() {
        let mut d = Decoder::new();
        let mut buf = BytesMut::from(&b"0\r\n\r\nGET / HTTP/1.1\r\n"[..]);
        assert_eq!(d.step(&mut buf).unwrap(), Step::Done);
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn rejects_bad_sizes_and_missing_crlf() {
        for bad in [
            &b"zz\r\nabc\r\n0\r\n\r\n"[..],
            b"\r\n",
            b"-1\r\n",
            b"5 x\r\nhello\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"11111111111111111\r\n",
        ] {
            assert!(
                decode_all(bad, 64).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
