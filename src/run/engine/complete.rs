//! Text from the engine: token ids -> text pieces, stop strings, harmony channels and
//! log-probabilities with token texts ([`Engine::complete`], what `run`, `chat` and `serve`
//! use).

use super::{Completion, Engine, EngineError, Finish, Piece, Request, TokenText};
use crate::run::harmony::{Harmony, Split};
use crate::run::text::{token_bytes, Scan, StopScan, TextStream};

impl Engine<'_> {
    /// Generates text: pieces go to `on_piece` as they become final (never inside a UTF-8
    /// character or a possible stop string), which returns `false` to stop. The text ends at
    /// the end-of-sequence token, the first stop string (not included), or `max_tokens`.
    pub fn complete(
        &mut self,
        prompt: &[u32],
        req: &Request,
        on_piece: impl FnMut(&Piece) -> bool,
    ) -> Result<Completion, EngineError> {
        self.complete_until(prompt, req, &crate::progress::Silent, &|| false, on_piece)
    }

    /// [`Engine::complete`], reporting the prompt's progress to `progress` and asking
    /// `cancelled` during the prefill whether to go on ([`Engine::generate_until`]): a prefill
    /// cut short ends the completion with [`super::Finish::Cancelled`] and no text.
    pub fn complete_until(
        &mut self,
        prompt: &[u32],
        req: &Request,
        progress: &dyn crate::progress::Progress,
        cancelled: &dyn Fn() -> bool,
        mut on_piece: impl FnMut(&Piece) -> bool,
    ) -> Result<Completion, EngineError> {
        let tokenizer = self.tokenizer.clone();
        let mut stream = TextStream::new(&tokenizer);
        let mut scan = StopScan::new(&req.stop);
        // Harmony: stop strings apply to the answer; the reasoning passes through.
        let mut harmony = self.answers_in_channels(prompt).then(Harmony::new);
        let mut split = |new: &str| match harmony.as_mut() {
            Some(h) => h.push(new),
            None => Split {
                answer: new.to_string(),
                reasoning: String::new(),
            },
        };
        let mut reasoning = String::new();
        let mut text = String::new();
        let mut all_logprobs = Vec::new();
        let mut pending: Vec<TokenText> = Vec::new();
        let mut hit_stop = false;
        let mut refused = false;
        let token_text = |id: u32| tokenizer.decode(&[id], false).unwrap_or_default();
        let g = self.generate_until(prompt, req, progress, cancelled, |t| {
            if let Some(lp) = &t.logprobs {
                pending.push(TokenText {
                    token: token_text(t.id),
                    bytes: token_bytes(&tokenizer, t.id),
                    logprob: lp.logprob,
                    top: lp
                        .top
                        .iter()
                        .map(|&(i, p)| (token_text(i), p, token_bytes(&tokenizer, i)))
                        .collect(),
                });
            }
            let Some(new) = stream.push(t.id) else {
                return true;
            };
            let new = split(&new);
            let (out, stop) = match scan.push(&new.answer) {
                Scan::Send(s) => (s, false),
                Scan::Stop(s) => (s, true),
            };
            if out.is_empty() && new.reasoning.is_empty() && !stop {
                return true;
            }
            let piece = Piece {
                text: out,
                reasoning: new.reasoning,
                logprobs: std::mem::take(&mut pending),
            };
            text.push_str(&piece.text);
            reasoning.push_str(&piece.reasoning);
            all_logprobs.extend(piece.logprobs.iter().cloned());
            if stop {
                hit_stop = true;
                if !piece.text.is_empty() || !piece.logprobs.is_empty() {
                    on_piece(&piece);
                }
                return false;
            }
            if !on_piece(&piece) {
                refused = true;
                return false;
            }
            true
        })?;
        if !hit_stop && !refused {
            let mut tail = String::new();
            let mut rest = split(&stream.finish().unwrap_or_default());
            if let Some(h) = harmony.as_mut() {
                let last = h.finish();
                rest.answer.push_str(&last.answer);
                rest.reasoning.push_str(&last.reasoning);
            }
            match scan.push(&rest.answer) {
                Scan::Send(s) => tail.push_str(&s),
                Scan::Stop(s) => {
                    tail.push_str(&s);
                    hit_stop = true;
                }
            }
            if !hit_stop {
                tail.push_str(&scan.finish());
            }
            if !tail.is_empty() || !rest.reasoning.is_empty() || !pending.is_empty() {
                let piece = Piece {
                    text: tail,
                    reasoning: rest.reasoning,
                    logprobs: std::mem::take(&mut pending),
                };
                text.push_str(&piece.text);
                reasoning.push_str(&piece.reasoning);
                all_logprobs.extend(piece.logprobs.iter().cloned());
                on_piece(&piece);
            }
        }
        let (g, at_first_token, cpu_s) = (g.generation, g.at_first_token, g.cpu_s);
        let finish = if hit_stop {
            Finish::Stop
        } else if refused {
            Finish::Cancelled
        } else {
            match g.stats.stop_reason.as_str() {
                "eos" => Finish::Stop,
                "stopped" => Finish::Cancelled,
                _ => Finish::Length,
            }
        };
        Ok(Completion {
            text,
            reasoning,
            finish,
            stop_string: scan.matched().map(str::to_string),
            prompt_tokens: prompt.len(),
            completion_tokens: g.tokens.len(),
            cached_tokens: g.cached_tokens,
            logprobs: all_logprobs,
            stats: g.stats,
            tokens: g.tokens,
            at_first_token,
            cpu_s,
        })
    }
}
