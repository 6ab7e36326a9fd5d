//! Provider checkpoints kept in the gateway's store: what [`Provider::set_checkpoints`]
//! receives, scoped to one provider instance, so providers never touch the store and the
//! store never knows a cloud.
//!
//! [`Provider::set_checkpoints`]: iotgw_providers::Provider::set_checkpoints

use std::sync::Arc;

use async_trait::async_trait;
use iotgw_providers::{Checkpoints, ProviderError};
use iotgw_registry::Store;

/// The checkpoints of provider instance `instance`, in `store`.
pub struct StoreCheckpoints {
    store: Arc<dyn Store>,
    instance: String,
}

impl StoreCheckpoints {
    /// Checkpoints of `instance` in `store`.
    pub fn new(store: Arc<dyn Store>, instance: &str) -> Self {
        Self {
            store,
            instance: instance.to_owned(),
        }
    }

    fn failed(&self, what: &str, e: impl std::fmt::Display) -> ProviderError {
        // A store that does not answer now may answer later: the consumer retries.
        ProviderError::Transient {
            instance: self.instance.clone(),
            message: format!("{what} in the gateway's store: {e}"),
        }
    }
}

#[async_trait]
impl Checkpoints for StoreCheckpoints {
    async fn load(&self, key: &str) -> Result<Option<String>, ProviderError> {
        self.store
            .load_checkpoint(&self.instance, key)
            .await
            .map_err(|e| self.failed(&format!("reading checkpoint {key}"), e))
    }

    async fn save(&self, key: &str, value: &str, position: i64) -> Result<bool, ProviderError> {
        self.store
            .save_checkpoint(&self.instance, key, value, position)
            .await
            .map_err(|e| self.failed(&format!("saving checkpoint {key}"), e))
    }
}

#[cfg(test)]
mod tests {
    use iotgw_registry::SqliteStore;

    use super::*;

    #[tokio::test]
    async fn checkpoints_survive_reopening_the_store_and_stay_within_their_instance() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("iotgw.db");
        {
            let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.expect("open"));
            let hub = StoreCheckpoints::new(store.clone(), "hub");
            assert!(hub.save("partition-0", "4711", 1).await.expect("saved"));
            assert!(hub.save("partition-0", "4712", 2).await.expect("replaced"));
            assert!(
                !hub.save("partition-0", "4710", 0).await.expect("refused"),
                "behind the stored position"
            );
            StoreCheckpoints::new(store, "other")
                .save("partition-0", "1", 1)
                .await
                .expect("saved");
        }
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.expect("reopen"));
        let hub = StoreCheckpoints::new(store.clone(), "hub");
        assert_eq!(
            hub.load("partition-0").await.expect("loaded").as_deref(),
            Some("4712")
        );
        assert_eq!(hub.load("partition-1").await.expect("loaded"), None);
        assert_eq!(
            StoreCheckpoints::new(store, "other")
                .load("partition-0")
                .await
                .expect("loaded")
                .as_deref(),
            Some("1")
        );
    }
}
