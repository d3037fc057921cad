//! Results: a human table, or one JSON object with `--json`.

use serde_json::{Map, Value};

pub struct Report {
    rows: Vec<(String, Value, String)>,
}

impl Report {
    /// A report with the fields every scenario shares.
    pub fn new(scenario: &str, agents: usize, transport: &str) -> Self {
        let mut r = Self { rows: Vec::new() };
        r.add("scenario", scenario, "");
        r.add("agents", agents, "simulated agents, one mTLS session each");
        let how = if transport == "quic" {
            "length-delimited protobuf on one QUIC stream, mTLS"
        } else {
            "gRPC bidirectional stream over mTLS"
        };
        r.add("transport", transport, how);
        r.add(
            "store",
            "sqlite",
            "the plane's embedded store (WAL, synchronous=FULL)",
        );
        r.add(
            "cores",
            crate::sys::cores(),
            "of this machine, shared by plane and fleet",
        );
        r.add(
            "memory_gib",
            round1(crate::sys::memory_total_gib()),
            "of this machine",
        );
        r
    }

    pub fn add(&mut self, key: &str, value: impl Into<Value>, note: &str) {
        self.rows
            .push((key.to_string(), value.into(), note.to_string()));
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.rows
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, v, _)| v)
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        for (k, v, _) in &self.rows {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }

    pub fn print(&self, json: bool) {
        if json {
            println!("{}", self.to_json());
            return;
        }
        let shown: Vec<(String, String, &str)> = self
            .rows
            .iter()
            .map(|(k, v, n)| {
                let value = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => "-".to_string(),
                    other => other.to_string(),
                };
                (k.clone(), value, n.as_str())
            })
            .collect();
        let kw = shown.iter().map(|(k, _, _)| k.len()).max().unwrap_or(0);
        let vw = shown.iter().map(|(_, v, _)| v.len()).max().unwrap_or(0);
        println!("{:<kw$}  {:>vw$}", "metric", "value");
        println!("{}  {}", "-".repeat(kw), "-".repeat(vw));
        for (k, v, n) in shown {
            if n.is_empty() {
                println!("{k:<kw$}  {v:>vw$}");
            } else {
                println!("{k:<kw$}  {v:>vw$}  {n}");
            }
        }
    }
}

/// Nearest-rank percentile of sorted values (q in 0..=1).
pub fn percentile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

pub fn median(values: &[i64]) -> Option<i64> {
    let mut v = values.to_vec();
    v.sort_unstable();
    percentile(&v, 0.5)
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
