//! Chunked bodies (`chunked`): the same outcome for any reads, and a round trip.

use bytes::BytesMut;
use proptest::prelude::*;

use super::*;
use crate::chunked::{Decoder, Step};

/// A chunked body: valid chunks, junk, and size or trailer lines near the length limits.
fn chunked_wire() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        4 => (1usize..40, one_of(&["", ";ext=1", " ;a", "\t; b=\"c\""])).prop_map(|(n, ext)| {
            format!("{n:x}{ext}\r\n{}\r\n", "d".repeat(n)).into_bytes()
        }),
        1 => one_of(&["0\r\n", "\r\n", "x-t: 1\r\n", "zz\r\n", "5\r\nab", "\n", "\r", "fffffffffffffffff\r\n"])
            .prop_map(String::into_bytes),
        // A chunk-size line whose extension takes it to about the line limit.
        1 => (4090usize..4100).prop_map(|n| format!("1;{}\r\nd\r\n", "e".repeat(n - 4)).into_bytes()),
        // A trailer line of about the trailers' limit.
        1 => (16370usize..16390).prop_map(|n| format!("0\r\nx: {}\r\n\r\n", "t".repeat(n - 5)).into_bytes()),
    ];
    (
        prop::collection::vec(piece, 0..6),
        one_of(&["0\r\n\r\n", "0\r\nx-t: 1\r\n\r\n", "", "0\r\n"]),
        one_of(&["", "GET / HTTP/1.1\r\n\r\n"]),
        edits(),
    )
        .prop_map(|(pieces, last, next, edits)| {
            let mut wire = pieces.concat();
            wire.extend_from_slice(last.as_bytes());
            wire.extend_from_slice(next.as_bytes());
            apply(wire, &edits)
        })
}

/// What decoding a chunked body decided: the data, and how it ended.
#[derive(Debug, PartialEq, Eq)]
struct ChunkedOutcome {
    data: Vec<u8>,
    end: ChunkedEnd,
}

#[derive(Debug, PartialEq, Eq)]
enum ChunkedEnd {
    /// The body ended; these bytes follow it.
    Done(Vec<u8>),
    NeedMore,
    Refused(&'static str),
}

fn decode(reads: &[&[u8]]) -> ChunkedOutcome {
    let mut d = Decoder::new();
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    for (i, piece) in reads.iter().enumerate() {
        buf.extend_from_slice(piece);
        loop {
            match d.step(&mut buf) {
                Ok(Step::Data(b)) => data.extend_from_slice(&b),
                Ok(Step::NeedMore) => break,
                Ok(Step::Done) => {
                    let mut rest = buf.to_vec();
                    rest.extend(reads[i + 1..].concat());
                    return ChunkedOutcome {
                        data,
                        end: ChunkedEnd::Done(rest),
                    };
                }
                Err(e) => {
                    return ChunkedOutcome {
                        data,
                        end: ChunkedEnd::Refused(e.0),
                    };
                }
            }
        }
    }
    ChunkedOutcome {
        data,
        end: ChunkedEnd::NeedMore,
    }
}

proptest! {
    /// A chunked body decodes to the same data and the same end however it is cut into
    /// reads, limits included.
    #[test]
    fn chunked_outcome_does_not_depend_on_the_reads(wire in chunked_wire(), sizes in reads()) {
        prop_assert_eq!(decode(&split(&wire, &sizes)), decode(&[&wire]));
    }

    /// What the encoder writes decodes to the data, and the next message stays.
    #[test]
    fn chunked_round_trip(body in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 0..8), sizes in reads()) {
        let mut wire = Vec::new();
        for chunk in &body {
            crate::chunked::chunk_head(&mut wire, chunk.len());
            wire.extend_from_slice(chunk);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(crate::chunked::LAST_CHUNK);
        wire.extend_from_slice(b"GET /next HTTP/1.1\r\n");
        let out = decode(&split(&wire, &sizes));
        prop_assert_eq!(out.data, body.concat());
        prop_assert_eq!(out.end, ChunkedEnd::Done(b"GET /next HTTP/1.1\r\n".to_vec()));
    }
}
