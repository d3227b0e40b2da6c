//! Parsing an upstream's HTTP/1.x response head: one pass over the bytes with a class
//! table per byte, the header lines handed back as slices of the buffer.
//!
//! It accepts and refuses exactly what `httparse` does with its default settings (the
//! property test below holds the two side by side on generated and mangled heads) at
//! less than half its cost on the short heads upstreams send: the response parse was the
//! largest single item of a proxied request's user-space instructions, mostly vector
//! set-up for values a few bytes long.

/// One header line: name and value (without the whitespace around it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'b> {
    pub name: &'b [u8],
    pub value: &'b [u8],
}

pub const EMPTY_HEADER: Header<'static> = Header {
    name: b"",
    value: b"",
};

/// A complete head: its length in the buffer, and the status line's figures. The headers
/// are the first `count` slots of the array given to [`parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub len: usize,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub code: u16,
    pub count: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("more header lines than slots")]
    TooManyHeaders,
    #[error("malformed response head")]
    Invalid,
}

const TOKEN: u8 = 1;
const VALUE: u8 = 2;
const REASON: u8 = 4;

/// What each byte may be: a header name character (RFC 9110 tchar), a header value
/// character (HTAB, SP, VCHAR, obs-text), a reason phrase character (the same).
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let token = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        let value = c == b'\t' || (c >= b' ' && c != 0x7f);
        t[b] = (if token { TOKEN } else { 0 }) | (if value { VALUE | REASON } else { 0 });
        b += 1;
    }
    t
};

/// `Ok(None)`: the head is not complete yet (no byte seen so far is wrong).
pub fn parse<'b>(buf: &'b [u8], headers: &mut [Header<'b>]) -> Result<Option<Parsed>, Error> {
    let mut p = Cursor { buf, at: 0 };
    match p.head(headers) {
        Step::Done(parsed) => Ok(Some(parsed)),
        Step::More => Ok(None),
        Step::Bad(e) => Err(e),
    }
}

enum Step<T> {
    Done(T),
    More,
    Bad(Error),
}

/// `?` for `Step`: an incomplete or bad step ends the parse.
macro_rules! step {
    ($e:expr) => {
        match $e {
            Step::Done(v) => v,
            Step::More => return Step::More,
            Step::Bad(e) => return Step::Bad(e),
        }
    };
}

struct Cursor<'b> {
    buf: &'b [u8],
    at: usize,
}

impl<'b> Cursor<'b> {
    fn next(&mut self) -> Step<u8> {
        match self.buf.get(self.at) {
            Some(&b) => {
                self.at += 1;
                Step::Done(b)
            }
            None => Step::More,
        }
    }

    /// Advances over bytes of `class`.
    fn skip(&mut self, class: u8) {
        while self.at < self.buf.len() && CLASS[self.buf[self.at] as usize] & class != 0 {
            self.at += 1;
        }
    }

    /// After a CR: the LF.
    fn lf(&mut self) -> Step<()> {
        match step!(self.next()) {
            b'\n' => Step::Done(()),
            _ => Step::Bad(Error::Invalid),
        }
    }

    /// The end of a line: CRLF or a bare LF.
    fn eol(&mut self, b: u8) -> Step<()> {
        match b {
            b'\r' => self.lf(),
            b'\n' => Step::Done(()),
            _ => Step::Bad(Error::Invalid),
        }
    }

    fn head(&mut self, headers: &mut [Header<'b>]) -> Step<Parsed> {
        // Empty lines before the status line are skipped.
        loop {
            match step!(self.next()) {
                b'\r' => step!(self.lf()),
                b'\n' => {}
                _ => {
                    self.at -= 1;
                    break;
                }
            }
        }
        let version = match self.buf.get(self.at..self.at + 8) {
            Some(b"HTTP/1.0") => 0,
            Some(b"HTTP/1.1") => 1,
            Some(_) => return Step::Bad(Error::Invalid),
            None if b"HTTP/1.".starts_with(&self.buf[self.at..]) => return Step::More,
            None => return Step::Bad(Error::Invalid),
        };
        self.at += 8;
        if step!(self.next()) != b' ' {
            return Step::Bad(Error::Invalid);
        }
        let mut code = 0u16;
        for _ in 0..3 {
            match step!(self.next()) {
                d @ b'0'..=b'9' => code = code * 10 + u16::from(d - b'0'),
                _ => return Step::Bad(Error::Invalid),
            }
        }
        let mut b = step!(self.next());
        if b == b' ' {
            self.skip(REASON);
            b = step!(self.next());
        }
        step!(self.eol(b));

        let mut count = 0;
        loop {
            let b = step!(self.next());
            if b == b'\r' || b == b'\n' {
                step!(self.eol(b));
                return Step::Done(Parsed {
                    len: self.at,
                    version,
                    code,
                    count,
                });
            }
            if CLASS[b as usize] & TOKEN == 0 {
                return Step::Bad(Error::Invalid);
            }
            let name_at = self.at - 1;
            self.skip(TOKEN);
            let name = &self.buf[name_at..self.at];
            if step!(self.next()) != b':' {
                return Step::Bad(Error::Invalid);
            }
            let mut b = step!(self.next());
            while b == b' ' || b == b'\t' {
                b = step!(self.next());
            }
            let value_at = self.at - 1;
            let value = if b == b'\r' || b == b'\n' {
                &self.buf[value_at..value_at]
            } else if CLASS[b as usize] & VALUE != 0 {
                self.skip(VALUE);
                let end = self.at;
                b = step!(self.next());
                let v = &self.buf[value_at..end];
                let kept = v.iter().rposition(|&c| c != b' ' && c != b'\t');
                &v[..kept.map_or(0, |k| k + 1)]
            } else {
                return Step::Bad(Error::Invalid);
            };
            step!(self.eol(b));
            let Some(slot) = headers.get_mut(count) else {
                return Step::Bad(Error::TooManyHeaders);
            };
            *slot = Header { name, value };
            count += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A parse's answer with owned header lines, comparable across parsers.
    type Answer = Result<Option<(Parsed, Vec<(Vec<u8>, Vec<u8>)>)>, Error>;

    /// httparse's answer in this module's terms.
    fn reference(buf: &[u8], slots: usize) -> Answer {
        let mut h = vec![httparse::EMPTY_HEADER; slots];
        let mut r = httparse::Response::new(&mut h);
        match r.parse(buf) {
            Ok(httparse::Status::Complete(len)) => Ok(Some((
                Parsed {
                    len,
                    version: r.version.unwrap(),
                    code: r.code.unwrap(),
                    count: r.headers.len(),
                },
                r.headers
                    .iter()
                    .map(|h| (h.name.as_bytes().to_vec(), h.value.to_vec()))
                    .collect(),
            ))),
            Ok(httparse::Status::Partial) => Ok(None),
            Err(httparse::Error::TooManyHeaders) => Err(Error::TooManyHeaders),
            Err(_) => Err(Error::Invalid),
        }
    }

    fn ours(buf: &[u8], slots: usize) -> Answer {
        let mut h = vec![EMPTY_HEADER; slots];
        parse(buf, &mut h).map(|p| {
            p.map(|p| {
                let lines = h[..p.count]
                    .iter()
                    .map(|h| (h.name.to_vec(), h.value.to_vec()))
                    .collect();
                (p, lines)
            })
        })
    }

    #[test]
    fn a_typical_head_and_its_prefixes() {
        let head = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 100\r\n\
            Connection: keep-alive\r\nX-Empty:\r\nX-Pad: \t a b \t\r\n\r\nbody";
        let (p, lines) = ours(head, 8).unwrap().unwrap();
        assert_eq!(
            (p.len, p.version, p.code, p.count),
            (head.len() - 4, 1, 200, 5)
        );
        assert_eq!(lines[1], (b"Content-Length".to_vec(), b"100".to_vec()));
        assert_eq!(lines[3], (b"X-Empty".to_vec(), b"".to_vec()));
        assert_eq!(lines[4], (b"X-Pad".to_vec(), b"a b".to_vec()));
        for cut in 0..head.len() - 4 {
            assert_eq!(ours(&head[..cut], 8), Ok(None), "prefix of {cut} bytes");
        }
        assert_eq!(ours(head, 4), Err(Error::TooManyHeaders));
        assert_eq!(
            ours(b"HTTP/1.1 200\nA: b\n\n", 1).unwrap().unwrap().0.len,
            19
        );
        for bad in [
            &b"HTTP/2.0 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 20x OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA : 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA: 1\rB: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA: \x7f\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n folded\r\n\r\n",
        ] {
            assert_eq!(
                ours(bad, 8),
                Err(Error::Invalid),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Heads built from plausible pieces, then mangled: bytes replaced, inserted, cut.
    fn heads() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop::sample::select(vec![
            &b"HTTP/1.1 "[..],
            b"HTTP/1.0 ",
            b"HTTP/1.",
            b"200",
            b"204 No Content",
            b" OK",
            b"\r\n",
            b"\n",
            b"\r",
            b"Server: nginx",
            b"Content-Length: 12",
            b"X-A:",
            b"X-B: \t v \t",
            b"Connection: close",
            b":",
            b" ",
            b"\t",
            b"a",
            b"\x00",
            b"\x7f",
            b"\x80\xff",
            b"{}",
            b"\r\nX-C : 1",
            b"\r\n a: b",
            b"\r\nX-D:\x01",
            b"\r\nX-E:1",
        ]);
        let start = prop::sample::select(vec![
            &b"HTTP/1.1 200 OK\r\n"[..],
            b"HTTP/1.0 404 Not Found\n",
            b"\r\nHTTP/1.1 301\r\n",
            b"",
        ]);
        (start, prop::collection::vec(piece, 0..12), any::<bool>()).prop_map(
            |(start, pieces, end)| {
                let mut v = start.to_vec();
                for p in pieces {
                    v.extend_from_slice(p);
                }
                if end {
                    v.extend_from_slice(b"\r\n\r\n");
                }
                v
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn same_answer_as_httparse(
            head in heads(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 0..3),
            slots in 0..6usize,
        ) {
            let mut head = head;
            for (at, byte, how) in edits {
                let i = if head.is_empty() { 0 } else { at.index(head.len()) };
                match how {
                    0 if !head.is_empty() => head[i] = byte,
                    1 => head.insert(i, byte),
                    _ => head.truncate(i),
                }
            }
            prop_assert_eq!(ours(&head, slots), reference(&head, slots), "{:?}", String::from_utf8_lossy(&head));
        }
    }
}
