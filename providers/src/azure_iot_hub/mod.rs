//! The `azure_iot_hub` provider (being built; see its issue). Must expose `pub async fn build(instance, config) -> Result<Arc<dyn Provider>, ProviderError>`.
