//! How the library reports progress. Only the binary draws bars; the library speaks this trait.

/// Receives progress of long stages. Implementations must be cheap and thread-safe.
pub trait Progress: Send + Sync {
    /// A stage starts; `total` is in `unit`s (bytes, tensors, tokens) when known.
    fn stage(&self, name: &str, total: Option<u64>, unit: &str);
    /// `n` more units of the current stage are done.
    fn advance(&self, n: u64);
    /// The current stage is finished.
    fn finish_stage(&self);
    /// A one-line note for the user (decisions taken).
    fn note(&self, _msg: &str) {}
    /// A problem the user must see even when progress is hidden (a pack that will lack
    /// something). By default, a note.
    fn warn(&self, msg: &str) {
        self.note(msg)
    }
}

/// Progress that goes nowhere (tests, `--quiet`, library users who do not care).
pub struct Silent;

impl Progress for Silent {
    fn stage(&self, _name: &str, _total: Option<u64>, _unit: &str) {}
    fn advance(&self, _n: u64) {}
    fn finish_stage(&self) {}
}

/// Progress that shows only warnings, on stderr (an engine built for `chat`, `serve` or a
/// benchmark: a budget above the machine's memory).
pub struct Warnings;

impl Progress for Warnings {
    fn stage(&self, _name: &str, _total: Option<u64>, _unit: &str) {}
    fn advance(&self, _n: u64) {}
    fn finish_stage(&self) {}
    fn warn(&self, msg: &str) {
        eprintln!("warning: {msg}");
    }
}
