//! JSON lines appended to a file.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use iotgw_registry::OutboxItem;
use tokio::io::AsyncWriteExt;

use super::{json_line, DeliveryError, Sink};

/// Appends one JSON line per alert to a file, synced before the item counts as delivered.
#[derive(Debug)]
pub struct FileSink {
    name: String,
    path: PathBuf,
}

impl FileSink {
    /// A file sink; the file and its directory are created on first delivery.
    pub fn new(name: &str, path: &Path) -> Self {
        Self {
            name: name.into(),
            path: path.to_owned(),
        }
    }
}

#[async_trait]
impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, item: &OutboxItem) -> Result<(), DeliveryError> {
        let retry = |e: std::io::Error| DeliveryError::Retry {
            message: format!("{}: {e}", self.path.display()),
            after: None,
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await.map_err(retry)?;
        }
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .await
            .map_err(retry)?;
        let mut line = json_line(item);
        line.push('\n');
        f.write_all(line.as_bytes()).await.map_err(retry)?;
        f.sync_data().await.map_err(retry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn appends_one_json_line_per_item_creating_the_directory() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("sub/alerts.jsonl");
        let sink = FileSink::new("f", &path);
        for id in 1..=2 {
            let item = OutboxItem {
                id,
                sink: "f".into(),
                payload: serde_json::json!({"msdyn_description": format!("a{id}")}),
                idempotency_key: format!("k{id}"),
                attempts: 0,
                last_error: None,
                created_at: chrono::Utc::now(),
                lease_token: 1,
                change_of: None,
            };
            sink.deliver(&item).await.expect("deliver");
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["idempotency_key"], "k2");
        assert_eq!(lines[0]["data"]["msdyn_description"], "a1");
        assert_eq!(lines[0]["type"], "msdyn_iotalert");
    }

    #[tokio::test]
    async fn a_change_event_line_names_its_entity() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("feed.jsonl");
        let sink = FileSink::new("f", &path);
        let event = serde_json::json!({
            "entity": "msdyn_iotdevice",
            "key": "pump-1",
            "version": 3,
            "state": {"msdyn_deviceid": "pump-1", "msdyn_connectionstate": true},
        });
        let item = OutboxItem {
            id: 1,
            sink: "f".into(),
            payload: event.clone(),
            idempotency_key: "msdyn_iotdevice:pump-1:3".into(),
            attempts: 0,
            last_error: None,
            created_at: chrono::Utc::now(),
            lease_token: 1,
            change_of: Some("msdyn_iotdevice:pump-1".into()),
        };
        sink.deliver(&item).await.expect("deliver");
        let line: serde_json::Value =
            serde_json::from_str(std::fs::read_to_string(&path).expect("read").trim())
                .expect("json");
        assert_eq!(line["type"], "msdyn_iotdevice");
        assert_eq!(line["idempotency_key"], "msdyn_iotdevice:pump-1:3");
        assert_eq!(line["data"], event);
    }
}
