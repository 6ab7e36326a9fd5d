//! The `$batch` request body and the parser of its multipart answer.
//!
//! Microsoft's "Execute batch operations using the Web API" (Dataverse): "The `POST`
//! request containing the batch must have a Content-Type header with a value set to
//! `multipart/mixed` with a `boundary` set to include the identifier of the batch";
//! "change sets must have a `Content-Type` header with value set to `multipart/mixed` with
//! a `boundary` set to include the identifier of the change set"; "Each item within the
//! change set must be preceded by the change set identifier with a `Content-Type` and
//! `Content-Transfer-Encoding` header"; "Change sets can also include a `Content-ID` header
//! with a unique value"; "When multiple operations are contained in a change set, all the
//! operations are considered atomic. This means that if any one of the operations fails,
//! any completed operations will be rolled back." Lines end in CRLF (RFC 2046 multipart,
//! which the OData batch format builds on); the documentation's examples show bare line
//! breaks.

use super::records::Write;

/// One part of the body: the request `PATCH <url>` of a write with its JSON body.
#[derive(Debug)]
pub struct Part<'a> {
    /// The absolute URL of the record.
    pub url: String,
    /// The write.
    pub write: &'a Write,
    /// Its serialized body.
    pub body: Vec<u8>,
}

/// The body of a `$batch` holding one change set of `parts`, `Content-ID` 1, 2, ... in
/// order.
pub fn request_body(batch: &str, changeset: &str, parts: &[Part<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    let line = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(s.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    line(&mut out, &format!("--{batch}"));
    line(
        &mut out,
        &format!("Content-Type: multipart/mixed; boundary={changeset}"),
    );
    line(&mut out, "");
    for (i, part) in parts.iter().enumerate() {
        line(&mut out, &format!("--{changeset}"));
        line(&mut out, "Content-Type: application/http");
        line(&mut out, "Content-Transfer-Encoding: binary");
        line(&mut out, &format!("Content-ID: {}", i + 1));
        line(&mut out, "");
        line(&mut out, &format!("PATCH {} HTTP/1.1", part.url));
        line(&mut out, "Content-Type: application/json; type=entry");
        if let Some((name, value)) = part.write.condition.header() {
            line(&mut out, &format!("{name}: {value}"));
        }
        line(&mut out, "");
        out.extend_from_slice(&part.body);
        line(&mut out, "");
    }
    line(&mut out, &format!("--{changeset}--"));
    line(&mut out, &format!("--{batch}--"));
    out
}

/// One response found in a batch answer (inside a change set response or directly in the
/// batch response).
#[derive(Clone, Debug, PartialEq)]
pub struct PartResponse {
    /// The `Content-ID` of the part (the MIME headers', else the HTTP message's).
    pub content_id: Option<String>,
    /// The status of its `HTTP/1.1 NNN Reason` line.
    pub status: u16,
    /// The HTTP message's headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The HTTP message's body.
    pub body: String,
}

impl PartResponse {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The `boundary` parameter of a `multipart/*` Content-Type (quotes removed).
pub fn boundary(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    let kind = params.next()?.trim();
    if !kind.to_ascii_lowercase().starts_with("multipart/") {
        return None;
    }
    params.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_owned())
            .filter(|b| !b.is_empty())
    })
}

/// Splits a header block (lines up to the first blank line) from what follows it.
fn split_head(text: &str) -> (Vec<(String, String)>, &str) {
    let mut headers = Vec::new();
    let mut rest = text;
    loop {
        let (line, after) = match rest.find('\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let line = line.strip_suffix('\r').unwrap_or(line);
        rest = after;
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        if rest.is_empty() {
            break;
        }
    }
    (headers, rest)
}

/// The parts between `--boundary` delimiters (preamble and epilogue dropped).
fn parts<'a>(body: &'a str, boundary: &str) -> Vec<&'a str> {
    let delimiter = format!("--{boundary}");
    let mut out = Vec::new();
    let mut pieces = body.split(delimiter.as_str());
    pieces.next(); // the preamble
    for piece in pieces {
        if piece.starts_with("--") {
            break; // the close delimiter
        }
        // The delimiter's own line break, and the CRLF before the next delimiter, belong
        // to the delimiters.
        let piece = piece
            .strip_prefix("\r\n")
            .or_else(|| piece.strip_prefix('\n'))
            .unwrap_or(piece);
        let piece = piece
            .strip_suffix("\r\n")
            .or_else(|| piece.strip_suffix('\n'))
            .unwrap_or(piece);
        out.push(piece);
    }
    out
}

/// Every HTTP response in a multipart batch answer, change set responses flattened, in
/// order. `None` when `content_type` names no multipart boundary.
pub fn parse_response(content_type: &str, body: &str) -> Option<Vec<PartResponse>> {
    let boundary = boundary(content_type)?;
    let mut out = Vec::new();
    collect(body, &boundary, &mut out, 0);
    Some(out)
}

fn collect(body: &str, boundary: &str, out: &mut Vec<PartResponse>, depth: u8) {
    for part in parts(body, boundary) {
        let (mime, message) = split_head(part);
        let mime_header = |name: &str| {
            mime.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if let Some(inner) = mime_header("content-type").and_then(self::boundary) {
            if depth < 2 {
                collect(message, &inner, out, depth + 1);
            }
            continue;
        }
        let (status_line, rest) = match message.find('\n') {
            Some(i) => (&message[..i], &message[i + 1..]),
            None => (message, ""),
        };
        let status = status_line
            .trim()
            .strip_prefix("HTTP/")
            .and_then(|s| s.split_whitespace().nth(1))
            .and_then(|c| c.parse::<u16>().ok());
        let Some(status) = status else { continue };
        let (headers, body) = split_head(rest);
        let content_id = mime_header("content-id").map(str::to_owned).or_else(|| {
            headers
                .iter()
                .find(|(k, _)| k == "content-id")
                .map(|(_, v)| v.clone())
        });
        out.push(PartResponse {
            content_id,
            status,
            headers,
            body: body.trim_end_matches(['\r', '\n']).to_owned(),
        });
    }
}
