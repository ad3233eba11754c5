//! Several cached prompts: the KV caches of conversations other than the one the engine holds,
//! kept in a least-recently-used store bounded in bytes (`serve --prompt-cache-bytes`).
//!
//! In: before each request, the engine's current [`Prefix`] and the new prompt's ids. Out: the
//! engine's prefix is then the cached conversation that shares the most positions with the prompt
//! (possibly the one it held), and the conversation it held is kept here unless the new prompt
//! goes on from it. An agent alternates between conversations (its main thread, sub-agents, a
//! second client); with one cached prefix each switch recomputed the whole other conversation
//! (decision 0010). Invariant: the bytes of the kept prefixes never exceed the limit; the least
//! recently used ones go first. With a limit of 0 nothing is kept (one conversation, as before).
//!
//! A prefix kept here is moved, not copied. When the new prompt shares only part of the held
//! conversation (a second conversation with the same system prompt), the held one is kept as
//! it is and the engine goes on from a snapshot of it, which shares its buffers until written
//! ([`Prefix::snapshot`]): the shared positions are not computed again, at the memory of a second
//! copy once the new conversation writes.

use crate::run::generate::Prefix;

/// Prefixes of other conversations, least recently used first.
#[derive(Debug, Default)]
pub struct PromptCache {
    kept: Vec<Prefix>,
    limit: u64,
}

impl PromptCache {
    /// A store of at most `limit` bytes of KV caches (0: none).
    pub fn new(limit: u64) -> PromptCache {
        PromptCache {
            kept: Vec::new(),
            limit,
        }
    }

    /// How many positions of `prompt` the best kept prefix (or `held`) gives.
    pub fn reusable(&self, held: &Prefix, prompt: &[u32]) -> usize {
        self.kept
            .iter()
            .map(|p| p.reusable(prompt))
            .fold(held.reusable(prompt), usize::max)
    }

    /// Makes `held` the prefix that gives `prompt` the most positions, keeping the conversation
    /// it held unless `prompt` goes on from it (see the module's doc).
    pub fn choose(&mut self, held: &mut Prefix, prompt: &[u32]) {
        if self.limit == 0 {
            return;
        }
        let here = held.reusable(prompt);
        // The best kept one; of equals, the most recently used (the last in `kept`).
        let best = (0..self.kept.len())
            .map(|i| (self.kept[i].reusable(prompt), i))
            .max();
        match best {
            Some((there, i)) if there > here => {
                let chosen = self.kept.remove(i);
                let old = std::mem::replace(held, chosen);
                self.keep(old);
            }
            _ if !held.is_empty() && !held.extended_by(prompt) => {
                // Another conversation: the held one is kept whole, and the new one goes on
                // from a snapshot where it shares positions with it, else from nothing.
                let next = if here > 0 {
                    held.snapshot()
                } else {
                    Prefix::default()
                };
                let old = std::mem::replace(held, next);
                self.keep(old);
            }
            _ => {}
        }
    }

    /// Keeps `p` as the most recently used (unless it is empty, or alone over the limit), then
    /// drops the least recently used until the rest fits.
    pub fn keep(&mut self, p: Prefix) {
        let bytes = p.bytes();
        if p.is_empty() || bytes > self.limit {
            return;
        }
        self.kept.push(p);
        while self.bytes() > self.limit {
            self.kept.remove(0);
        }
    }

    /// The bytes of the kept prefixes.
    pub fn bytes(&self) -> u64 {
        self.kept.iter().map(Prefix::bytes).sum()
    }

    /// How many prefixes are kept.
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// Forgets every kept prefix.
    pub fn clear(&mut self) {
        self.kept.clear();
    }
}
