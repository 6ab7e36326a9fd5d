//! `iotgw devices import`: registers the devices listed in a CSV or JSON Lines file through
//! a running gateway's `POST /api/v1/devices/batch`, with a progress bar and a summary.
//!
//! The file is read twice: once to check every line (nothing is sent when one is bad, and
//! every problem is reported with its line and the fix), once to send it in batches. Only
//! the batches in flight (`--parallel`) are held in memory, so a file of a million devices
//! costs the importer little more than the set of ids it checks for repeats.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use iotgw_registry::DeviceId;
use serde::Deserialize;

use crate::core::RegisterRequest;

/// Problems listed before the rest are only counted.
const MAX_PROBLEMS_SHOWN: usize = 10;
/// Examples shown per failure reason.
const EXAMPLES_PER_REASON: usize = 3;
/// The CSV columns besides `tag.KEY`.
const CSV_COLUMNS: &[&str] = &[
    "msdyn_deviceid",
    "msdyn_name",
    "msdyn_category",
    "msdyn_iotproviderinstance",
];

/// The file formats, told by the file's extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `.csv`: a header row, then one device per row.
    Csv,
    /// `.jsonl` (or `.ndjson`): one registration request per line.
    JsonLines,
}

impl Format {
    /// The format of `path`, from its extension.
    pub fn of(path: &Path) -> Result<Self, Problem> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("csv") => Ok(Self::Csv),
            Some("jsonl" | "ndjson") => Ok(Self::JsonLines),
            _ => Err(Problem::file(
                "cannot tell the format from the file name",
                "name the file .csv (a header row, then one device per row) or .jsonl (one JSON request per line)",
            )),
        }
    }
}

/// Something wrong with the file: where, what, and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The line it is on (1-based), when it is about one line.
    pub line: Option<u64>,
    /// What is wrong.
    pub message: String,
    /// What to do.
    pub fix: String,
}

impl Problem {
    fn file(message: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            line: None,
            message: message.into(),
            fix: fix.into(),
        }
    }

    fn at(line: u64, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            line: Some(line),
            message: message.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.message)?,
            None => write!(f, "{}", self.message)?,
        }
        write!(f, "\n    fix: {}", self.fix)
    }
}

/// One device of the file and the line it starts on.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// 1-based line number.
    pub line: u64,
    /// The registration request.
    pub request: RegisterRequest,
}

/// What a CSV column holds.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Column {
    Id,
    Name,
    Category,
    Instance,
    Tag(String),
}

/// The entries of a file, one at a time, each checked on its own (see [`check`] for the
/// checks across entries).
pub struct Entries {
    inner: Inner,
}

enum Inner {
    Csv {
        records: csv::StringRecordsIntoIter<File>,
        columns: Vec<Column>,
    },
    JsonLines {
        lines: std::io::Lines<BufReader<File>>,
        line: u64,
    },
}

impl fmt::Debug for Entries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Entries")
    }
}

/// Opens `path` for reading its entries. A CSV header that cannot be used is a problem
/// here, on line 1.
pub fn entries(path: &Path) -> Result<Entries, Problem> {
    let format = Format::of(path)?;
    let file = File::open(path).map_err(|e| {
        Problem::file(
            format!("cannot open the file: {e}"),
            "check the path and that you may read it",
        )
    })?;
    let inner = match format {
        Format::JsonLines => Inner::JsonLines {
            lines: BufReader::new(file).lines(),
            line: 0,
        },
        Format::Csv => {
            let mut reader = csv::ReaderBuilder::new()
                .has_headers(true)
                .trim(csv::Trim::All)
                .from_reader(file);
            let headers = reader
                .headers()
                .map_err(|e| csv_problem(&e, "the header row"))?
                .clone();
            Inner::Csv {
                columns: csv_columns(&headers)?,
                records: reader.into_records(),
            }
        }
    };
    Ok(Entries { inner })
}

fn csv_columns(headers: &csv::StringRecord) -> Result<Vec<Column>, Problem> {
    let known = || format!("{}, tag.KEY", CSV_COLUMNS.join(", "));
    let mut columns = Vec::with_capacity(headers.len());
    for name in headers {
        let column = match name {
            "msdyn_deviceid" => Column::Id,
            "msdyn_name" => Column::Name,
            "msdyn_category" => Column::Category,
            "msdyn_iotproviderinstance" => Column::Instance,
            tag if tag.starts_with("tag.") && tag.len() > 4 => Column::Tag(tag[4..].to_owned()),
            other => {
                return Err(Problem::at(
                    1,
                    format!("unknown column {other:?} in the header row"),
                    format!("use only these columns: {}", known()),
                ))
            }
        };
        if columns.contains(&column) {
            return Err(Problem::at(
                1,
                format!("column {name:?} appears twice in the header row"),
                "keep one of them",
            ));
        }
        columns.push(column);
    }
    if !columns.contains(&Column::Id) {
        return Err(Problem::at(
            1,
            "the header row has no msdyn_deviceid column",
            format!(
                "start the file with a header row naming the columns, e.g. `msdyn_deviceid,msdyn_category,tag.site` (known: {})",
                known()
            ),
        ));
    }
    Ok(columns)
}

fn csv_problem(e: &csv::Error, what: &str) -> Problem {
    let line = e.position().map_or(1, csv::Position::line);
    match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => Problem::at(
            line,
            format!("{len} field(s), but the header row has {expected_len}"),
            "give every row one field per column (leave a field empty to leave it out) and quote values that hold a comma",
        ),
        csv::ErrorKind::Utf8 { .. } => Problem::at(
            line,
            format!("{what} is not UTF-8"),
            "save the file as UTF-8",
        ),
        _ => Problem::at(line, format!("cannot read {what}: {e}"), "check the file"),
    }
}

impl Iterator for Entries {
    type Item = Result<Entry, Problem>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.inner {
            Inner::Csv { records, columns } => {
                let record = match records.next()? {
                    Ok(r) => r,
                    Err(e) => return Some(Err(csv_problem(&e, "this row"))),
                };
                let line = record.position().map_or(0, csv::Position::line);
                let mut request = RegisterRequest::default();
                for (column, value) in columns.iter().zip(record.iter()) {
                    if value.is_empty() {
                        continue;
                    }
                    let value = value.to_owned();
                    match column {
                        Column::Id => request.msdyn_deviceid = value,
                        Column::Name => request.msdyn_name = Some(value),
                        Column::Category => request.msdyn_category = Some(value),
                        Column::Instance => request.msdyn_iotproviderinstance = Some(value),
                        Column::Tag(key) => {
                            request.msdyn_tags.insert(key.clone(), value);
                        }
                    }
                }
                Some(checked(line, request))
            }
            Inner::JsonLines { lines, line } => loop {
                *line += 1;
                let text = match lines.next()? {
                    Ok(t) => t,
                    Err(e) => {
                        return Some(Err(Problem::at(
                            *line,
                            format!("cannot read the line: {e}"),
                            "save the file as UTF-8 text",
                        )))
                    }
                };
                if text.trim().is_empty() {
                    continue;
                }
                return Some(match serde_json::from_str::<RegisterRequest>(&text) {
                    Ok(request) => checked(*line, request),
                    Err(e) => Err(Problem::at(
                        *line,
                        format!("not a registration request: {e}"),
                        r#"write one JSON object per line, the body of POST /api/v1/devices, e.g. {"msdyn_deviceid": "pump-001", "msdyn_category": "chiller"}"#,
                    )),
                });
            },
        }
    }
}

/// An entry whose device id is valid.
fn checked(line: u64, request: RegisterRequest) -> Result<Entry, Problem> {
    if request.msdyn_deviceid.is_empty() {
        return Err(Problem::at(
            line,
            "no msdyn_deviceid",
            "give every device an id",
        ));
    }
    if let Err(e) = DeviceId::parse(&request.msdyn_deviceid) {
        return Err(Problem::at(
            line,
            format!("msdyn_deviceid {:?} is not valid", request.msdyn_deviceid),
            e.to_string(),
        ));
    }
    Ok(Entry { line, request })
}

/// What the first reading of the file found.
#[derive(Debug, Default)]
pub struct Checked {
    /// Devices in the file.
    pub devices: u64,
    /// Every problem (empty when the file is good).
    pub problems: Vec<Problem>,
}

/// Reads the whole file and reports every problem: lines that are not a device, invalid
/// ids, and an id given twice.
pub fn check(path: &Path) -> Checked {
    let mut out = Checked::default();
    let entries = match entries(path) {
        Ok(e) => e,
        Err(p) => {
            out.problems.push(p);
            return out;
        }
    };
    let mut seen: HashMap<String, u64> = HashMap::new();
    for entry in entries {
        match entry {
            Ok(e) => {
                out.devices += 1;
                if let Some(first) = seen.get(&e.request.msdyn_deviceid) {
                    out.problems.push(Problem::at(
                        e.line,
                        format!(
                            "device {} is also on line {first}",
                            e.request.msdyn_deviceid
                        ),
                        "list each device once",
                    ));
                } else {
                    seen.insert(e.request.msdyn_deviceid, e.line);
                }
            }
            Err(p) => out.problems.push(p),
        }
    }
    if out.devices == 0 && out.problems.is_empty() {
        out.problems.push(Problem::file(
            "the file lists no device",
            "add one device per line (after the header row of a CSV file)",
        ));
    }
    out
}

/// Prints the problems of a bad file: the first [`MAX_PROBLEMS_SHOWN`], then a count.
pub fn report_problems(path: &Path, problems: &[Problem], to: &mut impl Write) {
    let _ = writeln!(
        to,
        "{}: {} problem(s); nothing was imported:",
        path.display(),
        problems.len()
    );
    for p in problems.iter().take(MAX_PROBLEMS_SHOWN) {
        let _ = writeln!(to, "  - {p}");
    }
    if problems.len() > MAX_PROBLEMS_SHOWN {
        let _ = writeln!(to, "  ... and {} more", problems.len() - MAX_PROBLEMS_SHOWN);
    }
}

/// How one import is run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The file.
    pub file: PathBuf,
    /// The gateway's API base URL (`http://127.0.0.1:8080`).
    pub url: String,
    /// Bearer token.
    pub token: Option<String>,
    /// Devices per request (1..=1000).
    pub batch_size: usize,
    /// Requests in flight at once.
    pub parallel: usize,
    /// Where credentials handed out by the providers are written (JSON lines).
    pub credentials_out: Option<PathBuf>,
    /// How long one request may take.
    pub timeout: Duration,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// One device that was not registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Its line in the file.
    pub line: u64,
    /// Its id.
    pub device_id: String,
    /// The API's error code (or `http_<status>` / `unreachable` for a whole batch).
    pub code: String,
    /// Why.
    pub error: String,
}

/// What an import did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Devices in the file.
    pub devices: u64,
    /// Devices sent (all of them unless the import stopped early).
    pub sent: u64,
    /// Requests made.
    pub batches: u64,
    /// Newly registered.
    pub registered: u64,
    /// Already registered before (code `already_registered`).
    pub already_registered: u64,
    /// Not registered, in file order per batch.
    pub failed: Vec<Failure>,
    /// Devices that received credentials.
    pub credentials: u64,
    /// Whether those credentials were written to `credentials_out`.
    pub credentials_kept: bool,
    /// Why the import stopped before the end, if it did.
    pub stopped: Option<String>,
    /// Wall time.
    pub elapsed: Duration,
}

impl Summary {
    /// 0 when every device is registered (now or before), 1 otherwise.
    pub fn success(&self) -> bool {
        self.failed.is_empty() && self.stopped.is_none() && self.sent == self.devices
    }

    /// Failures grouped by reason (the device's id in a message is written `<id>`), the
    /// largest group first, each with its first examples.
    pub fn reasons(&self) -> Vec<(String, usize, Vec<&Failure>)> {
        let mut groups: BTreeMap<String, (usize, usize, Vec<&Failure>)> = BTreeMap::new();
        for (order, f) in self.failed.iter().enumerate() {
            let reason = f.error.replace(&f.device_id, "<id>");
            let g = groups.entry(reason).or_insert((0, order, Vec::new()));
            g.0 += 1;
            if g.2.len() < EXAMPLES_PER_REASON {
                g.2.push(f);
            }
        }
        let mut out: Vec<_> = groups
            .into_iter()
            .map(|(reason, (n, first, examples))| (reason, n, first, examples))
            .collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
        out.into_iter().map(|(r, n, _, e)| (r, n, e)).collect()
    }

    /// The summary as printed at the end.
    pub fn render(&self, file: &Path, batch_size: usize) -> String {
        let mut s = String::new();
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.sent as f64 / secs
        } else {
            0.0
        };
        s.push_str(&format!(
            "{}: {} device(s) sent in {} batch(es) of up to {batch_size}, {secs:.1} s ({rate:.0} devices/s)\n",
            file.display(),
            self.sent,
            self.batches
        ));
        s.push_str(&format!("  registered          {:>9}\n", self.registered));
        s.push_str(&format!(
            "  already registered  {:>9}\n",
            self.already_registered
        ));
        s.push_str(&format!("  failed              {:>9}\n", self.failed.len()));
        if self.sent < self.devices {
            s.push_str(&format!(
                "  not sent            {:>9}\n",
                self.devices - self.sent
            ));
        }
        if !self.failed.is_empty() {
            s.push_str("failures by reason (first examples of each):\n");
            for (reason, n, examples) in self.reasons() {
                s.push_str(&format!("  {n} × {reason}\n"));
                for f in examples {
                    s.push_str(&format!("      line {}: {}\n", f.line, f.device_id));
                }
            }
        }
        if self.credentials > 0 && !self.credentials_kept {
            s.push_str(&format!(
                "{} device(s) received credentials that were not kept: pass --credentials-out FILE to keep them (to get new ones, unregister those devices and import them again)\n",
                self.credentials
            ));
        }
        if let Some(why) = &self.stopped {
            s.push_str(&format!("stopped early: {why}\n"));
        }
        if !self.success() {
            s.push_str("importing the same file again is safe: registered devices are reported as already registered\n");
        }
        s
    }
}

#[derive(serde::Serialize)]
struct BatchBody<'a> {
    devices: Vec<&'a RegisterRequest>,
}

#[derive(Deserialize)]
struct BatchAnswer {
    failed: Vec<AnswerFailure>,
    devices: Vec<AnswerDevice>,
}

#[derive(Deserialize)]
struct AnswerFailure {
    index: usize,
    code: String,
    error: String,
}

#[derive(Deserialize)]
struct AnswerDevice {
    index: usize,
    #[serde(default)]
    credentials: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    message: String,
}

/// How one batch went.
enum Sent {
    Answered(BatchAnswer),
    /// The whole batch failed; the rest would too (unreachable, refused token).
    Fatal(String),
    /// The whole batch failed with this code and reason; the next may not.
    Refused(String, String),
}

async fn send(client: &reqwest::Client, url: &str, token: Option<&str>, batch: &[Entry]) -> Sent {
    let body = BatchBody {
        devices: batch.iter().map(|e| &e.request).collect(),
    };
    let mut req = client.post(url).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) if e.is_timeout() => {
            return Sent::Refused(
                "timeout".into(),
                "the gateway did not answer in time (raise --timeout-secs, or lower --batch-size)"
                    .into(),
            )
        }
        Err(e) => {
            let cause = crate::errors::error_chain(&e);
            return Sent::Fatal(format!(
                "cannot reach {url} ({cause}): is the gateway running, and is --url (or api.listen of --config) right?"
            ));
        }
    };
    let status = resp.status();
    let text = match resp.text().await {
        Ok(t) => t,
        Err(e) => return Sent::Refused("unreadable".into(), format!("reading the answer: {e}")),
    };
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return Sent::Fatal(format!(
            "the gateway refused the token ({status}): pass --token or set IOTGW_API_TOKEN to its api.token"
        ));
    }
    if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::METHOD_NOT_ALLOWED
    {
        return Sent::Fatal(format!(
            "{url} answered {status}: this gateway has no batch route; upgrade it, or check --url"
        ));
    }
    if !status.is_success() {
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|b| b.error.message)
            .unwrap_or_else(|_| text.chars().take(300).collect());
        return Sent::Refused(format!("http_{}", status.as_u16()), message);
    }
    match serde_json::from_str::<BatchAnswer>(&text) {
        Ok(a) => Sent::Answered(a),
        Err(e) => Sent::Refused(
            "unreadable".into(),
            format!("the answer is not a batch result ({e}): is --url a gateway?"),
        ),
    }
}

/// Batches of `size` entries (the file was checked: entries that fail now are skipped).
fn batches(path: &Path, size: usize) -> Result<impl Iterator<Item = Vec<Entry>>, Problem> {
    let mut entries = entries(path)?.filter_map(Result::ok).peekable();
    Ok(std::iter::from_fn(move || {
        entries.peek()?;
        Some(entries.by_ref().take(size).collect())
    }))
}

/// Sends the checked file in batches and tallies the answers.
pub async fn import(opts: &Options, devices: u64) -> Result<Summary, Problem> {
    let started = Instant::now();
    let url = format!("{}/api/v1/devices/batch", opts.url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(opts.timeout)
        .no_proxy()
        .build()
        .map_err(|e| Problem::file(format!("cannot build an HTTP client: {e}"), "report this"))?;
    let mut credentials_out = match &opts.credentials_out {
        None => None,
        Some(p) => Some(std::io::BufWriter::new(create_private(p).map_err(|e| {
            Problem::file(
                format!("cannot create --credentials-out {}: {e}", p.display()),
                "give a path in a directory you may write to",
            )
        })?)),
    };
    let bar = if opts.progress {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(devices),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{wide_bar} {pos}/{len} devices, {per_sec}, eta {eta} {msg}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };

    let mut summary = Summary {
        devices,
        credentials_kept: credentials_out.is_some(),
        ..Summary::default()
    };
    let token = opts.token.as_deref();
    let mut answers = stream::iter(batches(&opts.file, opts.batch_size)?)
        .map(|batch| {
            let (client, url) = (&client, &url);
            async move {
                let sent = send(client, url, token, &batch).await;
                (batch, sent)
            }
        })
        .buffered(opts.parallel.max(1));
    while let Some((batch, sent)) = answers.next().await {
        let answer = match sent {
            Sent::Answered(a) => a,
            Sent::Fatal(why) => {
                summary.stopped = Some(why);
                break;
            }
            Sent::Refused(code, error) => {
                summary.batches += 1;
                summary.sent += batch.len() as u64;
                summary.failed.extend(batch.into_iter().map(|e| Failure {
                    line: e.line,
                    device_id: e.request.msdyn_deviceid,
                    code: code.clone(),
                    error: error.clone(),
                }));
                bar.set_position(summary.sent);
                bar.set_message(format!("{} failed", summary.failed.len()));
                continue;
            }
        };
        summary.batches += 1;
        summary.sent += batch.len() as u64;
        summary.registered += answer.devices.len() as u64;
        for f in answer.failed {
            let Some(entry) = batch.get(f.index) else {
                continue;
            };
            if f.code == "already_registered" {
                summary.already_registered += 1;
            } else {
                summary.failed.push(Failure {
                    line: entry.line,
                    device_id: entry.request.msdyn_deviceid.clone(),
                    code: f.code,
                    error: f.error,
                });
            }
        }
        for d in answer.devices {
            let (Some(credentials), Some(entry)) = (d.credentials, batch.get(d.index)) else {
                continue;
            };
            summary.credentials += 1;
            if let Some(out) = credentials_out.as_mut() {
                let line = serde_json::json!({
                    "msdyn_deviceid": entry.request.msdyn_deviceid,
                    "credentials": credentials,
                });
                if let Err(e) = writeln!(out, "{line}") {
                    summary.stopped = Some(format!(
                        "writing credentials to --credentials-out failed ({e}); the devices of this batch are registered"
                    ));
                    break;
                }
            }
        }
        if summary.stopped.is_some() {
            break;
        }
        bar.set_position(summary.sent);
        if !summary.failed.is_empty() {
            bar.set_message(format!("{} failed", summary.failed.len()));
        }
    }
    drop(answers);
    bar.finish_and_clear();
    if let Some(mut out) = credentials_out {
        if let Err(e) = out.flush() {
            summary.stopped = Some(format!(
                "writing credentials to --credentials-out failed ({e})"
            ));
        }
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Creates (truncating) a file only its owner may read: it will hold device secrets.
fn create_private(path: &Path) -> std::io::Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    fn all(path: &Path) -> Vec<Result<Entry, Problem>> {
        entries(path).expect("opens").collect()
    }

    #[test]
    fn csv_rows_become_requests_with_tags_and_empty_cells_left_out() {
        let (_d, path) = file(
            "fleet.csv",
            "msdyn_deviceid,msdyn_name,msdyn_category,msdyn_iotproviderinstance,tag.site,tag.floor\n\
             pump-001,Pump 1,chiller,plant,north,2\n\
             pump-002, ,,,\"south, east\",\n",
        );
        let got = all(&path);
        assert_eq!(
            got[0].as_ref().expect("row 1"),
            &Entry {
                line: 2,
                request: RegisterRequest {
                    msdyn_deviceid: "pump-001".into(),
                    msdyn_name: Some("Pump 1".into()),
                    msdyn_category: Some("chiller".into()),
                    msdyn_iotproviderinstance: Some("plant".into()),
                    msdyn_tags: BTreeMap::from([
                        ("site".into(), "north".into()),
                        ("floor".into(), "2".into())
                    ]),
                    ..Default::default()
                }
            }
        );
        assert_eq!(
            got[1].as_ref().expect("row 2"),
            &Entry {
                line: 3,
                request: RegisterRequest {
                    msdyn_deviceid: "pump-002".into(),
                    msdyn_tags: BTreeMap::from([("site".into(), "south, east".into())]),
                    ..Default::default()
                }
            }
        );
    }

    #[test]
    fn a_csv_header_without_the_id_or_with_an_unknown_column_is_refused_on_line_1() {
        let (_d, path) = file("a.csv", "msdyn_name,tag.site\nx,y\n");
        let p = entries(&path).expect_err("no id column");
        assert_eq!(p.line, Some(1));
        assert!(p.message.contains("msdyn_deviceid"), "{p}");
        let (_d, path) = file("b.csv", "msdyn_deviceid,colour\nx,red\n");
        let p = entries(&path).expect_err("unknown column");
        assert_eq!(p.line, Some(1));
        assert!(
            p.message.contains("colour") && p.fix.contains("tag.KEY"),
            "{p}"
        );
    }

    #[test]
    fn jsonl_lines_are_requests_and_a_bad_line_is_named_with_its_number() {
        let (_d, path) = file(
            "fleet.jsonl",
            "{\"msdyn_deviceid\": \"a-1\", \"msdyn_tags\": {\"site\": \"x\"}}\n\n\
             {\"msdyn_deviceid\": \"a-2\", \"msdyn_colour\": \"red\"}\n\
             not json\n\
             {\"msdyn_deviceid\": \"bad id\"}\n",
        );
        let got = all(&path);
        assert_eq!(got.len(), 4, "the blank line is skipped");
        assert_eq!(
            got[0].as_ref().expect("line 1").request.msdyn_tags["site"],
            "x"
        );
        let lines: Vec<_> = got[1..]
            .iter()
            .map(|r| r.as_ref().expect_err("bad").line)
            .collect();
        assert_eq!(lines, vec![Some(3), Some(4), Some(5)]);
        let unknown = got[1].as_ref().expect_err("unknown field");
        assert!(unknown.message.contains("msdyn_colour"), "{unknown}");
        let bad_id = got[3].as_ref().expect_err("bad id");
        assert!(bad_id.fix.contains("A-Z a-z 0-9"), "{bad_id}");
    }

    #[test]
    fn check_counts_devices_and_reports_every_problem_including_repeated_ids() {
        let (_d, path) = file(
            "fleet.csv",
            "msdyn_deviceid,msdyn_category\na-1,x\na-2,\na-1,y\nbad id,z\n",
        );
        let c = check(&path);
        assert_eq!(c.devices, 3);
        let lines: Vec<_> = c.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![Some(4), Some(5)], "{:?}", c.problems);
        assert!(c.problems[0].message.contains("also on line 2"));
        let (_d, path) = file("empty.jsonl", "\n");
        assert!(check(&path).problems[0].message.contains("no device"));
        let (_d, path) = file("fleet.txt", "a-1\n");
        assert!(check(&path).problems[0].fix.contains(".csv"));
    }

    #[test]
    fn batches_hold_at_most_the_batch_size_in_file_order() {
        let text: String = (0..7)
            .map(|n| format!("{{\"msdyn_deviceid\": \"d-{n}\"}}\n"))
            .collect();
        let (_d, path) = file("f.jsonl", &text);
        let sizes: Vec<_> = batches(&path, 3).expect("opens").map(|b| b.len()).collect();
        assert_eq!(sizes, vec![3, 3, 1]);
    }

    #[test]
    fn failures_are_grouped_by_reason_with_the_id_masked_and_few_examples() {
        let failure = |line, id: &str, error: &str| Failure {
            line,
            device_id: id.into(),
            code: "conflict".into(),
            error: error.into(),
        };
        let summary = Summary {
            devices: 6,
            sent: 6,
            batches: 1,
            registered: 1,
            failed: vec![
                failure(2, "a-1", "no route"),
                failure(3, "a-2", "device a-2 is already In Progress"),
                failure(4, "a-3", "device a-3 is already In Progress"),
                failure(5, "a-4", "device a-4 is already In Progress"),
                failure(6, "a-5", "device a-5 is already In Progress"),
            ],
            ..Summary::default()
        };
        let reasons = summary.reasons();
        assert_eq!(reasons.len(), 2);
        assert_eq!(reasons[0].0, "device <id> is already In Progress");
        assert_eq!(reasons[0].1, 4);
        assert_eq!(reasons[0].2.len(), EXAMPLES_PER_REASON);
        assert_eq!(reasons[1].0, "no route");
        assert!(!summary.success());
        let text = summary.render(Path::new("f.csv"), 500);
        assert!(
            text.contains("4 × device <id> is already In Progress"),
            "{text}"
        );
        assert!(text.contains("line 3: a-2"), "{text}");
    }
}
