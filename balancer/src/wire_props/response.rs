//! Upstream response heads (`upstream::parse_head`): prefixes, and the lines a client gets.

use bytes::BytesMut;
use http::{Method, StatusCode, Version};
use proptest::prelude::*;

use super::*;
use crate::hop_by_hop;
use crate::upstream::{self, Framing};

/// An upstream's response head (and maybe body bytes).
fn response_wire() -> impl Strategy<Value = Vec<u8>> {
    odd_and_edits().prop_flat_map(|(odd, edits)| {
        (
            piece(
                odd,
                &["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"],
                &["HTTP/2", "HTTP/1.1 ", ""],
            ),
            piece(
                odd,
                &[
                    "200 OK",
                    "204 No Content",
                    "304 x",
                    "100 Continue",
                    "101 Switching",
                    "404 ",
                ],
                &["999 x", "20 x", "abc", "404"],
            ),
            eol(odd),
            prop::collection::vec(header_line(odd), 0..10),
            eol(odd),
            one_of(&["", "hello", "5\r\nhello\r\n0\r\n\r\n"]),
        )
            .prop_map(move |(v, s, e1, lines, e2, tail)| {
                let wire = format!("{v} {s}{e1}{}{e2}{tail}", lines.concat());
                apply(wire.into_bytes(), &edits)
            })
    })
}

/// What a parse of a response head decided, comparable.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RespOutcome {
    Incomplete,
    Refused(String),
    Head {
        status: StatusCode,
        framing: Framing,
        keep_alive: bool,
        /// The client's head as it goes out (status line and kept lines).
        lines: Vec<u8>,
        rest: Vec<u8>,
    },
}

fn parse_response(bytes: &[u8], method: &Method) -> RespOutcome {
    let mut buf = BytesMut::from(bytes);
    match upstream::parse_head(&mut buf, method, Some(Version::HTTP_11)) {
        Ok(None) => RespOutcome::Incomplete,
        Err(e) => RespOutcome::Refused(e.to_string()),
        Ok(Some(h)) => RespOutcome::Head {
            status: h.status,
            framing: h.framing,
            keep_alive: h.keep_alive,
            lines: h.lines.map(|l| l.bytes).unwrap_or_default(),
            rest: buf.to_vec(),
        },
    }
}

/// All the lines of a response head as `httparse` reads them (names in lower case,
/// values trimmed); `None` if it does not parse.
fn response_lines(head: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut headers = vec![httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = resp.parse(head) else {
        return None;
    };
    let lines = resp.headers.iter();
    Some(
        lines
            .map(|h| {
                (
                    h.name.as_bytes().to_ascii_lowercase(),
                    h.value.trim_ascii().to_vec(),
                )
            })
            .collect(),
    )
}

/// What an HTTP/1 client must get of a response head's lines: the end-to-end ones
/// (hop-by-hop lines, lines named by `Connection`, a length next to a transfer coding and
/// a repeated length left out).
fn end_to_end_lines(head: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let all = response_lines(head)?;
    let te = all.iter().any(|(n, _)| n == b"transfer-encoding");
    let named = |name: &[u8]| {
        all.iter()
            .filter(|(n, _)| n == b"connection")
            .flat_map(|(_, v)| v.split(|&c| c == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(name))
    };
    let mut lengths = 0;
    let kept = all.iter().filter(|(n, _)| {
        let is_length = n == b"content-length";
        lengths += usize::from(is_length);
        !(hop_by_hop::is_hop_by_hop(n) || (is_length && (te || lengths > 1)) || named(n))
    });
    Some(kept.cloned().collect())
}

proptest! {
    /// Every prefix of a response parses as incomplete or as the whole does.
    #[test]
    fn response_head_outcome_does_not_depend_on_the_reads(wire in response_wire(), head_request in any::<bool>()) {
        let method = if head_request { Method::HEAD } else { Method::GET };
        let whole = parse_response(&wire, &method);
        let mut decided = false;
        for k in 0..=wire.len() {
            let at_k = parse_response(&wire[..k], &method);
            if at_k == RespOutcome::Incomplete {
                prop_assert!(!decided, "{k} bytes are incomplete after a decision");
                continue;
            }
            decided = true;
            prop_assert_eq!(&at_k, &resp_cut(&whole, wire.len() - k), "after {} bytes", k);
        }
    }

    /// The lines written to an HTTP/1 client are the upstream's end-to-end lines (copied
    /// line by line where they can be), and they parse as a head.
    #[test]
    fn response_lines_are_the_end_to_end_lines(wire in response_wire()) {
        if let RespOutcome::Head { status, lines, .. } = parse_response(&wire, &Method::GET) {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Ok(());
            }
            let mut head = lines.clone();
            head.extend_from_slice(b"\r\n");
            let sent = response_lines(&head).ok_or_else(|| TestCaseError::fail(format!(
                "the client's head does not parse: {:?}", String::from_utf8_lossy(&head))))?;
            prop_assert_eq!(sent, end_to_end_lines(&wire).unwrap());
        }
    }
}

/// See [`req_cut`].
fn resp_cut(whole: &RespOutcome, missing: usize) -> RespOutcome {
    let mut o = whole.clone();
    if let RespOutcome::Head { rest, .. } = &mut o {
        rest.truncate(rest.len().saturating_sub(missing));
    }
    o
}
