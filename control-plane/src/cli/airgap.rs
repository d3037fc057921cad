//! `stella airgap`: files that carry jobs to a relay with no link at all and bring its agents'
//! results back.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;

use stella_control_plane::airgap::ImportSummary;
use stella_control_plane::client::ApiClient;
use stella_proto::airgap::SignedResults;

use super::path_seg;

#[derive(Subcommand)]
pub enum AirgapCommand {
    /// Write the signed jobs waiting for the agents behind a relay, for
    /// `stella-agent relay import`.
    Export {
        /// The relay (agent id or name).
        #[arg(long)]
        relay: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Record the results, inventory and receipts of a relay's file
    /// (`stella-agent relay export-results`). Importing a file twice changes nothing.
    Import { file: PathBuf },
}

pub async fn run(client: &ApiClient, command: AirgapCommand) -> anyhow::Result<()> {
    match command {
        AirgapCommand::Export { relay, out } => {
            let envelope: serde_json::Value = client
                .post(
                    &format!("/api/v1/relays/{}/airgap-export", path_seg(&relay)),
                    &serde_json::json!({}),
                )
                .await?;
            let text = serde_json::to_string_pretty(&envelope)?;
            std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
            eprintln!(
                "wrote the jobs for the agents behind {relay} to {}",
                out.display()
            );
            Ok(())
        }
        AirgapCommand::Import { file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let results: SignedResults = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a relay results file", file.display()))?;
            let summary: ImportSummary = client.post("/api/v1/airgap/import", &results).await?;
            if summary.already_imported {
                println!(
                    "{} was imported before: 0 new, {} already known",
                    file.display(),
                    summary.results_known
                );
            } else {
                println!(
                    "imported results of {} agents from relay {}: {} new, {} already known, {} refused",
                    summary.agents,
                    summary.relay_id,
                    summary.results_new,
                    summary.results_known,
                    summary.results_refused
                );
            }
            for refused in &summary.agents_refused {
                println!("refused: {refused}");
            }
            Ok(())
        }
    }
}
