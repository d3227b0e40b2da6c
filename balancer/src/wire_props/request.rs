//! Client request heads (`h1_request`, `h1_head`): generated heads, split any way.

use bytes::BytesMut;
use http::{Method, Version};
use proptest::prelude::*;

use super::*;
use crate::h1_head::{self, Forwarded, ReqHeaders};
use crate::h1_request::{self, BodyKind, HeadError, Parsed};

/// A client's request head (and maybe what follows it).
fn request_wire() -> impl Strategy<Value = Vec<u8>> {
    odd_and_edits().prop_flat_map(|(odd, edits)| {
        (
            piece(
                odd,
                &["GET", "POST", "HEAD", "PUT", "OPTIONS", "DELETE"],
                &["get", "G(T", ""],
            ),
            piece(
                odd,
                &[
                    "/",
                    "/a/b?c=d&e",
                    "*",
                    "http://example.com/x?y",
                    "/%41%00",
                    "example.com:443",
                ],
                &["/a b", "", "/\u{e9}"],
            ),
            piece(
                odd,
                &["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"],
                &["HTTP/2.0", "HTTP/1.2", "http/1.1"],
            ),
            eol(odd),
            prop::collection::vec(header_line(odd), 0..10),
            eol(odd),
            one_of(&["", "", "hello", "0\r\n\r\n", "GET / HTTP/1.1\r\n\r\n"]),
        )
            .prop_map(move |(m, t, v, e1, lines, e2, tail)| {
                let wire = format!("{m} {t} {v}{e1}{}{e2}{tail}", lines.concat());
                apply(wire.into_bytes(), &edits)
            })
    })
}

const MAX_HEADERS: usize = 100;
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// What a parse of a request head decided, comparable.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ReqOutcome {
    Incomplete,
    Refused(HeadError),
    Head {
        len: usize,
        method: Method,
        target: String,
        version: Version,
        body: BodyKind,
        keep_alive: bool,
        expect_continue: bool,
        upgrade: bool,
        lines: Vec<(Vec<u8>, Vec<u8>)>,
        rest: Vec<u8>,
    },
}

fn parse_request(bytes: &[u8]) -> (ReqOutcome, Option<Parsed>) {
    let mut buf = BytesMut::from(bytes);
    match h1_request::parse(&mut buf, MAX_HEADERS, MAX_HEAD_BYTES) {
        Ok(None) => (ReqOutcome::Incomplete, None),
        Err(e) => (ReqOutcome::Refused(e), None),
        Ok(Some(p)) => {
            let outcome = ReqOutcome::Head {
                len: p.head.byte_len(),
                method: p.request.method().clone(),
                target: p.request.uri().to_string(),
                version: p.request.version(),
                body: p.body,
                keep_alive: p.keep_alive,
                expect_continue: p.expect_continue,
                upgrade: p.upgrade,
                lines: p
                    .head
                    .lines()
                    .map(|(n, v)| (n.to_vec(), v.to_vec()))
                    .collect(),
                rest: buf.to_vec(),
            };
            (outcome, Some(p))
        }
    }
}

/// The header lines as `httparse` itself reads the head (values trimmed as `RawLines`
/// trims them), less `Expect: 100-continue`, which the balancer answers itself.
fn httparse_lines(head: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut headers = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    assert!(matches!(req.parse(head), Ok(httparse::Status::Complete(_))));
    req.headers
        .iter()
        .map(|h| (h.name.as_bytes().to_vec(), h.value.trim_ascii().to_vec()))
        .filter(|(n, v)| {
            !(n.eq_ignore_ascii_case(b"expect") && v.eq_ignore_ascii_case(b"100-continue"))
        })
        .collect()
}

/// The head the proxy sends upstream for `p` (as `proxy::forward` encodes it).
fn forwarded_head(p: &Parsed) -> Vec<u8> {
    let empty = http::HeaderMap::new();
    let peer_ip = http::HeaderValue::from_static("192.0.2.7");
    let mut out = Vec::new();
    let target = h1_head::origin_form(p.request.uri());
    h1_head::encode_request(
        &mut out,
        p.request.method(),
        &target,
        ReqHeaders::of(Some(&p.head), &empty),
        &Forwarded {
            add: true,
            peer_ip: &peer_ip,
            tls: false,
            client_cert: None,
            authority: p.request.uri().authority().map(|a| a.as_str()),
            upgrade: p.upgrade,
            chunked: p.body == BodyKind::Chunked,
            rewrite: None,
        },
    );
    out
}

fn count_lines(head: &[u8], name: &[u8]) -> usize {
    httparse_lines(head)
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .count()
}

proptest! {
    /// Every prefix of a request parses as incomplete or as the whole does: the head is
    /// recognised when its last byte arrives, and a refusal does not depend on where the
    /// reads were cut.
    #[test]
    fn request_head_outcome_does_not_depend_on_the_reads(wire in request_wire()) {
        let (whole, _) = parse_request(&wire);
        let mut decided = false;
        for k in 0..=wire.len() {
            let (at_k, _) = parse_request(&wire[..k]);
            if at_k == ReqOutcome::Incomplete {
                prop_assert!(!decided, "{k} bytes are incomplete after a decision");
                continue;
            }
            decided = true;
            prop_assert_eq!(&at_k, &req_cut(&whole, wire.len() - k), "after {} bytes", k);
        }
    }

    /// The lines the proxy forwards (`RawLines`, its own scan of the raw head) are the
    /// lines `httparse` validated, in order.
    #[test]
    fn forwarded_lines_are_the_validated_lines(wire in request_wire()) {
        if let (_, Some(p)) = parse_request(&wire) {
            let head = &wire[..p.head.byte_len()];
            let raw: Vec<_> = p.head.lines().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
            prop_assert_eq!(raw, httparse_lines(head));
        }
    }

    /// The head sent upstream parses, and frames the body exactly as the balancer framed
    /// the client's: one length or chunked, never both, never two lengths.
    #[test]
    fn the_forwarded_head_frames_the_body_as_decided(wire in request_wire()) {
        if let (_, Some(p)) = parse_request(&wire) {
            let out = forwarded_head(&p);
            let (again, q) = parse_request(&out);
            let q = q.ok_or_else(|| TestCaseError::fail(format!(
                "forwarded head refused ({again:?}): {:?}", String::from_utf8_lossy(&out))))?;
            prop_assert_eq!(q.head.byte_len(), out.len());
            prop_assert_eq!(q.request.method(), p.request.method());
            prop_assert_eq!(q.body, p.body);
            prop_assert!(count_lines(&out, b"content-length") <= 1);
            prop_assert_eq!(count_lines(&out, b"transfer-encoding"), usize::from(p.body == BodyKind::Chunked));
            prop_assert_eq!(q.head.host(), p.head.host().or(p.request.uri().authority().map(|a| a.as_str().as_bytes())));
        }
    }
}

/// `whole` as a parse of all but the last `missing` bytes gives it (a head leaves less
/// after it; anything else is the same).
fn req_cut(whole: &ReqOutcome, missing: usize) -> ReqOutcome {
    let mut o = whole.clone();
    if let ReqOutcome::Head { rest, .. } = &mut o {
        rest.truncate(rest.len().saturating_sub(missing));
    }
    o
}
