//! Exact job timings straight from the plane's SQLite store (`D/stella.db`): the plane stamps
//! `created_at` when it writes a job and `finished_at` when it persists the result, in ms.
//! The benchmark only reads; WAL mode lets it do so while the plane writes.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};

pub struct Store {
    pool: SqlitePool,
}

#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: String,
    pub status: String,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    /// When the plane recorded the agent's "accepted" message.
    pub accepted_at: Option<i64>,
}

pub const TERMINAL: &[&str] = &["succeeded", "failed", "refused", "cancelled"];

impl Store {
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .read_only(true)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .with_context(|| format!("opening the plane's database {}", path.display()))?;
        Ok(Self { pool })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// `running`, `succeeded` or `failed`.
    pub async fn deployment_status(&self, id: &str) -> anyhow::Result<String> {
        let (status,): (String,) = sqlx::query_as("SELECT status FROM deployments WHERE id = ?")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .with_context(|| format!("reading deployment {id}"))?;
        Ok(status)
    }

    /// The most recently created deployment.
    pub async fn latest_deployment(&self) -> anyhow::Result<Option<String>> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT id FROM deployments ORDER BY created_at DESC, rowid DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
        .context("reading the latest deployment")?;
        Ok(row.map(|(id,)| id))
    }

    /// Deployments still running.
    pub async fn running_deployments(&self) -> anyhow::Result<Vec<String>> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT id FROM deployments WHERE status = 'running'")
                .fetch_all(&self.pool)
                .await
                .context("reading running deployments")?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Jobs of a deployment by status.
    pub async fn job_statuses(&self, deployment_id: &str) -> anyhow::Result<HashMap<String, i64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, COUNT(*) FROM jobs WHERE deployment_id = ? GROUP BY status",
        )
        .bind(deployment_id)
        .fetch_all(&self.pool)
        .await
        .context("reading job statuses")?;
        Ok(rows.into_iter().collect())
    }

    pub async fn jobs(&self, deployment_id: &str) -> anyhow::Result<Vec<JobRow>> {
        let rows = sqlx::query(
            "SELECT j.id, j.status, j.created_at, j.finished_at,
                (SELECT MIN(e.at) FROM job_events e WHERE e.job_id = j.id
                    AND e.message = 'accepted by agent') AS accepted_at
             FROM jobs j WHERE j.deployment_id = ?",
        )
        .bind(deployment_id)
        .fetch_all(&self.pool)
        .await
        .context("reading jobs")?;
        Ok(rows
            .iter()
            .map(|r| JobRow {
                id: r.get("id"),
                status: r.get("status"),
                created_at: r.get("created_at"),
                finished_at: r.get("finished_at"),
                accepted_at: r.get("accepted_at"),
            })
            .collect())
    }
}

pub fn terminal(status: &str) -> bool {
    TERMINAL.contains(&status)
}
