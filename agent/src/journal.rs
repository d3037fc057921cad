//! The agent's durable memory of work, so that nothing accepted is lost or done twice:
//!
//! - `journal/state.json`: the highest job sequence accepted (replay protection across restarts);
//! - `journal/<job>.json`: each accepted job, its envelope digest and, once done, its result
//!   (a re-offer of a finished job gets the stored result back instead of running again);
//! - `spool/<job>.json`: results the plane has not acknowledged yet; re-sent on every session.
//!
//! Every write is atomic and fsynced before the agent tells the plane anything about it.
//!
//! A finished entry is kept while its job could still be offered again (until its envelope
//! expires) and while its result waits in the spool; after that, plus `RETENTION`, it goes
//! (`prune`): the plane only offers unfinished, unexpired jobs, and `state.json` keeps the
//! replay protection, so a long-lived agent's journal does not grow without bound.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{read_json, write_json};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalStatus {
    Accepted,
    Finished,
}

/// A job result as stored on disk (the wire message is built from it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResult {
    pub job_id: String,
    /// `succeeded`, `failed` or `refused`.
    pub status: String,
    pub reason_code: String,
    pub message: String,
    pub outcome_json: String,
    pub envelope_digest: String,
    pub started_at_unix_ms: i64,
    pub finished_at_unix_ms: i64,
    /// The signed receipt (DSSE JSON) sent with the result; re-sent unchanged from the spool.
    #[serde(default)]
    pub receipt: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalEntry {
    pub job_id: String,
    pub sequence: u64,
    pub envelope_digest: String,
    pub status: JournalStatus,
    pub result: Option<StoredResult>,
    /// The verified envelope, kept so an interrupted job can be resumed after a restart.
    pub envelope: String,
    /// The envelope's expiry (unix ms); absent in entries written before it was recorded.
    #[serde(default)]
    pub not_after_unix_ms: Option<i64>,
}

/// How long a finished, acknowledged entry outlives its job's expiry (or, for entries without
/// one, its result): a margin for clock skew and for a plane restored from an older backup.
pub const RETENTION: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// How often `acknowledge` looks for entries to prune.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Debug, Default, Serialize, Deserialize)]
struct SequenceState {
    last_sequence: u64,
}

pub struct Journal {
    dir: PathBuf,
    spool: PathBuf,
    last_sequence: u64,
    entries: BTreeMap<String, JournalEntry>,
    last_prune: Option<std::time::Instant>,
}

fn now_unix_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn safe_name(job_id: &str) -> Option<String> {
    let ok = !job_id.is_empty()
        && job_id.len() <= 128
        && job_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then(|| job_id.to_string())
}

impl Journal {
    pub fn open(dir: PathBuf, spool: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(&spool)?;
        let state_path = dir.join("state.json");
        let last_sequence = if state_path.exists() {
            read_json::<SequenceState>(&state_path)
                .map_err(std::io::Error::other)?
                .last_sequence
        } else {
            0
        };
        let mut entries = BTreeMap::new();
        for item in std::fs::read_dir(&dir)? {
            let path = item?.path();
            let is_entry = path.extension().is_some_and(|e| e == "json")
                && path.file_name().is_some_and(|n| n != "state.json");
            if !is_entry {
                continue;
            }
            match read_json::<JournalEntry>(&path) {
                Ok(entry) => {
                    entries.insert(entry.job_id.clone(), entry);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable journal entry skipped")
                }
            }
        }
        let mut journal = Self {
            dir,
            spool,
            last_sequence,
            entries,
            last_prune: None,
        };
        journal.settle_interrupted_finishes()?;
        journal.prune(now_unix_ms())?;
        Ok(journal)
    }

    /// Removes finished entries whose result the plane acknowledged and whose job expired more
    /// than `RETENTION` before `now_ms`; returns how many. Accepted (in-flight) entries and
    /// results still in the spool always stay.
    pub fn prune(&mut self, now_ms: i64) -> std::io::Result<usize> {
        self.last_prune = Some(std::time::Instant::now());
        let retention = i64::try_from(RETENTION.as_millis()).unwrap_or(i64::MAX);
        let spooled: std::collections::HashSet<String> =
            self.spooled().into_iter().map(|r| r.job_id).collect();
        let expired: Vec<String> = self
            .entries
            .values()
            .filter(|e| e.status == JournalStatus::Finished && !spooled.contains(&e.job_id))
            .filter(|e| {
                let finished = e.result.as_ref().map_or(0, |r| r.finished_at_unix_ms);
                let gone_at = e.not_after_unix_ms.unwrap_or(0).max(finished);
                gone_at.saturating_add(retention) < now_ms
            })
            .map(|e| e.job_id.clone())
            .collect();
        for job_id in &expired {
            if let Some(name) = safe_name(job_id) {
                match std::fs::remove_file(self.dir.join(format!("{name}.json"))) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            self.entries.remove(job_id);
        }
        if !expired.is_empty() {
            tracing::info!(
                entries = expired.len(),
                "pruned finished jobs from the journal"
            );
        }
        Ok(expired.len())
    }

    /// `finish` writes the spool before the entry, so an agent killed between the two leaves a
    /// result in the spool for an entry still marked accepted. The spool is the truth: the job
    /// ran to its end. Without this the restart would run it again — a script would then be
    /// failed as interrupted and its spooled success overwritten by that failure.
    fn settle_interrupted_finishes(&mut self) -> std::io::Result<()> {
        for result in self.spooled() {
            let Some(entry) = self.entries.get_mut(&result.job_id) else {
                continue;
            };
            if entry.status != JournalStatus::Accepted {
                continue;
            }
            let Some(name) = safe_name(&result.job_id) else {
                continue;
            };
            tracing::warn!(job_id = %result.job_id, "the agent stopped while recording this job's result; the spooled result stands");
            entry.status = JournalStatus::Finished;
            entry.result = Some(result);
            write_json(&self.dir.join(format!("{name}.json")), &*entry)?;
        }
        Ok(())
    }

    pub fn last_sequence(&self) -> u64 {
        self.last_sequence
    }

    pub fn get(&self, job_id: &str) -> Option<&JournalEntry> {
        self.entries.get(job_id)
    }

    /// Jobs accepted and not finished (interrupted by a restart, or running now).
    pub fn in_flight(&self) -> Vec<JournalEntry> {
        self.entries
            .values()
            .filter(|e| e.status == JournalStatus::Accepted)
            .cloned()
            .collect()
    }

    /// Records acceptance and advances the sequence, durably, before the job runs.
    pub fn accept(&mut self, entry: JournalEntry) -> std::io::Result<()> {
        let name = safe_name(&entry.job_id)
            .ok_or_else(|| std::io::Error::other("job id not usable as a file name"))?;
        write_json(&self.dir.join(format!("{name}.json")), &entry)?;
        if entry.sequence > self.last_sequence {
            write_json(
                &self.dir.join("state.json"),
                &SequenceState {
                    last_sequence: entry.sequence,
                },
            )?;
            self.last_sequence = entry.sequence;
        }
        self.entries.insert(entry.job_id.clone(), entry);
        Ok(())
    }

    /// Stores a result: in the journal (if the job was accepted) and in the spool until acked.
    pub fn finish(&mut self, result: StoredResult) -> std::io::Result<()> {
        let name = safe_name(&result.job_id)
            .ok_or_else(|| std::io::Error::other("job id not usable as a file name"))?;
        write_json(&self.spool.join(format!("{name}.json")), &result)?;
        if let Some(entry) = self.entries.get_mut(&result.job_id) {
            entry.status = JournalStatus::Finished;
            entry.result = Some(result);
            write_json(&self.dir.join(format!("{name}.json")), &*entry)?;
        }
        Ok(())
    }

    /// Results not yet acknowledged by the plane.
    pub fn spooled(&self) -> Vec<StoredResult> {
        let mut out = Vec::new();
        let Ok(items) = std::fs::read_dir(&self.spool) else {
            return out;
        };
        for item in items.flatten() {
            let path = item.path();
            if path.extension().is_some_and(|e| e == "json") {
                match read_json::<StoredResult>(&path) {
                    Ok(r) => out.push(r),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "unreadable spooled result skipped")
                    }
                }
            }
        }
        out.sort_by_key(|r| r.finished_at_unix_ms);
        out
    }

    /// The plane persisted this result: it may leave the spool. Now and then (hourly) the
    /// journal is pruned on the way.
    pub fn acknowledge(&mut self, job_id: &str) -> std::io::Result<()> {
        if let Some(name) = safe_name(job_id) {
            match std::fs::remove_file(self.spool.join(format!("{name}.json"))) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if self.last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            self.prune(now_unix_ms())?;
        }
        Ok(())
    }

    /// Refusals of envelopes whose job id is unusable as a file name are sent but not spooled.
    pub fn can_spool(job_id: &str) -> bool {
        safe_name(job_id).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(job: &str) -> StoredResult {
        StoredResult {
            job_id: job.to_string(),
            status: "succeeded".to_string(),
            reason_code: String::new(),
            message: String::new(),
            outcome_json: "{}".to_string(),
            envelope_digest: "sha256:00".to_string(),
            started_at_unix_ms: 1,
            finished_at_unix_ms: 2,
            receipt: String::new(),
        }
    }

    #[test]
    fn survives_reopen_and_spools_until_acknowledged() {
        let tmp = tempfile::tempdir().unwrap();
        let (j, s) = (tmp.path().join("journal"), tmp.path().join("spool"));
        let mut journal = Journal::open(j.clone(), s.clone()).unwrap();
        journal
            .accept(JournalEntry {
                job_id: "job_1".into(),
                sequence: 7,
                envelope_digest: "sha256:aa".into(),
                status: JournalStatus::Accepted,
                result: None,
                envelope: "{}".into(),
                not_after_unix_ms: None,
            })
            .unwrap();
        drop(journal);

        let mut journal = Journal::open(j.clone(), s.clone()).unwrap();
        assert_eq!(journal.last_sequence(), 7);
        assert_eq!(journal.in_flight().len(), 1);
        journal.finish(result("job_1")).unwrap();
        assert!(journal.in_flight().is_empty());
        drop(journal);

        let mut journal = Journal::open(j.clone(), s.clone()).unwrap();
        assert_eq!(journal.spooled().len(), 1);
        assert_eq!(
            journal.get("job_1").and_then(|e| e.result.clone()),
            Some(result("job_1"))
        );
        journal.acknowledge("job_1").unwrap();
        drop(journal);
        let journal = Journal::open(j, s).unwrap();
        assert!(journal.spooled().is_empty());
        assert_eq!(journal.last_sequence(), 7);
    }

    /// Killed between the two writes of `finish` (spool written, entry still accepted): the
    /// reopened journal counts the job as finished with the spooled result, so it is not run
    /// again, and a re-offer gets that result.
    #[test]
    fn a_result_spooled_before_its_entry_was_updated_counts_as_finished() {
        let tmp = tempfile::tempdir().unwrap();
        let (j, s) = (tmp.path().join("journal"), tmp.path().join("spool"));
        let mut journal = Journal::open(j.clone(), s.clone()).unwrap();
        journal
            .accept(JournalEntry {
                job_id: "job_3".into(),
                sequence: 3,
                envelope_digest: "sha256:aa".into(),
                status: JournalStatus::Accepted,
                result: None,
                envelope: "{}".into(),
                not_after_unix_ms: None,
            })
            .unwrap();
        drop(journal);
        // The first of finish's two writes, and then the crash.
        write_json(&s.join("job_3.json"), &result("job_3")).unwrap();

        let journal = Journal::open(j.clone(), s.clone()).unwrap();
        assert!(journal.in_flight().is_empty(), "the job would run again");
        let entry = journal.get("job_3").unwrap();
        assert_eq!(entry.status, JournalStatus::Finished);
        assert_eq!(entry.result, Some(result("job_3")));
        assert_eq!(journal.spooled(), vec![result("job_3")]);
        drop(journal);
        let journal = Journal::open(j, s).unwrap();
        assert_eq!(
            journal.get("job_3").unwrap().status,
            JournalStatus::Finished
        );
    }

    fn finished_entry(journal: &mut Journal, job: &str, sequence: u64, not_after: Option<i64>) {
        journal
            .accept(JournalEntry {
                job_id: job.into(),
                sequence,
                envelope_digest: "sha256:aa".into(),
                status: JournalStatus::Accepted,
                result: None,
                envelope: "{}".into(),
                not_after_unix_ms: not_after,
            })
            .unwrap();
        journal.finish(result(job)).unwrap();
    }

    /// Only finished, acknowledged entries past their expiry plus the retention go; the
    /// sequence (replay protection) stays, also across a reopen, which prunes too.
    #[test]
    fn prune_drops_only_acknowledged_entries_long_expired() {
        let tmp = tempfile::tempdir().unwrap();
        let (j, s) = (tmp.path().join("journal"), tmp.path().join("spool"));
        let mut journal = Journal::open(j.clone(), s.clone()).unwrap();
        let day = 24 * 3600 * 1000;
        let now = 100 * day;
        let retention = i64::try_from(RETENTION.as_millis()).unwrap();
        // Expired long ago and acknowledged: pruned.
        finished_entry(&mut journal, "old_acked", 1, Some(now - retention - day));
        journal.acknowledge("old_acked").unwrap();
        // Expired long ago but its result never reached the plane: kept, with its spool.
        finished_entry(&mut journal, "old_spooled", 2, Some(now - retention - day));
        // Acknowledged, but expired within the retention: kept.
        finished_entry(&mut journal, "recent", 3, Some(now - day));
        journal.acknowledge("recent").unwrap();
        // An entry from before expiries were recorded: judged by its result's time (here
        // unix ms 2, long ago).
        finished_entry(&mut journal, "legacy", 4, None);
        journal.acknowledge("legacy").unwrap();
        // Still running: kept whatever its age.
        journal
            .accept(JournalEntry {
                job_id: "running".into(),
                sequence: 5,
                envelope_digest: "sha256:aa".into(),
                status: JournalStatus::Accepted,
                result: None,
                envelope: "{}".into(),
                not_after_unix_ms: Some(1),
            })
            .unwrap();

        assert_eq!(journal.prune(now).unwrap(), 2);
        assert!(journal.get("old_acked").is_none());
        assert!(journal.get("legacy").is_none());
        assert!(!j.join("old_acked.json").exists());
        for kept in ["old_spooled", "recent", "running"] {
            assert!(journal.get(kept).is_some(), "{kept}");
            assert!(j.join(format!("{kept}.json")).exists(), "{kept}");
        }
        assert_eq!(journal.spooled(), vec![result("old_spooled")]);
        assert_eq!(
            journal.prune(now).unwrap(),
            0,
            "pruning twice changes nothing"
        );
        drop(journal);
        let journal = Journal::open(j, s).unwrap();
        assert_eq!(journal.last_sequence(), 5);
        assert!(journal.get("old_acked").is_none());
    }

    #[test]
    fn refuses_path_like_job_ids() {
        assert!(!Journal::can_spool("../etc/passwd"));
        assert!(!Journal::can_spool(""));
        assert!(Journal::can_spool("job_abc-1"));
    }
}
