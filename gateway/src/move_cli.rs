//! `iotgw devices move`: moves one device, or every device a filter selects, to another
//! provider instance through a running gateway's `POST /api/v1/devices/{id}/move`, with a
//! progress bar for a bulk move and a summary (moved, already there, failed by reason).

use std::collections::BTreeMap;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use serde::Deserialize;

/// What to move.
#[derive(Debug, Clone)]
pub enum Selection {
    /// One device.
    One(String),
    /// Every device matching all the given filters.
    Filter {
        /// Only devices now on this instance.
        from: Option<String>,
        /// Only this category.
        category: Option<String>,
        /// Only devices with this tag (`key` or `key=value`).
        tag: Option<String>,
    },
}

/// Where the gateway is and how to move.
#[derive(Debug, Clone)]
pub struct Options {
    /// API base URL.
    pub url: String,
    /// Bearer token.
    pub token: Option<String>,
    /// The target instance.
    pub to: String,
    /// Moves in flight at once.
    pub parallel: usize,
    /// Per request.
    pub timeout: Duration,
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
}

/// What a move run did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Devices selected.
    pub selected: u64,
    /// Moved.
    pub moved: u64,
    /// Already on the target (skipped).
    pub already_there: u64,
    /// Moved, but the old instance still has to unregister them (retried by the gateway).
    pub source_pending: Vec<String>,
    /// Commands that ended in Error because their device moved.
    pub commands_ended: u64,
    /// Failures by reason, with up to three device ids each and the count.
    pub failed: BTreeMap<String, (u64, Vec<String>)>,
    /// Why the run stopped early, if it did.
    pub stopped: Option<String>,
}

impl Summary {
    /// Every selected device is on the target now.
    pub fn success(&self) -> bool {
        self.failed.is_empty() && self.stopped.is_none()
    }

    /// The summary as printed on stdout.
    pub fn render(&self, to: &str) -> String {
        let mut out = format!(
            "{} device(s) selected: {} moved to {to}, {} already there, {} failed\n",
            self.selected,
            self.moved,
            self.already_there,
            self.failed.values().map(|(n, _)| n).sum::<u64>()
        );
        if self.commands_ended > 0 {
            out.push_str(&format!(
                "{} command(s) In Progress ended in Error (they are not re-sent; send them again if needed)\n",
                self.commands_ended
            ));
        }
        if !self.source_pending.is_empty() {
            out.push_str(&format!(
                "{} device(s) are still registered on their old instance; the gateway keeps trying to remove them (its log names each): {}\n",
                self.source_pending.len(),
                self.source_pending.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        for (reason, (n, examples)) in &self.failed {
            out.push_str(&format!(
                "failed ({n}): {reason} — e.g. {}\n",
                examples.join(", ")
            ));
        }
        if let Some(why) = &self.stopped {
            out.push_str(&format!("stopped early: {why}\n"));
        }
        out
    }

    fn fail(&mut self, id: String, reason: String) {
        let entry = self.failed.entry(reason).or_default();
        entry.0 += 1;
        if entry.1.len() < 3 {
            entry.1.push(id);
        }
    }
}

#[derive(Deserialize)]
struct Listed {
    msdyn_deviceid: String,
    msdyn_iotproviderinstance: String,
    #[serde(default)]
    msdyn_tags: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct DevicePage {
    items: Vec<Listed>,
    next: Option<String>,
}

#[derive(Deserialize)]
struct MovedAnswer {
    commands_ended: u64,
    source_unregistered: bool,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    message: String,
}

fn with_token(req: reqwest::RequestBuilder, token: Option<&str>) -> reqwest::RequestBuilder {
    match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    }
}

fn tag_matches(tags: &BTreeMap<String, String>, tag: &str) -> bool {
    match tag.split_once('=') {
        Some((k, v)) => tags.get(k).is_some_and(|have| have == v),
        None => tags.contains_key(tag),
    }
}

/// The ids a filter selects (every page), leaving out those already on `to`.
async fn select(
    client: &reqwest::Client,
    opts: &Options,
    from: Option<&str>,
    category: Option<&str>,
    tag: Option<&str>,
    summary: &mut Summary,
) -> Result<Vec<String>, String> {
    let base = format!("{}/api/v1/devices", opts.url.trim_end_matches('/'));
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut query: Vec<(&str, String)> = vec![("limit", "1000".into())];
        if let Some(f) = from {
            query.push(("provider_instance", f.into()));
        }
        if let Some(c) = category {
            query.push(("category", c.into()));
        }
        if let Some(a) = &after {
            query.push(("after", a.clone()));
        }
        let answer = with_token(client.get(&base).query(&query), opts.token.as_deref())
            .send()
            .await
            .map_err(|e| {
                format!(
                    "listing devices at {base} failed: {e} (is the gateway running? check --url)"
                )
            })?;
        let status = answer.status();
        let text = answer.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("listing devices: HTTP {status}: {text}"));
        }
        let page: DevicePage = serde_json::from_str(&text)
            .map_err(|e| format!("the device list is not readable ({e}): is --url a gateway?"))?;
        for d in page.items {
            if tag.is_some_and(|t| !tag_matches(&d.msdyn_tags, t)) {
                continue;
            }
            summary.selected += 1;
            if d.msdyn_iotproviderinstance == opts.to {
                summary.already_there += 1;
            } else {
                ids.push(d.msdyn_deviceid);
            }
        }
        match page.next {
            Some(n) => after = Some(n),
            None => return Ok(ids),
        }
    }
}

/// Moves what `selection` names and tallies the answers.
pub async fn run(opts: &Options, selection: &Selection) -> Summary {
    let mut summary = Summary::default();
    let client = match reqwest::Client::builder()
        .timeout(opts.timeout)
        .no_proxy()
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            summary.stopped = Some(format!("cannot build an HTTP client: {e}"));
            return summary;
        }
    };
    let ids = match selection {
        Selection::One(id) => {
            summary.selected = 1;
            vec![id.clone()]
        }
        Selection::Filter {
            from,
            category,
            tag,
        } => match select(
            &client,
            opts,
            from.as_deref(),
            category.as_deref(),
            tag.as_deref(),
            &mut summary,
        )
        .await
        {
            Ok(ids) => ids,
            Err(why) => {
                summary.stopped = Some(why);
                return summary;
            }
        },
    };
    let bar = if opts.progress && matches!(selection, Selection::Filter { .. }) {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(ids.len() as u64),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{wide_bar} {pos}/{len} devices moved, {per_sec}, eta {eta} {msg}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let base = opts.url.trim_end_matches('/').to_owned();
    let mut answers = stream::iter(ids)
        .map(|id| {
            let (client, base) = (&client, &base);
            async move {
                let url = format!("{base}/api/v1/devices/{id}/move");
                let sent = with_token(
                    client.post(&url).json(&serde_json::json!({"to": opts.to})),
                    opts.token.as_deref(),
                )
                .send()
                .await;
                let answer = match sent {
                    Ok(r) => {
                        let status = r.status();
                        r.text()
                            .await
                            .map(|t| (status, t))
                            .map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e.to_string()),
                };
                (id, answer)
            }
        })
        .buffer_unordered(opts.parallel.max(1));
    while let Some((id, answer)) = answers.next().await {
        match answer {
            Ok((status, text)) if status.is_success() => {
                summary.moved += 1;
                if let Ok(m) = serde_json::from_str::<MovedAnswer>(&text) {
                    summary.commands_ended += m.commands_ended;
                    if !m.source_unregistered {
                        summary.source_pending.push(id);
                    }
                }
            }
            Ok((status, text)) => {
                let reason = serde_json::from_str::<ErrorAnswer>(&text)
                    .map(|e| e.error.message)
                    .unwrap_or(text);
                summary.fail(id, format!("HTTP {}: {reason}", status.as_u16()));
            }
            Err(e) => summary.fail(id, format!("no answer: {e}")),
        }
        bar.inc(1);
        bar.set_message(format!(
            "{} failed",
            summary.failed.values().map(|(n, _)| n).sum::<u64>()
        ));
    }
    bar.finish_and_clear();
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_filter_matches_a_key_or_a_key_and_value() {
        let tags = BTreeMap::from([("site".to_owned(), "north".to_owned())]);
        assert!(tag_matches(&tags, "site"));
        assert!(tag_matches(&tags, "site=north"));
        assert!(!tag_matches(&tags, "site=south"));
        assert!(!tag_matches(&tags, "floor"));
    }

    #[test]
    fn the_summary_groups_failures_by_reason_with_a_few_examples() {
        let mut s = Summary {
            selected: 6,
            moved: 1,
            already_there: 1,
            ..Summary::default()
        };
        for n in 0..4 {
            s.fail(format!("d-{n}"), "HTTP 409: busy".into());
        }
        let text = s.render("b");
        assert!(
            text.starts_with("6 device(s) selected: 1 moved to b, 1 already there, 4 failed"),
            "{text}"
        );
        assert!(
            text.contains("failed (4): HTTP 409: busy — e.g. d-0, d-1, d-2"),
            "{text}"
        );
        assert!(!s.success());
    }
}
