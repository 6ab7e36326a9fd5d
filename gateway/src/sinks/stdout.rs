//! JSON lines on standard output.

use std::io::Write;

use async_trait::async_trait;
use iotgw_registry::OutboxItem;

use super::{json_line, DeliveryError, Sink};

/// Writes one JSON line per alert to standard output.
#[derive(Debug)]
pub struct StdoutSink {
    name: String,
}

impl StdoutSink {
    /// A stdout sink.
    pub fn new(name: &str) -> Self {
        Self { name: name.into() }
    }
}

#[async_trait]
impl Sink for StdoutSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, item: &OutboxItem) -> Result<(), DeliveryError> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", json_line(item))
            .and_then(|()| out.flush())
            .map_err(|e| DeliveryError::Retry {
                message: format!("writing to stdout: {e}"),
                after: None,
            })
    }
}
