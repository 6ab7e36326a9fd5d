//! The `gcp_pubsub` provider (being built; see its issue). Must expose `pub async fn build(instance, config) -> Result<Arc<dyn Provider>, ProviderError>`.
