//! The conversations behind `previous_response_id`: each stored response's input and output,
//! as template messages, in a least-recently-used store bounded in bytes.
//!
//! In: a finished response's id and its whole conversation (what came before it, its input
//! items, its output items; not its `instructions`, which OpenAI does not carry over). Out: that
//! conversation, for a request that continues it. The KV cache of the conversation is not kept
//! here: the engine's prompt cache holds it (`run/prompt_cache.rs`), so a follow-up rendered as
//! the whole conversation computes only its new tokens.
//! Invariant: the bytes counted for the kept conversations never exceed the limit; the least
//! recently used (stored or continued) go first; a conversation alone over the limit is not
//! kept. Nothing survives a restart. docs/decisions/0029-responses-api.md.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::run::template::Message;

/// Counted for each message beside its text: the `Message` itself and its strings' headers.
const MESSAGE_OVERHEAD: u64 = 128;

/// Stored conversations by response id.
#[derive(Debug)]
pub struct ResponseStore {
    limit: u64,
    inner: Mutex<Kept>,
}

#[derive(Debug, Default)]
struct Kept {
    /// Least recently used first: (id, conversation, bytes counted).
    entries: VecDeque<(String, Arc<Vec<Message>>, u64)>,
    bytes: u64,
}

/// The bytes a conversation is counted for: its text, its calls' JSON and an overhead each.
pub fn bytes_of(messages: &[Message]) -> u64 {
    messages
        .iter()
        .map(|m| {
            let calls = m
                .tool_calls
                .iter()
                .flatten()
                .map(|c| c.to_string().len())
                .sum::<usize>();
            let strings = m.role.len()
                + m.content.len()
                + m.tool_call_id.as_ref().map_or(0, String::len)
                + m.name.as_ref().map_or(0, String::len);
            MESSAGE_OVERHEAD + (strings + calls) as u64
        })
        .sum()
}

impl ResponseStore {
    /// A store of at most `limit` bytes of conversations (0: none is kept).
    pub fn new(limit: u64) -> ResponseStore {
        ResponseStore {
            limit,
            inner: Mutex::new(Kept::default()),
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        // A panic while holding the lock leaves the store consistent (each step below is
        // whole), so a poisoned lock is taken as it is.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The conversation stored under `id`, now the most recently used.
    pub fn get(&self, id: &str) -> Option<Arc<Vec<Message>>> {
        let mut kept = self.kept();
        let at = kept.entries.iter().position(|(k, _, _)| k == id)?;
        let entry = kept.entries.remove(at)?;
        let conversation = entry.1.clone();
        kept.entries.push_back(entry);
        Some(conversation)
    }

    /// Keeps `conversation` under `id` as the most recently used, then drops the least
    /// recently used until the rest fits. Returns whether it was kept.
    pub fn put(&self, id: &str, conversation: Vec<Message>) -> bool {
        let bytes = bytes_of(&conversation);
        if bytes > self.limit {
            return false;
        }
        let mut kept = self.kept();
        if let Some(at) = kept.entries.iter().position(|(k, _, _)| k == id) {
            if let Some((_, _, old)) = kept.entries.remove(at) {
                kept.bytes -= old;
            }
        }
        while kept.bytes + bytes > self.limit {
            match kept.entries.pop_front() {
                Some((_, _, old)) => kept.bytes -= old,
                None => break,
            }
        }
        kept.bytes += bytes;
        kept.entries
            .push_back((id.to_string(), Arc::new(conversation), bytes));
        true
    }

    /// Conversations kept, and the bytes counted for them.
    pub fn usage(&self) -> (usize, u64) {
        let kept = self.kept();
        (kept.entries.len(), kept.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation(text: &str) -> Vec<Message> {
        vec![Message::new("user", text), Message::new("assistant", "ok")]
    }

    #[test]
    fn the_least_recently_used_go_first_and_the_bytes_stay_within_the_limit() {
        let one = bytes_of(&conversation("a"));
        let store = ResponseStore::new(3 * one);
        for id in ["r1", "r2", "r3"] {
            assert!(store.put(id, conversation("a")));
        }
        // Continuing r1 makes it the most recently used, so r2 goes when r4 comes.
        assert_eq!(store.get("r1").unwrap()[0].content, "a");
        assert!(store.put("r4", conversation("a")));
        assert!(store.get("r2").is_none());
        for id in ["r1", "r3", "r4"] {
            assert!(store.get(id).is_some(), "{id}");
        }
        assert_eq!(store.usage(), (3, 3 * one));
        // A bigger one makes room for itself.
        let big = conversation(&"x".repeat(one as usize));
        assert!(store.put("r5", big.clone()));
        let (n, bytes) = store.usage();
        assert!(bytes <= 3 * one && n == 2, "{n} {bytes}");
        assert_eq!(store.get("r5").as_deref(), Some(&big));
    }

    #[test]
    fn a_conversation_over_the_limit_is_not_kept_and_a_limit_of_0_keeps_none() {
        let store = ResponseStore::new(bytes_of(&conversation("a")));
        assert!(store.put("r1", conversation("a")));
        assert!(!store.put("r2", conversation("longer than the limit")));
        assert!(store.get("r2").is_none());
        assert!(store.get("r1").is_some(), "a refused one drops nothing");
        let none = ResponseStore::new(0);
        assert!(!none.put("r1", conversation("a")));
        assert_eq!(none.usage(), (0, 0));
    }

    #[test]
    fn storing_an_id_again_replaces_it() {
        let store = ResponseStore::new(1 << 20);
        store.put("r1", conversation("a"));
        store.put("r1", conversation("b"));
        assert_eq!(store.usage().0, 1);
        assert_eq!(store.get("r1").unwrap()[0].content, "b");
    }
}
