//! `flashpack publish PACK --repo user/name [--private] [--revision BRANCH] [--endpoint URL]`:
//! upload a pack and a generated model card to the Hugging Face Hub (token from `HF_TOKEN` or
//! `$HF_HOME/token`). `--card` prints the card without uploading.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use flashpack::format::Pack;
use flashpack::hub::{model_card, Hub, HubConfig, PublishOptions};
use flashpack::inspect::PackReport;

use crate::bars::Bars;

#[derive(clap::Args)]
pub struct PublishArgs {
    /// The .flashpack file; its file name becomes its name in the repo.
    pub pack: PathBuf,
    /// Target model repo, `user/name` or `org/name`; created when missing.
    #[arg(long)]
    pub repo: String,
    /// Create the repo private (an existing repo keeps its visibility).
    #[arg(long)]
    pub private: bool,
    /// Branch to commit to; created from main when missing.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Hub endpoint [default: $HF_ENDPOINT, else https://huggingface.co].
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Commit message [default: "Upload FILE with flashpack VERSION"].
    #[arg(long)]
    pub message: Option<String>,
    /// Print the model card that would be uploaded, and upload nothing.
    #[arg(long)]
    pub card: bool,
}

pub fn run(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = HubConfig::from_env();
    if let Some(e) = &args.endpoint {
        cfg.endpoint = e.trim_end_matches('/').to_string();
    }
    let file = args
        .pack
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model.flashpack")
        .to_string();
    if args.card {
        let pack = Pack::open(&args.pack)
            .with_context(|| format!("{} failed to open", args.pack.display()))?;
        let report = PackReport::new(&pack);
        print!(
            "{}",
            model_card(
                &report,
                pack.metadata(),
                &args.repo,
                &file,
                &cfg.endpoint,
                &args.revision
            )
        );
        return Ok(ExitCode::SUCCESS);
    }
    let hub = Hub::new(cfg);
    let opts = PublishOptions {
        pack: args.pack.clone(),
        repo: args.repo.clone(),
        private: args.private,
        revision: args.revision.clone(),
        message: args.message.clone(),
    };
    // Notes show even where stderr is not a terminal (a log): which bytes the Hub had, retries.
    let bars = Bars::new(false);
    let out = hub
        .publish(&opts, &bars)
        .with_context(|| format!("publishing {} to {}", args.pack.display(), args.repo))?;
    println!(
        "published {} to {} ({} repo; {} bytes uploaded)",
        out.path_in_repo,
        out.repo_url,
        if out.created_repo { "new" } else { "existing" },
        out.uploaded_bytes
    );
    println!("commit {}", out.commit_url);
    Ok(ExitCode::SUCCESS)
}
