//! Several completions at once through the engine (`serve --decode-concurrency`): each a
//! [`EngineLane`], a `run::lanes::Lane` with its text ([`TextPipe`]). A lane starts from the
//! engine's prompt cache like any request, decodes with the others, and gives its cache back
//! to the prompt cache when it ends.

use std::cell::Cell;
use std::rc::Rc;

use super::complete::TextPipe;
use super::{Completion, CpuSeconds, Engine, EngineError, Piece, Request, Watch};
use crate::progress::{Progress, Silent};
use crate::run::generate::{GenerateOptions, Prefix};
use crate::run::lanes::{self, Lane};

/// One completion decoding beside others.
pub struct EngineLane {
    lane: Lane,
    text: TextPipe,
    prompt_tokens: usize,
}

impl EngineLane {
    /// Whether its text has ended.
    pub fn done(&self) -> bool {
        self.lane.done()
    }

    /// How many positions of its prompt the prompt cache gave.
    pub fn cached(&self) -> usize {
        self.lane.cached()
    }
}

impl Engine<'_> {
    /// Whether this engine can decode several sequences at once (`Model::batches_rows`).
    pub fn batches(&self) -> bool {
        self.model.batches_rows()
    }

    /// How `req` generates on this engine (one request, or one lane).
    pub(super) fn options(&self, req: &Request) -> GenerateOptions {
        GenerateOptions {
            max_tokens: req.max_tokens,
            sampler: req.sampler,
            // One chunk must not route to more distinct experts than the smallest pool holds.
            // Under a budget a chunk may route to more experts than fit: the store then loads
            // and runs them group by group, each expert read at most once per chunk.
            prefill_chunk: self.prefill_chunk,
            eos: self.eos.clone(),
            host_sampling: self.host_sampling,
        }
    }

    /// Prefills `prompt` from the best prefix the prompt cache holds (as
    /// [`Engine::generate_until`] does) into a new lane; `None` when `cancelled` said so during
    /// the prefill. Its first token comes with the next [`Engine::step_lanes`]. Warnings (the
    /// memory-pressure floor) go to `progress`.
    pub fn start_lane(
        &mut self,
        prompt: &[u32],
        req: &Request,
        progress: &dyn Progress,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Option<EngineLane>, EngineError> {
        let opts = self.options(req);
        let logprobs = req.logprobs.map(|n| n.min(super::MAX_TOP_LOGPROBS));
        let text = TextPipe::new(
            self.tokenizer.clone(),
            &req.stop,
            self.answers_in_channels(prompt),
        );
        self.prompts.choose(&mut self.prefix, prompt);
        let prefix = std::mem::take(&mut self.prefix);
        let mut gate = Watch {
            streaming: &mut self.experts,
            resident: &mut self.resident,
            engine_streaming: &mut self.streaming,
            pressure: self.pressure.as_mut(),
            layout: &self.layout,
            progress,
            first_token: Rc::new(Cell::new(false)),
            cancelled,
            stopped: false,
            at_first_token: None,
        };
        match Lane::start(
            &self.model,
            &mut gate,
            prefix,
            prompt,
            &opts,
            logprobs,
            &Silent,
        ) {
            Ok(lane) => Ok(Some(EngineLane {
                lane,
                text,
                prompt_tokens: prompt.len(),
            })),
            Err(_) if gate.stopped => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// One decode step of every lane not yet done (`run::lanes::step`): each one's new text
    /// goes to `on_piece(lane index, piece)`, which returns `false` to end that lane. Warnings
    /// go to `progress`.
    pub fn step_lanes(
        &mut self,
        lanes: &mut [&mut EngineLane],
        progress: &dyn Progress,
        on_piece: &mut dyn FnMut(usize, &Piece) -> bool,
    ) -> Result<(), EngineError> {
        let mut gate = Watch {
            streaming: &mut self.experts,
            resident: &mut self.resident,
            engine_streaming: &mut self.streaming,
            pressure: self.pressure.as_mut(),
            layout: &self.layout,
            progress,
            first_token: Rc::new(Cell::new(true)),
            cancelled: &|| false,
            stopped: false,
            at_first_token: None,
        };
        let (mut inner, mut texts): (Vec<&mut Lane>, Vec<&mut TextPipe>) =
            lanes.iter_mut().map(|l| (&mut l.lane, &mut l.text)).unzip();
        lanes::step(&self.model, &mut gate, &mut inner, &mut |i, t| {
            texts[i].push(t, &mut |p| on_piece(i, p))
        })?;
        Ok(())
    }

    /// Ends `lane` (done or not): the rest of its text goes to `on_piece`, its cache to the
    /// prompt cache, and its completion back.
    pub fn end_lane(
        &mut self,
        lane: EngineLane,
        on_piece: &mut dyn FnMut(&Piece) -> bool,
    ) -> Result<Completion, EngineError> {
        let EngineLane {
            lane,
            mut text,
            prompt_tokens,
        } = lane;
        let (generation, prefix) = lane.finish()?;
        text.finish(on_piece);
        self.keep_prefix(prefix);
        Ok(text.completion(generation, prompt_tokens, None, CpuSeconds::default()))
    }

    /// Makes `prefix` the held conversation, the one held before going to the prompt cache.
    fn keep_prefix(&mut self, prefix: Prefix) {
        if prefix.is_empty() {
            return;
        }
        let old = std::mem::replace(&mut self.prefix, prefix);
        self.prompts.keep(old);
    }
}
