//! `flashpack plan SRC|PACK [--ram SIZE] [--context N] [--json]`: what fits this machine and how
//! fast it will run, from the headers alone (`flashpack::plan`, decision 0032).

use std::process::ExitCode;

use flashpack::hub::Hub;
use flashpack::plan::{plan, GivenRates, PlanOptions};
use flashpack::run::budget::{parse_size, Size};

#[derive(clap::Args)]
pub struct PlanArgs {
    /// A checkpoint folder, a .flashpack, or a Hub id org/name[@revision].
    pub source: String,
    /// Plan for this much RAM instead of this machine's (8GiB, 64GB, 512G).
    #[arg(long, value_name = "SIZE", value_parser = parse_ram)]
    pub ram: Option<u64>,
    /// Positions the KV cache is sized for.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub context: u64,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
    /// Plan for a Mac: print the iogpu.wired_limit_mb the recommended budget needs (always on
    /// macOS).
    #[arg(long)]
    pub mac: bool,
    /// Measure the disk again instead of using the numbers cached for it.
    #[arg(long)]
    pub measure: bool,
    /// The disk's read speed for expert misses (1.5GB/s), instead of measuring it.
    #[arg(long, value_name = "SPEED", value_parser = parse_speed)]
    pub disk_speed: Option<f64>,
}

fn parse_ram(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        Size::Bytes(b) => Ok(b),
        Size::Percent(_) => Err(format!(
            "--ram {s}: give a size (64GB, 512GiB), not a share"
        )),
    }
}

/// `1.5GB/s` (or `1.5GB`): bytes per second.
fn parse_speed(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    match parse_size(t)? {
        Size::Bytes(b) => Ok(b as f64),
        Size::Percent(_) => Err(format!("--disk-speed {s}: give a speed such as 1.5GB/s")),
    }
}

pub fn run(args: PlanArgs) -> anyhow::Result<ExitCode> {
    let rates = match std::env::var("FLASHPACK_PLAN_RATES") {
        Ok(text) if !text.trim().is_empty() => Some(GivenRates::parse(&text)?),
        _ => None,
    };
    let opts = PlanOptions {
        source: args.source,
        ram: args.ram,
        context: args.context as usize,
        mac: args.mac,
        remeasure: args.measure,
        disk_speed: args.disk_speed,
        rates,
    };
    let report = plan(&opts, &Hub::from_env())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(ExitCode::SUCCESS)
}
