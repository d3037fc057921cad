//! Group commit of what agent sessions write: offers, acceptances, progress, results, hellos,
//! trust acknowledgements, inventory and heartbeats go to one writer task, which applies everything that queued up
//! while the previous batch was committing in one transaction (one fsync).
//!
//! Why: the plane paid per statement and per commit (each SQLite statement is a round trip to a
//! connection thread; each commit an fsync). With thousands of sessions writing at once, one
//! transaction per batch turns ~6 commits per job into a small fraction of one.
//!
//! Durability is unchanged: the database stays `synchronous = FULL`, and a result is
//! acknowledged to its agent only after the batch holding it committed, so an acknowledged
//! result survives a process crash and a power loss. Writes without an acknowledgement
//! (offered, accepted, progress, inventory, hello) are best effort by nature: the agent's
//! journal and the next session repair them.

use std::collections::BTreeMap;

use stella_proto::{InventoryReport, JobResult};
use tokio::sync::{mpsc, oneshot};

use crate::store::Db;
use crate::{agents, deployments, targets};

/// Most writes in one transaction: bounds how long one commit holds the write lock.
const MAX_BATCH: usize = 1024;
/// Queue depth before sessions wait for the writer (backpressure instead of unbounded memory).
const QUEUE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("storage: {0}")]
    Storage(String),
    #[error("the writer stopped")]
    Stopped,
}

/// The outcome of a result write: `true` when recorded (or already recorded), `false` when the
/// job is not this agent's.
pub type ResultRecorded = Result<bool, WriteError>;

enum Write {
    Offered {
        agent_id: String,
        job_id: String,
    },
    Accepted {
        agent_id: String,
        job_id: String,
    },
    Progress {
        agent_id: String,
        job_id: String,
        message: String,
    },
    Result {
        agent_id: String,
        status: &'static str,
        result: Box<JobResult>,
        receipt: String,
        done: oneshot::Sender<ResultRecorded>,
    },
    Inventory {
        agent_id: String,
        report: InventoryReport,
    },
    Hello {
        agent_id: String,
        capabilities: Vec<String>,
        labels: BTreeMap<String, String>,
        version: String,
        hostname: String,
    },
    Heartbeats(Vec<(String, i64)>),
    SessionClosed {
        agent_id: String,
    },
    TrustAck {
        agent_id: String,
        version: u64,
    },
    /// Resolves once every write queued before it has been committed (or failed).
    Barrier(oneshot::Sender<()>),
}

/// The sessions' handle on the writer task.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Write>,
}

impl GroupCommit {
    /// Starts the writer task on `db` for the replica `replica_id` (recorded as the claimant of
    /// the jobs it offers and the holder of the sessions it opens); it stops when every handle
    /// is dropped.
    pub fn start(db: Db, replica_id: &str) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(db, replica_id.to_string(), rx));
        Self { queue }
    }

    async fn submit(&self, write: Write) {
        if self.queue.send(write).await.is_err() {
            tracing::warn!("group-commit writer stopped; a session write was dropped");
        }
    }

    pub async fn offered(&self, agent_id: &str, job_id: &str) {
        self.submit(Write::Offered {
            agent_id: agent_id.to_string(),
            job_id: job_id.to_string(),
        })
        .await
    }

    pub async fn accepted(&self, agent_id: &str, job_id: &str) {
        self.submit(Write::Accepted {
            agent_id: agent_id.to_string(),
            job_id: job_id.to_string(),
        })
        .await
    }

    pub async fn progress(&self, agent_id: &str, job_id: &str, message: String) {
        self.submit(Write::Progress {
            agent_id: agent_id.to_string(),
            job_id: job_id.to_string(),
            message,
        })
        .await
    }

    pub async fn inventory(&self, agent_id: &str, report: InventoryReport) {
        self.submit(Write::Inventory {
            agent_id: agent_id.to_string(),
            report,
        })
        .await
    }

    pub async fn hello(
        &self,
        agent_id: &str,
        capabilities: Vec<String>,
        labels: BTreeMap<String, String>,
        version: String,
        hostname: String,
    ) {
        self.submit(Write::Hello {
            agent_id: agent_id.to_string(),
            capabilities,
            labels,
            version,
            hostname,
        })
        .await
    }

    /// The agent's session with this replica ended and no newer one replaced it here.
    pub async fn session_closed(&self, agent_id: &str) {
        self.submit(Write::SessionClosed {
            agent_id: agent_id.to_string(),
        })
        .await
    }

    /// The trust bundle version an agent says it holds (hello or acknowledgement).
    pub async fn trust_ack(&self, agent_id: &str, version: u64) {
        self.submit(Write::TrustAck {
            agent_id: agent_id.to_string(),
            version,
        })
        .await
    }

    pub async fn heartbeats(&self, heartbeats: Vec<(String, i64)>) {
        if !heartbeats.is_empty() {
            self.submit(Write::Heartbeats(heartbeats)).await
        }
    }

    /// Waits until every write submitted before this call has been committed (or has failed).
    pub async fn barrier(&self) {
        let (done, committed) = oneshot::channel();
        if self.queue.send(Write::Barrier(done)).await.is_ok() {
            let _ = committed.await;
        }
    }

    /// Records a terminal result; resolves once the transaction holding it has committed.
    pub async fn result(
        &self,
        agent_id: &str,
        status: &'static str,
        result: JobResult,
        receipt: String,
    ) -> ResultRecorded {
        let (done, outcome) = oneshot::channel();
        self.queue
            .send(Write::Result {
                agent_id: agent_id.to_string(),
                status,
                result: Box::new(result),
                receipt,
                done,
            })
            .await
            .map_err(|_| WriteError::Stopped)?;
        outcome.await.map_err(|_| WriteError::Stopped)?
    }
}

async fn run(db: Db, replica: String, mut rx: mpsc::Receiver<Write>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        match commit(&db, &replica, &batch).await {
            Ok(recorded) => answer(&mut batch, |i| Ok(recorded[i])),
            Err(e) => {
                // One bad write must not fail the others: retry each in its own transaction.
                tracing::warn!(error = %e, writes = batch.len(), "group commit failed; retrying its writes one by one");
                for write in batch.drain(..) {
                    let single = [write];
                    let outcome = commit(&db, &replica, &single)
                        .await
                        .map(|r| r[0])
                        .map_err(|e| WriteError::Storage(e.to_string()));
                    if let Err(e) = &outcome {
                        tracing::error!(error = %e, "a session write failed");
                    }
                    let [write] = single;
                    match write {
                        Write::Result { done, .. } => {
                            let _ = done.send(outcome);
                        }
                        Write::Barrier(done) => {
                            let _ = done.send(());
                        }
                        _ => {}
                    }
                }
            }
        }
        batch.clear();
    }
}

/// Hands each result write its outcome (by position in the batch) and empties the batch.
fn answer(batch: &mut Vec<Write>, outcome: impl Fn(usize) -> ResultRecorded) {
    for (i, write) in batch.drain(..).enumerate() {
        match write {
            Write::Result { done, .. } => {
                let _ = done.send(outcome(i));
            }
            Write::Barrier(done) => {
                let _ = done.send(());
            }
            _ => {}
        }
    }
}

/// Applies the writes in one transaction; per write, whether a result was recorded.
async fn commit(db: &Db, replica: &str, batch: &[Write]) -> Result<Vec<bool>, sqlx::Error> {
    let mut tx = crate::store::write_tx(db).await?;
    let mut recorded = Vec::with_capacity(batch.len());
    for write in batch {
        recorded.push(apply(&mut tx, replica, write).await?);
    }
    tx.commit().await?;
    Ok(recorded)
}

async fn apply(
    tx: &mut sqlx::AnyConnection,
    replica: &str,
    write: &Write,
) -> Result<bool, sqlx::Error> {
    match write {
        Write::Offered { agent_id, job_id } => {
            deployments::mark_offered(tx, replica, agent_id, job_id).await?
        }
        Write::Accepted { agent_id, job_id } => {
            deployments::mark_accepted(tx, agent_id, job_id).await?
        }
        Write::Progress {
            agent_id,
            job_id,
            message,
        } => deployments::record_progress(tx, agent_id, job_id, message).await?,
        Write::Result {
            agent_id,
            status,
            result,
            receipt,
            ..
        } => return deployments::record_result(tx, agent_id, status, result, receipt).await,
        Write::Inventory { agent_id, report } => {
            targets::record_inventory(tx, agent_id, report).await?
        }
        Write::Hello {
            agent_id,
            capabilities,
            labels,
            version,
            hostname,
        } => {
            agents::record_hello(
                tx,
                replica,
                agent_id,
                capabilities,
                labels,
                version,
                hostname,
            )
            .await?
        }
        Write::Heartbeats(heartbeats) => agents::flush_heartbeats(tx, heartbeats).await?,
        Write::SessionClosed { agent_id } => {
            // Only this replica's mark: the agent may hold a session elsewhere already.
            sqlx::query(
                "UPDATE agents SET session_replica = NULL WHERE id = $1 AND session_replica = $2",
            )
            .bind(agent_id)
            .bind(replica)
            .execute(&mut *tx)
            .await?;
        }
        Write::TrustAck { agent_id, version } => {
            // The rule of `trust::record_ack`, inside the batch: versions only move forward.
            let version = i64::try_from(*version).unwrap_or(i64::MAX);
            sqlx::query(
                "UPDATE agents SET trust_bundle_version = $1 WHERE id = $2 AND trust_bundle_version < $3",
            )
            .bind(version)
            .bind(agent_id)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        }
        Write::Barrier(_) => {}
    }
    Ok(false)
}
