//! Durable sandbox records in SQLite. Every state change is written (and, with WAL and
//! `synchronous=FULL`, on disk) before the API acknowledges it.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

mod channels;

use torpor_api::{AgentConfig, GitHubGrant, ModelGrant, NetworkPolicy, State};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening database {path}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrating database")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("database query failed")]
    Query(#[from] sqlx::Error),
    #[error("corrupt record for sandbox {id}: {message}")]
    Corrupt { id: String, message: String },
    #[error("no free address slot: all {0} are in use")]
    PoolExhausted(u32),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub id: String,
    pub state: State,
    pub reason: Option<String>,
    pub template: String,
    pub image_dir: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub env: BTreeMap<String, String>,
    pub slot: u32,
    pub pid: Option<u32>,
    pub accel: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub idle_timeout_secs: u64,
    pub meter: Meter,
    /// Directory of the template this sandbox was cloned from.
    pub template_dir: Option<String>,
    pub network: NetworkPolicy,
    pub disk_mib: u32,
    /// Names of the static secrets it receives.
    pub secrets: Vec<String>,
    pub github: Option<GitHubGrant>,
    pub models: Option<ModelGrant>,
    pub agent: Option<AgentConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TemplateRecord {
    pub name: String,
    pub dir: String,
    pub image_dir: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Names of the processes the template keeps running.
    pub processes: Vec<String>,
    pub network: NetworkPolicy,
    pub secrets: Vec<String>,
    pub github: Option<GitHubGrant>,
    pub models: Option<ModelGrant>,
    pub agent: Option<AgentConfig>,
    /// Default environment of its sandboxes (a create request's own env is laid over it).
    pub env: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
}

/// Raw metering columns; see `Record::usage` for what they add up to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Meter {
    pub resumes: u64,
    pub running_since: Option<DateTime<Utc>>,
    pub running_ms: u64,
    pub paused_since: Option<DateTime<Utc>>,
    pub paused_bytes: u64,
    pub paused_byte_ms: f64,
    pub model: ModelMeter,
}

/// What the model proxy counted for a sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelMeter {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl ModelMeter {
    pub fn tokens(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }
}

impl Meter {
    /// Running milliseconds and paused byte-milliseconds up to `now`, open intervals included.
    pub fn totals(&self, now: DateTime<Utc>) -> (u64, f64) {
        let open_running = self.running_since.map(|t| (now - t).num_milliseconds().max(0) as u64).unwrap_or(0);
        let open_paused = self
            .paused_since
            .map(|t| (now - t).num_milliseconds().max(0) as f64 * self.paused_bytes as f64)
            .unwrap_or(0.0);
        (self.running_ms + open_running, self.paused_byte_ms + open_paused)
    }
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    /// Every write takes this first: a deferred read-then-write transaction fails at once with
    /// SQLITE_BUSY_SNAPSHOT if another connection commits between its read and its write.
    writer: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Store {
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(|source| StoreError::Open { path: path.display().to_string(), source })?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        sqlx::migrate!("./migrations").run(&pool).await.map_err(StoreError::Migrate)?;
        Ok(Self { pool, writer: Default::default() })
    }

    /// Inserts a new record in `creating` state with the lowest free address slot.
    pub async fn insert(&self, rec: &Record, capacity: u32) -> Result<u32, StoreError> {
        let _writer = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        let used: Vec<i64> = sqlx::query_scalar("SELECT slot FROM sandboxes ORDER BY slot").fetch_all(&mut *tx).await?;
        let mut slot = 1u32;
        for u in used {
            if u as u32 == slot {
                slot += 1;
            } else if u as u32 > slot {
                break;
            }
        }
        if slot > capacity {
            return Err(StoreError::PoolExhausted(capacity));
        }
        sqlx::query(
            "INSERT INTO sandboxes (id, state, reason, template, image_dir, vcpus, memory_mib, env, slot, pid, accel, created_at, updated_at, idle_timeout_secs, template_dir, network, disk_mib, secrets, github, models, agent)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&rec.id)
        .bind(rec.state.as_str())
        .bind(&rec.reason)
        .bind(&rec.template)
        .bind(&rec.image_dir)
        .bind(rec.vcpus as i64)
        .bind(rec.memory_mib as i64)
        .bind(serde_json::to_string(&rec.env).expect("env serialises"))
        .bind(slot as i64)
        .bind(rec.pid.map(|p| p as i64))
        .bind(&rec.accel)
        .bind(rec.created_at.to_rfc3339())
        .bind(rec.updated_at.to_rfc3339())
        .bind(rec.idle_timeout_secs as i64)
        .bind(&rec.template_dir)
        .bind(serde_json::to_string(&rec.network).expect("policy serialises"))
        .bind(rec.disk_mib as i64)
        .bind(serde_json::to_string(&rec.secrets).expect("names serialise"))
        .bind(rec.github.as_ref().map(|g| serde_json::to_string(g).expect("grant serialises")))
        .bind(rec.models.as_ref().map(|m| serde_json::to_string(m).expect("grant serialises")))
        .bind(rec.agent.as_ref().map(|a| serde_json::to_string(a).expect("agent serialises")))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(slot)
    }

    pub async fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
        let row = sqlx::query("SELECT * FROM sandboxes WHERE id = ?").bind(id).fetch_optional(&self.pool).await?;
        row.map(|r| decode(&r)).transpose()
    }

    pub async fn list(&self) -> Result<Vec<Record>, StoreError> {
        let rows = sqlx::query("SELECT * FROM sandboxes ORDER BY created_at, id").fetch_all(&self.pool).await?;
        rows.iter().map(decode).collect()
    }

    /// Moves `id` to `to` only if it is currently in one of `from`. Returns the state it was in
    /// (`None` if it does not exist); the move happened iff that state is in `from`.
    pub async fn transition(
        &self,
        id: &str,
        from: &[State],
        to: State,
        reason: Option<&str>,
    ) -> Result<Option<State>, StoreError> {
        let _writer = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        let current: Option<String> =
            sqlx::query_scalar("SELECT state FROM sandboxes WHERE id = ?").bind(id).fetch_optional(&mut *tx).await?;
        let Some(current) = current else {
            return Ok(None);
        };
        let current = State::parse(&current)
            .ok_or_else(|| StoreError::Corrupt { id: id.to_owned(), message: format!("unknown state {current:?}") })?;
        if from.contains(&current) {
            let now = Utc::now();
            sqlx::query("UPDATE sandboxes SET state = ?, reason = ?, updated_at = ? WHERE id = ?")
                .bind(to.as_str())
                .bind(reason)
                .bind(now.to_rfc3339())
                .bind(id)
                .execute(&mut *tx)
                .await?;
            // Metering follows the state in the same transaction, so it can never disagree.
            if current == State::Running && to != State::Running {
                sqlx::query(
                    "UPDATE sandboxes SET running_ms = running_ms + MAX(0, CAST(ROUND((julianday(?) - julianday(running_since)) * 86400000) AS INTEGER)),
                     running_since = NULL WHERE id = ? AND running_since IS NOT NULL",
                )
                .bind(now.to_rfc3339())
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
            if to == State::Running && current != State::Running {
                sqlx::query("UPDATE sandboxes SET running_since = ? WHERE id = ?")
                    .bind(now.to_rfc3339())
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            if current == State::Paused && to != State::Paused {
                sqlx::query(
                    "UPDATE sandboxes SET paused_byte_ms = paused_byte_ms + paused_bytes * MAX(0, (julianday(?) - julianday(paused_since)) * 86400000.0),
                     paused_since = NULL WHERE id = ? AND paused_since IS NOT NULL",
                )
                .bind(now.to_rfc3339())
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
            if to == State::Paused && current != State::Paused {
                sqlx::query("UPDATE sandboxes SET paused_since = ? WHERE id = ?")
                    .bind(now.to_rfc3339())
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(Some(current))
    }

    pub async fn set_pid(&self, id: &str, pid: Option<u32>) -> Result<(), StoreError> {
        let _writer = self.writer.lock().await;
        sqlx::query("UPDATE sandboxes SET pid = ?, updated_at = ? WHERE id = ?")
            .bind(pid.map(|p| p as i64))
            .bind(Utc::now().to_rfc3339())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Bytes the sandbox stores while paused; set just before the move to `paused`.
    pub async fn set_paused_bytes(&self, id: &str, bytes: u64) -> Result<(), StoreError> {
        let _writer = self.writer.lock().await;
        sqlx::query("UPDATE sandboxes SET paused_bytes = ? WHERE id = ?")
            .bind(bytes as i64)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn insert_template(&self, t: &TemplateRecord) -> Result<(), StoreError> {
        let _writer = self.writer.lock().await;
        sqlx::query("INSERT OR REPLACE INTO templates (name, dir, image_dir, vcpus, memory_mib, processes, network, secrets, github, models, agent, env, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
            .bind(&t.name)
            .bind(&t.dir)
            .bind(&t.image_dir)
            .bind(t.vcpus as i64)
            .bind(t.memory_mib as i64)
            .bind(serde_json::to_string(&t.processes).expect("names serialise"))
            .bind(serde_json::to_string(&t.network).expect("policy serialises"))
            .bind(serde_json::to_string(&t.secrets).expect("names serialise"))
            .bind(t.github.as_ref().map(|g| serde_json::to_string(g).expect("grant serialises")))
            .bind(t.models.as_ref().map(|m| serde_json::to_string(m).expect("grant serialises")))
            .bind(t.agent.as_ref().map(|a| serde_json::to_string(a).expect("agent serialises")))
            .bind(serde_json::to_string(&t.env).expect("env serialises"))
            .bind(t.created_at.to_rfc3339())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn template(&self, name: &str) -> Result<Option<TemplateRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM templates WHERE name = ?").bind(name).fetch_optional(&self.pool).await?;
        row.map(|r| decode_template(&r)).transpose()
    }

    pub async fn templates(&self) -> Result<Vec<TemplateRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM templates ORDER BY name").fetch_all(&self.pool).await?;
        rows.iter().map(decode_template).collect()
    }

    pub async fn delete_template(&self, name: &str) -> Result<(), StoreError> {
        let _writer = self.writer.lock().await;
        sqlx::query("DELETE FROM templates WHERE name = ?").bind(name).execute(&self.pool).await?;
        Ok(())
    }

    /// Sandboxes whose disk or memory still depends on files in `dir`.
    pub async fn users_of_template_dir(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar("SELECT id FROM sandboxes WHERE template_dir = ?")
            .bind(dir)
            .fetch_all(&self.pool)
            .await?)
    }

    pub async fn set_network(&self, id: &str, network: &NetworkPolicy) -> Result<(), StoreError> {
        let _writer = self.writer.lock().await;
        sqlx::query("UPDATE sandboxes SET network = ? WHERE id = ?")
            .bind(serde_json::to_string(network).expect("policy serialises"))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn count_resume(&self, id: &str) -> Result<(), StoreError> {
        let _writer = self.writer.lock().await;
        sqlx::query("UPDATE sandboxes SET resumes = resumes + 1 WHERE id = ?").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    /// Adds one proxied model request and the tokens its answer reported.
    pub async fn add_model_usage(&self, id: &str, input_tokens: u64, output_tokens: u64) -> Result<(), StoreError> {
        let _writer = self.writer.lock().await;
        sqlx::query(
            "UPDATE sandboxes SET model_requests = model_requests + 1, model_input_tokens = model_input_tokens + ?, \
             model_output_tokens = model_output_tokens + ? WHERE id = ?",
        )
        .bind(input_tokens.min(i64::MAX as u64) as i64)
        .bind(output_tokens.min(i64::MAX as u64) as i64)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn delete(&self, id: &str) -> Result<(), StoreError> {
        let _writer = self.writer.lock().await;
        sqlx::query("DELETE FROM sandboxes WHERE id = ?").bind(id).execute(&self.pool).await?;
        Ok(())
    }
}

fn decode(row: &sqlx::sqlite::SqliteRow) -> Result<Record, StoreError> {
    let id: String = row.try_get("id")?;
    let corrupt = |message: String| StoreError::Corrupt { id: id.clone(), message };
    let state: String = row.try_get("state")?;
    let env: String = row.try_get("env")?;
    let time = |col: &str| -> Result<DateTime<Utc>, StoreError> {
        let s: String = row.try_get(col)?;
        DateTime::parse_from_rfc3339(&s).map(|t| t.with_timezone(&Utc)).map_err(|e| corrupt(format!("{col}: {e}")))
    };
    Ok(Record {
        state: State::parse(&state).ok_or_else(|| corrupt(format!("unknown state {state:?}")))?,
        reason: row.try_get("reason")?,
        template: row.try_get("template")?,
        image_dir: row.try_get("image_dir")?,
        vcpus: row.try_get::<i64, _>("vcpus")? as u32,
        memory_mib: row.try_get::<i64, _>("memory_mib")? as u32,
        env: serde_json::from_str(&env).map_err(|e| corrupt(format!("env: {e}")))?,
        slot: row.try_get::<i64, _>("slot")? as u32,
        pid: row.try_get::<Option<i64>, _>("pid")?.map(|p| p as u32),
        accel: row.try_get("accel")?,
        created_at: time("created_at")?,
        updated_at: time("updated_at")?,
        idle_timeout_secs: row.try_get::<i64, _>("idle_timeout_secs")? as u64,
        meter: Meter {
            resumes: row.try_get::<i64, _>("resumes")? as u64,
            running_since: optional_time(row, "running_since").map_err(&corrupt)?,
            running_ms: row.try_get::<i64, _>("running_ms")? as u64,
            paused_since: optional_time(row, "paused_since").map_err(&corrupt)?,
            paused_bytes: row.try_get::<i64, _>("paused_bytes")? as u64,
            paused_byte_ms: row.try_get::<f64, _>("paused_byte_ms")?,
            model: ModelMeter {
                requests: row.try_get::<i64, _>("model_requests")? as u64,
                input_tokens: row.try_get::<i64, _>("model_input_tokens")? as u64,
                output_tokens: row.try_get::<i64, _>("model_output_tokens")? as u64,
            },
        },
        template_dir: row.try_get("template_dir")?,
        network: serde_json::from_str(&row.try_get::<String, _>("network")?)
            .map_err(|e| corrupt(format!("network: {e}")))?,
        disk_mib: row.try_get::<i64, _>("disk_mib")? as u32,
        secrets: serde_json::from_str(&row.try_get::<String, _>("secrets")?)
            .map_err(|e| corrupt(format!("secrets: {e}")))?,
        github: json_column(row, "github").map_err(corrupt)?,
        models: json_column(row, "models").map_err(corrupt)?,
        agent: json_column(row, "agent").map_err(corrupt)?,
        id,
    })
}

fn decode_template(row: &sqlx::sqlite::SqliteRow) -> Result<TemplateRecord, StoreError> {
    let name: String = row.try_get("name")?;
    let corrupt = |message: String| StoreError::Corrupt { id: format!("template {name}"), message };
    let processes: String = row.try_get("processes")?;
    let created: String = row.try_get("created_at")?;
    Ok(TemplateRecord {
        dir: row.try_get("dir")?,
        image_dir: row.try_get("image_dir")?,
        vcpus: row.try_get::<i64, _>("vcpus")? as u32,
        memory_mib: row.try_get::<i64, _>("memory_mib")? as u32,
        processes: serde_json::from_str(&processes).map_err(|e| corrupt(e.to_string()))?,
        network: serde_json::from_str(&row.try_get::<String, _>("network")?)
            .map_err(|e| corrupt(format!("network: {e}")))?,
        secrets: serde_json::from_str(&row.try_get::<String, _>("secrets")?)
            .map_err(|e| corrupt(format!("secrets: {e}")))?,
        github: json_column(row, "github").map_err(corrupt)?,
        models: json_column(row, "models").map_err(corrupt)?,
        agent: json_column(row, "agent").map_err(corrupt)?,
        env: serde_json::from_str(&row.try_get::<String, _>("env")?).map_err(|e| corrupt(format!("env: {e}")))?,
        created_at: DateTime::parse_from_rfc3339(&created)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| corrupt(e.to_string()))?,
        name,
    })
}

fn json_column<T: serde::de::DeserializeOwned>(row: &sqlx::sqlite::SqliteRow, col: &str) -> Result<Option<T>, String> {
    let text: Option<String> = row.try_get(col).map_err(|e| e.to_string())?;
    text.map(|t| serde_json::from_str(&t).map_err(|e| format!("{col}: {e}"))).transpose()
}

fn optional_time(row: &sqlx::sqlite::SqliteRow, col: &str) -> Result<Option<DateTime<Utc>>, String> {
    let s: Option<String> = row.try_get(col).map_err(|e| e.to_string())?;
    s.map(|s| DateTime::parse_from_rfc3339(&s).map(|t| t.with_timezone(&Utc)).map_err(|e| format!("{col}: {e}")))
        .transpose()
}

/// A plausible record, for tests elsewhere in the crate.
#[cfg(test)]
pub(crate) fn test_record(id: &str) -> Record {
    tests::record(id)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record(id: &str) -> Record {
        Record {
            id: id.into(),
            state: State::Creating,
            reason: None,
            template: "base".into(),
            image_dir: "/img".into(),
            vcpus: 1,
            memory_mib: 512,
            env: BTreeMap::from([("A".into(), "1".into())]),
            slot: 0,
            pid: None,
            accel: "tcg".into(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
            idle_timeout_secs: 300,
            meter: Meter::default(),
            template_dir: None,
            network: Default::default(),
            disk_mib: 4096,
            secrets: Vec::new(),
            github: None,
            models: None,
            agent: None,
        }
    }

    #[tokio::test]
    async fn metering_follows_transitions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db")).await.unwrap();
        store.insert(&record("m"), 4).await.unwrap();
        store.transition("m", &[State::Creating], State::Running, None).await.unwrap();
        let running = store.get("m").await.unwrap().unwrap().meter;
        assert!(running.running_since.is_some() && running.running_ms == 0);
        // Back-date the interval by 2 s so the closed total is known without sleeping.
        let two_s_ago = (Utc::now() - chrono::Duration::seconds(2)).to_rfc3339();
        sqlx::query("UPDATE sandboxes SET running_since = ?").bind(&two_s_ago).execute(&store.pool).await.unwrap();
        store.transition("m", &[State::Running], State::Pausing, None).await.unwrap();
        let m = store.get("m").await.unwrap().unwrap().meter;
        assert!(m.running_since.is_none());
        assert!((2000..2500).contains(&m.running_ms), "{}", m.running_ms);
        store.set_paused_bytes("m", 1000).await.unwrap();
        store.transition("m", &[State::Pausing], State::Paused, None).await.unwrap();
        sqlx::query("UPDATE sandboxes SET paused_since = ?").bind(&two_s_ago).execute(&store.pool).await.unwrap();
        let open = store.get("m").await.unwrap().unwrap().meter;
        let (_, byte_ms) = open.totals(Utc::now());
        assert!((2_000_000.0..2_500_000.0).contains(&byte_ms), "{byte_ms}");
        store.transition("m", &[State::Paused], State::Resuming, None).await.unwrap();
        store.count_resume("m").await.unwrap();
        let closed = store.get("m").await.unwrap().unwrap().meter;
        assert!((2_000_000.0..2_500_000.0).contains(&closed.paused_byte_ms), "{}", closed.paused_byte_ms);
        // The byte count stays: a resume that fails goes back to paused with the same files.
        assert_eq!((closed.paused_bytes, closed.resumes), (1000, 1));
        assert!(closed.paused_since.is_none());
    }

    #[tokio::test]
    async fn round_trip_slots_and_transitions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = Store::open(&path).await.unwrap();
        assert_eq!(store.insert(&record("a"), 3).await.unwrap(), 1);
        assert_eq!(store.insert(&record("b"), 3).await.unwrap(), 2);
        store.delete("a").await.unwrap();
        // The freed slot is reused.
        assert_eq!(store.insert(&record("c"), 3).await.unwrap(), 1);
        assert_eq!(store.insert(&record("d"), 3).await.unwrap(), 3);
        assert!(matches!(store.insert(&record("e"), 3).await, Err(StoreError::PoolExhausted(3))));

        assert_eq!(
            store.transition("b", &[State::Creating], State::Running, None).await.unwrap(),
            Some(State::Creating)
        );
        // Not allowed from `running`: state stays.
        assert_eq!(store.transition("b", &[State::Stopped], State::Running, None).await.unwrap(), Some(State::Running));
        store.transition("b", &[State::Running], State::Failed, Some("boom")).await.unwrap();
        store.set_pid("b", Some(42)).await.unwrap();
        drop(store);

        // Durable across reopen.
        let store = Store::open(&path).await.unwrap();
        let b = store.get("b").await.unwrap().unwrap();
        assert_eq!((b.state, b.reason.as_deref(), b.pid), (State::Failed, Some("boom"), Some(42)));
        assert_eq!(b.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(store.list().await.unwrap().len(), 3);
        assert_eq!(store.transition("zz", &[State::Running], State::Stopped, None).await.unwrap(), None);
    }
}
