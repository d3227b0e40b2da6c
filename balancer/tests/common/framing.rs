//! HTTP/1.1 message framing as the generated-wire tests write it (`tests/wire.rs` for
//! requests, `tests/wire_upstream.rs` for responses): the framing lines of a head and the
//! body as it goes on the wire.

/// How a generated message's body is delimited.
#[derive(Debug, Clone)]
pub enum Framing {
    /// No body.
    None,
    /// `Content-Length`, sent twice when `.0`.
    Length(bool),
    /// Chunk sizes (cycled over the body), an extension on each size line, a trailer.
    Chunked(Vec<usize>, bool, bool),
    /// No length (a response): the body ends when the connection closes.
    UntilClose,
}

impl Framing {
    /// The framing lines of the head, for a body of `len` bytes.
    pub fn head_lines(&self, len: usize, eol: &str) -> String {
        match self {
            Framing::Length(twice) => {
                format!("Content-Length: {len}{eol}").repeat(1 + usize::from(*twice))
            }
            Framing::Chunked(..) => format!("Transfer-Encoding: chunked{eol}"),
            Framing::None | Framing::UntilClose => String::new(),
        }
    }

    /// Appends `body` as it goes on the wire.
    pub fn put_body(&self, body: &[u8], out: &mut Vec<u8>) {
        let Framing::Chunked(sizes, ext, trailer) = self else {
            out.extend_from_slice(body);
            return;
        };
        let mut rest = body;
        for &n in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, tail) = rest.split_at(n.min(rest.len()));
            let ext = if *ext { ";ext=\"x\"" } else { "" };
            out.extend_from_slice(format!("{:x}{ext}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
            rest = tail;
        }
        out.extend_from_slice(if *trailer {
            b"0\r\nX-Trailer: 1\r\n\r\n"
        } else {
            b"0\r\n\r\n"
        });
    }
}
