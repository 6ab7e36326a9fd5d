//! Entity links on SQLite.

use sqlx::{QueryBuilder, Sqlite};

use super::devices::require_device;
use super::{db, get, get_device_id, get_ts, now, SqliteStore};
use crate::model::{EntityLink, EntityLinkFilter, MAX_ENTITY_LINKS};
use crate::store::StoreResult;
use crate::DeviceId;

impl SqliteStore {
    /// See [`crate::Store::link_entity`].
    pub(super) async fn link(
        &self,
        logical_name: &str,
        entity_id: &str,
        device: &DeviceId,
    ) -> StoreResult<EntityLink> {
        let mut tx = self.write().await?;
        require_device(&mut tx, device).await?;
        sqlx::query(
            "INSERT INTO entity_links (entity_logical_name, entity_id, device_id, created_at) \
             VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(logical_name)
        .bind(entity_id)
        .bind(device.as_str())
        .bind(now())
        .execute(&mut *tx)
        .await
        .map_err(db("linking an entity"))?;
        let row = sqlx::query(
            "SELECT entity_logical_name, entity_id, device_id, created_at FROM entity_links \
             WHERE entity_logical_name = ? AND entity_id = ? AND device_id = ?",
        )
        .bind(logical_name)
        .bind(entity_id)
        .bind(device.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(db("reading an entity link"))?;
        tx.commit().await.map_err(db("committing an entity link"))?;
        link_from_row(&row)
    }

    /// See [`crate::Store::entity_links`].
    pub(super) async fn links(&self, filter: &EntityLinkFilter) -> StoreResult<Vec<EntityLink>> {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT entity_logical_name, entity_id, device_id, created_at FROM entity_links \
             WHERE 1 = 1",
        );
        if let Some(n) = &filter.entity_logical_name {
            qb.push(" AND entity_logical_name = ").push_bind(n.clone());
        }
        if let Some(e) = &filter.entity_id {
            qb.push(" AND entity_id = ").push_bind(e.clone());
        }
        if let Some(d) = &filter.device_id {
            qb.push(" AND device_id = ")
                .push_bind(d.as_str().to_owned());
        }
        qb.push(" ORDER BY entity_logical_name, entity_id, device_id LIMIT ")
            .push_bind(i64::from(MAX_ENTITY_LINKS));
        qb.build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing entity links"))?
            .iter()
            .map(link_from_row)
            .collect()
    }
}

fn link_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<EntityLink> {
    Ok(EntityLink {
        entity_logical_name: get(row, "entity_logical_name")?,
        entity_id: get(row, "entity_id")?,
        device_id: get_device_id(row, "device_id")?,
        created_at: get_ts(row, "created_at")?,
    })
}
