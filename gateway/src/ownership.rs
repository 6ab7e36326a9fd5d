//! Partition claims kept in the gateway's store: what [`Provider::set_ownership`] receives,
//! scoped to one provider instance, so the replicas sharing the store split a provider's
//! partitions while providers never touch the store and the store never knows a cloud.
//!
//! [`Provider::set_ownership`]: iotgw_providers::Provider::set_ownership

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use iotgw_providers::{PartitionClaim, PartitionOwnership, ProviderError};
use iotgw_registry::{Ownership, Store};

/// The partition claims of provider instance `instance`, in `store`.
pub struct StoreOwnership {
    store: Arc<dyn Store>,
    instance: String,
}

impl StoreOwnership {
    /// Claims of `instance` in `store`.
    pub fn new(store: Arc<dyn Store>, instance: &str) -> Self {
        Self {
            store,
            instance: instance.to_owned(),
        }
    }

    fn failed(&self, what: &str, e: impl std::fmt::Display) -> ProviderError {
        // A store that does not answer now may answer later: the consumer tries next round.
        ProviderError::Transient {
            instance: self.instance.clone(),
            message: format!("{what} in the gateway's store: {e}"),
        }
    }
}

fn claim(o: Ownership) -> PartitionClaim {
    PartitionClaim {
        partition: o.partition,
        owner: o.owner,
        version: o.version,
        expires_at: o.expires_at,
    }
}

#[async_trait]
impl PartitionOwnership for StoreOwnership {
    async fn list(&self) -> Result<Vec<PartitionClaim>, ProviderError> {
        self.store
            .list_ownership(&self.instance)
            .await
            .map(|claims| claims.into_iter().map(claim).collect())
            .map_err(|e| self.failed("listing the partition claims", e))
    }

    async fn claim(
        &self,
        partition: &str,
        owner: &str,
        expected_version: Option<i64>,
        expires_at: DateTime<Utc>,
    ) -> Result<Option<PartitionClaim>, ProviderError> {
        self.store
            .claim_ownership(
                &self.instance,
                partition,
                owner,
                expected_version,
                expires_at,
            )
            .await
            .map(|won| won.map(claim))
            .map_err(|e| self.failed(&format!("claiming partition {partition}"), e))
    }
}

#[cfg(test)]
mod tests {
    use iotgw_registry::SqliteStore;

    use super::*;

    #[tokio::test]
    async fn claims_are_kept_per_instance_and_a_stale_version_loses() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::memory().await.expect("store"));
        let hub = StoreOwnership::new(store.clone(), "hub");
        let until = Utc::now() + chrono::Duration::seconds(30);
        let first = hub
            .claim("hub/$Default/0", "replica-a", None, until)
            .await
            .expect("claim")
            .expect("first claim wins");
        assert_eq!(first.version, 1);
        assert_eq!(
            hub.claim("hub/$Default/0", "replica-b", None, until)
                .await
                .expect("claim"),
            None,
            "claimed already"
        );
        let renewed = hub
            .claim("hub/$Default/0", "replica-a", Some(1), until)
            .await
            .expect("renew")
            .expect("the owner renews");
        assert_eq!(renewed.version, 2);
        assert_eq!(hub.list().await.expect("list"), vec![renewed]);
        assert!(
            StoreOwnership::new(store, "other")
                .list()
                .await
                .expect("list")
                .is_empty(),
            "another instance has claims of its own"
        );
    }
}
