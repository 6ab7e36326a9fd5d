//! `iotgw dead-letters replay`: replays the dead letters a filter selects through a running
//! gateway's `POST /api/v1/dead-letters/{id}/replay`, one at a time, with a progress bar
//! (rate and ETA) and a summary: committed, queued again for their sink, dead-lettered
//! again by reason, failed.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// Which dead letters, and where the gateway is.
#[derive(Debug, Clone)]
pub struct Options {
    /// API base URL.
    pub url: String,
    /// Bearer token.
    pub token: Option<String>,
    /// Exactly this source (`telemetry:edge`, `sink:crm`).
    pub source: Option<String>,
    /// The reason contains this text.
    pub reason_contains: Option<String>,
    /// Exactly this device.
    pub device_id: Option<String>,
    /// At most this many.
    pub limit: usize,
    /// Per request.
    pub timeout: Duration,
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
}

#[derive(Debug, Deserialize)]
struct Letter {
    id: i64,
    source: String,
    reason: String,
    device_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LetterPage {
    items: Vec<Letter>,
    next: Option<String>,
}

impl Options {
    fn takes(&self, l: &Letter) -> bool {
        self.source.as_ref().is_none_or(|s| &l.source == s)
            && self
                .reason_contains
                .as_ref()
                .is_none_or(|r| l.reason.contains(r.as_str()))
            && self
                .device_id
                .as_ref()
                .is_none_or(|d| l.device_id.as_ref() == Some(d))
    }
}

/// What a replay run did.
#[derive(Debug, Default, PartialEq)]
pub struct Summary {
    /// Dead letters selected.
    pub selected: u64,
    /// Readings committed.
    pub committed: u64,
    /// Sink items queued again.
    pub requeued: u64,
    /// Dead-lettered again, by today's reason, with the count.
    pub again: BTreeMap<String, u64>,
    /// Requests that failed, by error, with the count.
    pub failed: BTreeMap<String, u64>,
    /// Why the run stopped before replaying anything, if it did.
    pub stopped: Option<String>,
}

impl Summary {
    /// Whether every selected dead letter was committed or queued again.
    pub fn success(&self) -> bool {
        self.stopped.is_none() && self.again.is_empty() && self.failed.is_empty()
    }

    /// The summary as printed.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(why) = &self.stopped {
            out.push_str(&format!("replay stopped: {why}\n"));
            return out;
        }
        out.push_str(&format!(
            "{} dead letter(s) selected: {} committed, {} queued again for their sink, {} dead-lettered again, {} failed\n",
            self.selected,
            self.committed,
            self.requeued,
            self.again.values().sum::<u64>(),
            self.failed.values().sum::<u64>()
        ));
        for (reason, n) in &self.again {
            out.push_str(&format!("  dead-lettered again ({n}): {reason}\n"));
        }
        for (error, n) in &self.failed {
            out.push_str(&format!("  failed ({n}): {error}\n"));
        }
        out
    }
}

/// Selects and replays; never panics on the gateway's answers.
pub async fn run(opts: &Options) -> Summary {
    let mut summary = Summary::default();
    let client = match reqwest::Client::builder().timeout(opts.timeout).build() {
        Ok(c) => c,
        Err(e) => {
            summary.stopped = Some(format!("no HTTP client: {e}"));
            return summary;
        }
    };
    let auth = |r: reqwest::RequestBuilder| match &opts.token {
        Some(t) => r.bearer_auth(t),
        None => r,
    };
    // Select first (ids only), so the bar knows the total and a replayed letter that is
    // dead-lettered again (under a new id) is not taken twice.
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut req = client.get(format!("{}/api/v1/dead-letters", opts.url));
        req = req.query(&[("limit", "100")]);
        if let Some(a) = &after {
            req = req.query(&[("after", a.as_str())]);
        }
        let page: LetterPage = match auth(req).send().await {
            Ok(r) if r.status().is_success() => match r.json().await {
                Ok(p) => p,
                Err(e) => {
                    summary.stopped = Some(format!("GET /api/v1/dead-letters: not a page: {e}"));
                    return summary;
                }
            },
            Ok(r) => {
                summary.stopped = Some(format!(
                    "GET /api/v1/dead-letters answered {}{}",
                    r.status(),
                    if r.status() == reqwest::StatusCode::UNAUTHORIZED {
                        ": pass --token (or api.token in --config)"
                    } else {
                        ""
                    }
                ));
                return summary;
            }
            Err(e) => {
                summary.stopped = Some(format!(
                    "cannot reach the gateway at {} ({e}): check that `iotgw run` is running there",
                    opts.url
                ));
                return summary;
            }
        };
        ids.extend(
            page.items
                .iter()
                .filter(|l| opts.takes(l))
                .map(|l| l.id)
                .take(opts.limit - ids.len().min(opts.limit)),
        );
        match page.next {
            Some(n) if ids.len() < opts.limit => after = Some(n),
            _ => break,
        }
    }
    summary.selected = ids.len() as u64;
    let bar = if opts.progress {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(summary.selected),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{wide_bar} {pos}/{len} dead letters, {per_sec}, eta {eta}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    for id in ids {
        let req = client.post(format!("{}/api/v1/dead-letters/{id}/replay", opts.url));
        match auth(req).send().await {
            Ok(r) if r.status().is_success() => match r.json::<serde_json::Value>().await {
                Ok(v) => match v["outcome"].as_str() {
                    Some("committed") => summary.committed += 1,
                    Some("requeued") => summary.requeued += 1,
                    Some("dead_lettered_again") => {
                        let reason = v["reason"].as_str().unwrap_or("no reason given");
                        *summary.again.entry(reason.to_owned()).or_default() += 1;
                    }
                    other => {
                        *summary
                            .failed
                            .entry(format!("unknown outcome {other:?}"))
                            .or_default() += 1;
                    }
                },
                Err(e) => *summary.failed.entry(format!("not JSON: {e}")).or_default() += 1,
            },
            Ok(r) => {
                let status = r.status();
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                let message = body["error"]["message"].as_str().unwrap_or("");
                *summary
                    .failed
                    .entry(format!("HTTP {status}: {message}"))
                    .or_default() += 1;
            }
            Err(e) => *summary.failed.entry(e.to_string()).or_default() += 1,
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_counts_each_outcome_and_groups_the_rest_by_reason() {
        let mut s = Summary {
            selected: 4,
            committed: 2,
            requeued: 1,
            ..Summary::default()
        };
        assert!(s.success());
        s.again
            .insert("device ghost is not in the registry".into(), 1);
        assert!(!s.success());
        let text = s.render();
        assert!(
            text.starts_with("4 dead letter(s) selected: 2 committed, 1 queued again for their sink, 1 dead-lettered again, 0 failed"),
            "{text}"
        );
        assert!(text.contains("dead-lettered again (1): device ghost is not in the registry"));
    }

    #[test]
    fn a_letter_is_taken_when_every_given_filter_holds() {
        let opts = Options {
            url: String::new(),
            token: None,
            source: Some("telemetry:local".into()),
            reason_contains: Some("registry".into()),
            device_id: None,
            limit: 10,
            timeout: Duration::from_secs(1),
            progress: false,
        };
        let letter = |source: &str, reason: &str| Letter {
            id: 1,
            source: source.into(),
            reason: reason.into(),
            device_id: Some("d".into()),
        };
        assert!(opts.takes(&letter("telemetry:local", "not in the registry")));
        assert!(!opts.takes(&letter("sink:crm", "not in the registry")));
        assert!(!opts.takes(&letter("telemetry:local", "payload is not JSON")));
    }
}
