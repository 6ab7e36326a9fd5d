//! The `aws_iot_core` provider (being built; see its issue). Must expose `pub async fn build(instance, config) -> Result<Arc<dyn Provider>, ProviderError>`.
