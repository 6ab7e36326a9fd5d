//! What the throughput benches share: settings from the environment, a whole run under a
//! deadline, and reading the gateway's Prometheus metrics.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

/// `name` from the environment as a number, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Runs `run` on a multi-threaded runtime; failing when it takes longer than `limit`.
pub fn run_within(
    limit: Duration,
    run: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::time::timeout(limit, run)
            .await
            .map_err(|_| anyhow::anyhow!("the bench did not finish within {limit:?}"))?
    })
}

/// Prometheus text exposition, parsed once per read.
pub struct Samples(Vec<(String, BTreeMap<String, String>, f64)>);

impl Samples {
    /// Parses the text exposition (`name{label="value",...} number` lines).
    pub fn parse(text: &str) -> Self {
        let mut out = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let labels = rest
                        .trim_end_matches('}')
                        .split(',')
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), BTreeMap::new()),
            };
            out.push((name, labels, value));
        }
        Self(out)
    }

    /// The sum of `name`'s samples whose labels include every `(key, value)` of `with`.
    pub fn sum(&self, name: &str, with: &[(&str, &str)]) -> u64 {
        let total: f64 = self
            .0
            .iter()
            .filter(|(n, labels, _)| {
                n == name
                    && with
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum();
        total.max(0.0) as u64
    }
}
