//! `flashpack verify PACK`: open (header, directories, metadata checksums), then hash every
//! tensor and segment and check all padding. Exit 1 and name every damage found.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use flashpack::format::Pack;

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The .flashpack file.
    pub pack: PathBuf,
}

pub fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let pack = Pack::open(&args.pack)
        .with_context(|| format!("{} failed to open", args.pack.display()))?;
    let report = pack.verify();
    if report.is_ok() {
        println!(
            "{}: ok ({} bytes, {} tensors, {} expert segments checked)",
            args.pack.display(),
            report.bytes_checked,
            pack.tensors().len(),
            pack.experts().len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    for d in &report.damages {
        eprintln!("damaged: {d}");
    }
    eprintln!(
        "error: {}: {} damaged places; re-download or re-convert the pack",
        args.pack.display(),
        report.damages.len()
    );
    Ok(ExitCode::from(1))
}
