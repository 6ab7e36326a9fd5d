//! Entity links on PostgreSQL.

use sqlx::{Postgres, QueryBuilder};

use super::devices::require_device;
use super::{db, get, get_device_id, now, text, PostgresStore};
use crate::model::{EntityLink, EntityLinkFilter, MAX_ENTITY_LINKS};
use crate::store::StoreResult;
use crate::DeviceId;

impl PostgresStore {
    /// See [`crate::Store::link_entity`].
    pub(super) async fn link(
        &self,
        logical_name: &str,
        entity_id: &str,
        device: &DeviceId,
    ) -> StoreResult<EntityLink> {
        let mut tx = self.write().await?;
        require_device(&mut tx, device).await?;
        let row = sqlx::query(
            "WITH new AS (INSERT INTO entity_links \
             (entity_logical_name, entity_id, device_id, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING RETURNING *) \
             SELECT entity_logical_name, entity_id, device_id, created_at FROM new \
             UNION ALL SELECT entity_logical_name, entity_id, device_id, created_at \
             FROM entity_links WHERE entity_logical_name = $1 AND entity_id = $2 AND device_id = $3",
        )
        .bind(text(logical_name).as_ref())
        .bind(text(entity_id).as_ref())
        .bind(device.as_str())
        .bind(now())
        .fetch_one(&mut *tx)
        .await
        .map_err(db("linking an entity"))?;
        tx.commit().await.map_err(db("committing an entity link"))?;
        link_from_row(&row)
    }

    /// See [`crate::Store::entity_links`].
    pub(super) async fn links(&self, filter: &EntityLinkFilter) -> StoreResult<Vec<EntityLink>> {
        let mut qb = QueryBuilder::<Postgres>::new(
            "SELECT entity_logical_name, entity_id, device_id, created_at FROM entity_links \
             WHERE true",
        );
        if let Some(n) = &filter.entity_logical_name {
            qb.push(" AND entity_logical_name = ")
                .push_bind(text(n).into_owned());
        }
        if let Some(e) = &filter.entity_id {
            qb.push(" AND entity_id = ").push_bind(text(e).into_owned());
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

fn link_from_row(row: &sqlx::postgres::PgRow) -> StoreResult<EntityLink> {
    Ok(EntityLink {
        entity_logical_name: get(row, "entity_logical_name")?,
        entity_id: get(row, "entity_id")?,
        device_id: get_device_id(row, "device_id")?,
        created_at: get(row, "created_at")?,
    })
}
