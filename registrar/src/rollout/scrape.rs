//! Reading the balancers' `/metrics`: a small parser of the Prometheus text exposition
//! format (only what a rollout gate needs: sample lines with labels), and a plain HTTP/1.1
//! GET to fetch it.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

/// Why a metrics page could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("{url}: line {line}: {reason}")]
    Parse {
        url: String,
        line: usize,
        reason: String,
    },
    #[error("{0}: only http://host:port/path URLs are supported")]
    Url(String),
    #[error("{url}: {reason}")]
    Fetch { url: String, reason: String },
}

/// Parses the text format. Comments and blank lines are skipped; a malformed sample line
/// is an error naming its line (a half-read page must not look like "no traffic").
pub fn parse(text: &str) -> Result<Vec<Sample>, (usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_line(line).map_err(|e| (i + 1, e))?);
    }
    Ok(out)
}

fn parse_line(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = parse_labels(r, &mut labels)?;
    }
    let mut fields = rest.split_whitespace();
    let raw = fields.next().ok_or("no value")?;
    let value = match raw {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `a="x",b="y"}` and returns what follows the closing brace.
fn parse_labels<'a>(mut s: &'a str, out: &mut BTreeMap<String, String>) -> Result<&'a str, String> {
    loop {
        s = s.trim_start();
        if let Some(r) = s.strip_prefix('}') {
            return Ok(r);
        }
        let eq = s.find('=').ok_or("label without '='")?;
        let key = s[..eq].trim().to_owned();
        s = s[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".into()),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value".into()),
            }
        };
        out.insert(key, value);
        s = s[end + 1..].trim_start();
        s = s.strip_prefix(',').unwrap_or(s);
    }
}

/// `GET url` over plain HTTP/1.1; the body as text when the answer is 200.
pub async fn fetch(url: &str, timeout: Duration) -> Result<String, ScrapeError> {
    let bad_url = || ScrapeError::Url(url.to_owned());
    let rest = url.strip_prefix("http://").ok_or_else(bad_url)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    if authority.is_empty() {
        return Err(bad_url());
    }
    let fail = |reason: String| ScrapeError::Fetch {
        url: url.to_owned(),
        reason,
    };
    let work = async {
        let stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fail(e.to_string()))?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, authority)
            .body(Empty::<Bytes>::new())
            .map_err(|e| fail(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if resp.status() != http::StatusCode::OK {
            return Err(fail(format!("status {}", resp.status())));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| fail("body is not UTF-8".into()))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| fail(format!("no answer within {timeout:?}")))?
}

/// Fetches and parses one page.
pub async fn scrape(url: &str, timeout: Duration) -> Result<Vec<Sample>, ScrapeError> {
    let text = fetch(url, timeout).await?;
    parse(&text).map_err(|(line, reason)| ScrapeError::Parse {
        url: url.to_owned(),
        line,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counters_histograms_and_escapes() {
        let text = r#"
# HELP balancer_requests_total Client requests.
# TYPE balancer_requests_total counter
balancer_requests_total{code="2xx",listener="web",service="web",version="v1"} 1027
balancer_request_duration_seconds_bucket{listener="web",service="web",version="v2",le="0.005"} 3
balancer_request_duration_seconds_bucket{listener="web",service="web",version="v2",le="+Inf"} 4
odd{a="x\"y\\z",b="line\nbreak",} 1.5e3 1700000000000
plain 7
"#;
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].name, "balancer_requests_total");
        assert_eq!(s[0].label("version"), Some("v1"));
        assert_eq!(s[0].value, 1027.0);
        assert_eq!(s[2].label("le"), Some("+Inf"));
        assert_eq!(s[3].label("a"), Some("x\"y\\z"));
        assert_eq!(s[3].label("b"), Some("line\nbreak"));
        assert_eq!(s[3].value, 1500.0);
        assert!(s[4].labels.is_empty());
    }

    #[test]
    fn rejects_malformed_lines_with_their_number() {
        for bad in [
            "x{a=\"1\"",
            "x{a=1} 2",
            "x 1\nx{a=\"1\"} nope",
            "{a=\"1\"} 1",
            "x",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse("ok 1\nbad{").unwrap_err().0, 2);
    }

    #[tokio::test]
    async fn fetch_rejects_non_http_urls() {
        for u in ["https://x/metrics", "127.0.0.1:1/metrics", "http:///m"] {
            assert!(matches!(
                fetch(u, Duration::from_secs(1)).await,
                Err(ScrapeError::Url(_))
            ));
        }
    }
}
