//! The relay's tables: channels, which sandbox each conversation is bound to, and the delivery
//! keys already seen (Telegram `update_id`, Slack `event_id`, HTTP idempotency keys).

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{Store, StoreError};
use torpor_api::{Channel, CreateChannel};

/// Delivery keys are remembered this long: platforms redeliver within minutes, not days.
const DELIVERY_MEMORY_DAYS: i64 = 7;

impl Store {
    /// False if a channel of that name exists.
    pub async fn insert_channel(&self, spec: &CreateChannel, webhook_path: &str) -> Result<bool, StoreError> {
        let _writer = self.writer.lock().await;
        let stored = serde_json::json!({"spec": spec, "webhook_path": webhook_path});
        let done = sqlx::query("INSERT OR IGNORE INTO channels (name, spec, created_at) VALUES (?, ?, ?)")
            .bind(&spec.name)
            .bind(stored.to_string())
            .bind(Utc::now().to_rfc3339())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn channel(&self, name: &str) -> Result<Option<Channel>, StoreError> {
        let row = sqlx::query("SELECT * FROM channels WHERE name = ?").bind(name).fetch_optional(&self.pool).await?;
        row.map(|r| decode_channel(&r)).transpose()
    }

    pub async fn channels(&self) -> Result<Vec<Channel>, StoreError> {
        let rows = sqlx::query("SELECT * FROM channels ORDER BY name").fetch_all(&self.pool).await?;
        rows.iter().map(decode_channel).collect()
    }

    pub async fn delete_channel(&self, name: &str) -> Result<bool, StoreError> {
        let _writer = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM channels WHERE name = ?").bind(name).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM bindings WHERE channel = ?").bind(name).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM deliveries WHERE channel = ?").bind(name).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn binding(&self, channel: &str, conversation: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar("SELECT sandbox FROM bindings WHERE channel = ? AND conversation = ?")
            .bind(channel)
            .bind(conversation)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn bind(&self, channel: &str, conversation: &str, sandbox: &str) -> Result<(), StoreError> {
        let _writer = self.writer.lock().await;
        sqlx::query("INSERT OR REPLACE INTO bindings (channel, conversation, sandbox) VALUES (?, ?, ?)")
            .bind(channel)
            .bind(conversation)
            .bind(sandbox)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Conversations of `channel` that still have their sandbox (a removed one frees its place).
    pub async fn conversations(&self, channel: &str) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM bindings b JOIN sandboxes s ON s.id = b.sandbox WHERE b.channel = ?",
        )
        .bind(channel)
        .fetch_one(&self.pool)
        .await?;
        Ok(n as u64)
    }

    /// Records a delivery key, with the message itself (`job`) until it is answered if it
    /// must survive a restart; false if the key was seen before (a redelivery).
    pub async fn first_delivery(&self, channel: &str, key: &str, job: Option<&str>) -> Result<bool, StoreError> {
        let _writer = self.writer.lock().await;
        let now = Utc::now();
        let forget_before = (now - chrono::Duration::days(DELIVERY_MEMORY_DAYS)).to_rfc3339();
        sqlx::query("DELETE FROM deliveries WHERE received_at < ? AND done = 1")
            .bind(forget_before)
            .execute(&self.pool)
            .await?;
        let inserted = sqlx::query(
            "INSERT OR IGNORE INTO deliveries (channel, key, received_at, job, done) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(channel)
        .bind(key)
        .bind(now.to_rfc3339())
        .bind(job)
        .bind(job.is_none())
        .execute(&self.pool)
        .await?;
        Ok(inserted.rows_affected() == 1)
    }

    /// The message under `key` was answered: it is not delivered again.
    pub async fn delivered(&self, channel: &str, key: &str) -> Result<(), StoreError> {
        let _writer = self.writer.lock().await;
        sqlx::query("UPDATE deliveries SET done = 1, job = NULL WHERE channel = ? AND key = ?")
            .bind(channel)
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Messages taken but not answered, oldest first: (channel, key, job).
    /// Messages stored and not answered, oldest first, each counted as taken up once more:
    /// (channel, key, job, times taken up before).
    pub async fn pending_deliveries(&self) -> Result<Vec<(String, String, String, u32)>, StoreError> {
        let _writer = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT channel, key, job, attempts FROM deliveries WHERE done = 0 AND job IS NOT NULL ORDER BY rowid",
        )
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query("UPDATE deliveries SET attempts = attempts + 1 WHERE done = 0 AND job IS NOT NULL")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        rows.iter()
            .map(|r| {
                let attempts: i64 = r.try_get("attempts")?;
                Ok((r.try_get("channel")?, r.try_get("key")?, r.try_get("job")?, attempts as u32))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

fn decode_channel(row: &sqlx::sqlite::SqliteRow) -> Result<Channel, StoreError> {
    let name: String = row.try_get("name")?;
    let corrupt = |message: String| StoreError::Corrupt { id: format!("channel {name}"), message };
    let stored: serde_json::Value =
        serde_json::from_str(&row.try_get::<String, _>("spec")?).map_err(|e| corrupt(e.to_string()))?;
    let spec: CreateChannel = serde_json::from_value(stored["spec"].clone()).map_err(|e| corrupt(e.to_string()))?;
    let created: String = row.try_get("created_at")?;
    Ok(Channel {
        spec,
        webhook_path: stored["webhook_path"].as_str().unwrap_or_default().to_owned(),
        created_at: DateTime::parse_from_rfc3339(&created)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| corrupt(e.to_string()))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored message is counted each time it is taken up after a restart, so one whose
    /// answer keeps ending the daemon can be given up on.
    #[tokio::test]
    async fn pending_messages_count_their_recoveries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.db")).await.unwrap();
        assert!(store.first_delivery("tg", "update:1", Some("{}")).await.unwrap());
        for expected in 0..3 {
            let pending = store.pending_deliveries().await.unwrap();
            assert_eq!(pending, vec![("tg".into(), "update:1".into(), "{}".into(), expected)]);
        }
        store.delivered("tg", "update:1").await.unwrap();
        assert!(store.pending_deliveries().await.unwrap().is_empty());
    }
}
