//! Properties of lb.toml parsing over damaged files: `lb.example.toml` (which sets most
//! keys) with lines dropped or repeated, values swapped for odd ones (negative, huge, empty,
//! the wrong type, an endless duration, non-ASCII) and bytes replaced, inserted or removed.
//! Whatever the file, `LbConfig::parse` returns (no panic), and a refusal names the file
//! (and, for a value, where it is).

use proptest::prelude::*;
use proptest::sample::Index;

use crate::config::LbConfig;

const EXAMPLE: &str = include_str!("../lb.example.toml");

const ODD_VALUES: &[&str] = &[
    "-1",
    "0",
    "99999999999999999999",
    "\"\"",
    "\"1000000years\"",
    "\"0s\"",
    "\"x\"",
    "true",
    "[]",
    "{}",
    "\"256.1.1.1:80\"",
    "\"[::1]:99999\"",
    "\"é\u{301}\"",
];

#[derive(Debug, Clone)]
enum Edit {
    DropLine(Index),
    RepeatLine(Index),
    /// The value of a `key = value` line replaced.
    Value(Index, &'static str),
    Byte(Index, u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<Index>().prop_map(Edit::DropLine),
        any::<Index>().prop_map(Edit::RepeatLine),
        (any::<Index>(), prop::sample::select(ODD_VALUES)).prop_map(|(i, v)| Edit::Value(i, v)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Byte(i, b)),
    ]
}

fn apply(edits: &[Edit]) -> String {
    let mut lines: Vec<String> = EXAMPLE.lines().map(str::to_owned).collect();
    for e in edits {
        match e {
            Edit::DropLine(i) => {
                lines.remove(i.index(lines.len()));
            }
            Edit::RepeatLine(i) => {
                let at = i.index(lines.len());
                lines.insert(at, lines[at].clone());
            }
            Edit::Value(i, v) => {
                let keyed: Vec<usize> = (0..lines.len())
                    .filter(|&n| !lines[n].trim_start().starts_with('#') && lines[n].contains('='))
                    .collect();
                if !keyed.is_empty() {
                    let n = keyed[i.index(keyed.len())];
                    let key = lines[n].split('=').next().unwrap_or("").to_owned();
                    lines[n] = format!("{key}= {v}");
                }
            }
            Edit::Byte(i, b) => {
                let mut bytes = lines.join("\n").into_bytes();
                let at = i.index(bytes.len());
                bytes[at] = *b;
                let text = String::from_utf8_lossy(&bytes).into_owned();
                lines = text.lines().map(str::to_owned).collect();
            }
        }
        if lines.is_empty() {
            break;
        }
    }
    lines.join("\n")
}

#[test]
fn the_example_parses() {
    LbConfig::parse(EXAMPLE, "lb.toml").expect("lb.example.toml is valid");
}

proptest! {
    #[test]
    fn damaged_configs_never_panic_and_errors_name_the_file(edits in prop::collection::vec(edit(), 1..5)) {
        let text = apply(&edits);
        if let Err(e) = LbConfig::parse(&text, "lb.toml") {
            let msg = e.to_string();
            prop_assert!(msg.starts_with("lb.toml"), "{msg}");
        }
    }
}
