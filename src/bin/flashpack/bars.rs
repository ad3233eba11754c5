//! indicatif bars behind the library's [`Progress`] trait, for `convert` and `publish`: one bar
//! per stage on stderr (none where stderr is not a terminal), a spinner where its size is unknown.

use std::sync::Mutex;
use std::time::Duration;

use flashpack::progress::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Bars {
    /// No bars and no notes (`--quiet`); warnings still show.
    hidden: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    pub fn new(hidden: bool) -> Bars {
        Bars {
            hidden,
            bar: Mutex::new(None),
        }
    }

    /// Prints a line on stderr without tearing the bar being drawn.
    fn line(&self, line: &str) {
        match self.bar.lock().ok().as_deref() {
            Some(Some(bar)) => bar.suspend(|| eprintln!("{line}")),
            _ => eprintln!("{line}"),
        }
    }
}

impl Progress for Bars {
    fn stage(&self, name: &str, total: Option<u64>, unit: &str) {
        let bar = match total {
            Some(t) if unit == "B" => ProgressBar::new(t).with_style(
                ProgressStyle::with_template(
                    "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            ),
            Some(t) => ProgressBar::new(t),
            None => {
                let b = ProgressBar::new_spinner();
                b.enable_steady_tick(Duration::from_millis(120));
                b
            }
        };
        if self.hidden {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_prefix(name.to_string());
        bar.set_message(name.to_string());
        if let Ok(mut b) = self.bar.lock() {
            *b = Some(bar);
        }
    }

    fn advance(&self, n: u64) {
        if let Ok(b) = self.bar.lock() {
            if let Some(b) = b.as_ref() {
                b.inc(n);
            }
        }
    }

    fn finish_stage(&self) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some(b) = b.take() {
                b.finish_and_clear();
            }
        }
    }

    fn note(&self, msg: &str) {
        if !self.hidden {
            self.line(&format!("note: {msg}"));
        }
    }

    fn warn(&self, msg: &str) {
        self.line(&format!("warning: {msg}"));
    }
}
