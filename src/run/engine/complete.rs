//! Text from the engine: token ids -> text pieces, stop strings, harmony channels and
//! log-probabilities with token texts ([`Engine::complete`], what `run`, `chat` and `serve`
//! use; [`TextPipe`] is the same for one sequence of a batch, `lanes.rs`).

use std::sync::Arc;

use super::{
    Completion, CpuSeconds, Engine, EngineError, Finish, PhaseSnapshot, Piece, Request, TokenText,
};
use crate::run::generate::{Generation, Token};
use crate::run::harmony::{Harmony, Split};
use crate::run::text::{token_bytes, Scan, StopScan, TextStream};

/// One completion's text as its tokens arrive: pieces become final (never inside a UTF-8
/// character or a possible stop string) and go to the caller's `on_piece`; the text ends at the
/// first stop string (not included). Under harmony, stop strings apply to the answer and the
/// reasoning passes through.
pub(crate) struct TextPipe {
    tokenizer: Arc<tokenizers::Tokenizer>,
    stream: TextStream,
    scan: StopScan,
    harmony: Option<Harmony>,
    reasoning: String,
    text: String,
    logprobs: Vec<TokenText>,
    pending: Vec<TokenText>,
    hit_stop: bool,
    refused: bool,
}

impl TextPipe {
    pub(crate) fn new(
        tokenizer: Arc<tokenizers::Tokenizer>,
        stops: &[String],
        harmony: bool,
    ) -> TextPipe {
        TextPipe {
            stream: TextStream::new(tokenizer.clone()),
            tokenizer,
            scan: StopScan::new(stops),
            harmony: harmony.then(Harmony::new),
            reasoning: String::new(),
            text: String::new(),
            logprobs: Vec::new(),
            pending: Vec::new(),
            hit_stop: false,
            refused: false,
        }
    }

    fn split(&mut self, new: &str) -> Split {
        match self.harmony.as_mut() {
            Some(h) => h.push(new),
            None => Split {
                answer: new.to_string(),
                reasoning: String::new(),
            },
        }
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// Records `piece` in the completion.
    fn record(&mut self, piece: &Piece) {
        self.text.push_str(&piece.text);
        self.reasoning.push_str(&piece.reasoning);
        self.logprobs.extend(piece.logprobs.iter().cloned());
    }

    /// Takes token `t`; `false` when the text is over (a stop string, or `on_piece` refused).
    pub(crate) fn push(&mut self, t: &Token, on_piece: &mut dyn FnMut(&Piece) -> bool) -> bool {
        if let Some(lp) = &t.logprobs {
            let entry = TokenText {
                token: self.token_text(t.id),
                bytes: token_bytes(&self.tokenizer, t.id),
                logprob: lp.logprob,
                top: lp
                    .top
                    .iter()
                    .map(|&(i, p)| (self.token_text(i), p, token_bytes(&self.tokenizer, i)))
                    .collect(),
            };
            self.pending.push(entry);
        }
        let Some(new) = self.stream.push(t.id) else {
            return true;
        };
        let new = self.split(&new);
        let (out, stop) = match self.scan.push(&new.answer) {
            Scan::Send(s) => (s, false),
            Scan::Stop(s) => (s, true),
        };
        if out.is_empty() && new.reasoning.is_empty() && !stop {
            return true;
        }
        let piece = Piece {
            text: out,
            reasoning: new.reasoning,
            logprobs: std::mem::take(&mut self.pending),
        };
        self.record(&piece);
        if stop {
            self.hit_stop = true;
            if !piece.text.is_empty() || !piece.logprobs.is_empty() {
                on_piece(&piece);
            }
            return false;
        }
        if !on_piece(&piece) {
            self.refused = true;
            return false;
        }
        true
    }

    /// After the last token: what the stream held back, unless the text already ended.
    pub(crate) fn finish(&mut self, on_piece: &mut dyn FnMut(&Piece) -> bool) {
        if self.hit_stop || self.refused {
            return;
        }
        let mut tail = String::new();
        let held = self.stream.finish().unwrap_or_default();
        let mut rest = self.split(&held);
        if let Some(h) = self.harmony.as_mut() {
            let last = h.finish();
            rest.answer.push_str(&last.answer);
            rest.reasoning.push_str(&last.reasoning);
        }
        match self.scan.push(&rest.answer) {
            Scan::Send(s) => tail.push_str(&s),
            Scan::Stop(s) => {
                tail.push_str(&s);
                self.hit_stop = true;
            }
        }
        if !self.hit_stop {
            tail.push_str(&self.scan.finish());
        }
        if !tail.is_empty() || !rest.reasoning.is_empty() || !self.pending.is_empty() {
            let piece = Piece {
                text: tail,
                reasoning: rest.reasoning,
                logprobs: std::mem::take(&mut self.pending),
            };
            self.record(&piece);
            on_piece(&piece);
        }
    }

    /// The completion of generation `g` of a `prompt_tokens`-token prompt, once
    /// [`TextPipe::finish`] ran.
    pub(crate) fn completion(
        self,
        g: Generation,
        prompt_tokens: usize,
        at_first_token: Option<PhaseSnapshot>,
        cpu_s: CpuSeconds,
    ) -> Completion {
        let finish = if self.hit_stop {
            Finish::Stop
        } else if self.refused {
            Finish::Cancelled
        } else {
            match g.stats.stop_reason.as_str() {
                "eos" => Finish::Stop,
                "stopped" => Finish::Cancelled,
                _ => Finish::Length,
            }
        };
        Completion {
            text: self.text,
            reasoning: self.reasoning,
            finish,
            stop_string: self.scan.matched().map(str::to_string),
            prompt_tokens,
            completion_tokens: g.tokens.len(),
            cached_tokens: g.cached_tokens,
            logprobs: self.logprobs,
            stats: g.stats,
            tokens: g.tokens,
            at_first_token,
            cpu_s,
        }
    }
}

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
        let mut pipe = TextPipe::new(
            self.tokenizer.clone(),
            &req.stop,
            self.answers_in_channels(prompt),
        );
        let g = self.generate_until(prompt, req, progress, cancelled, |t| {
            pipe.push(t, &mut on_piece)
        })?;
        pipe.finish(&mut on_piece);
        Ok(pipe.completion(g.generation, prompt.len(), g.at_first_token, g.cpu_s))
    }
}
