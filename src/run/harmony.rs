//! OpenAI's harmony output format (gpt-oss): generated text -> the answer and the rest.
//!
//! In: the generated text as it streams, special tokens included (the prompt ended with
//! `<|start|>assistant`, so the text opens with the first message's header). A message is
//! `HEADER<|message|>BODY` ended by `<|end|>`, `<|return|>` or `<|call|>`; the next one starts
//! with `<|start|>`; a header names the channel after `<|channel|>` (`analysis`, `commentary`,
//! `final`), and may name a recipient (` to=functions.x`) or a format (`<|constrain|>json`).
//! Out: per piece of text, what belongs to the `final` channel (the answer) and what belongs to
//! the others (reasoning, tool-call preambles); a message to a function (a tool call) goes to the
//! answer whole, as `<|start|>assistant{header}<|message|>{body}<|call|>`, for `serve` to parse. Invariant: no text is dropped but the framing
//! (headers and markers); a body never ends inside a marker that a later piece completes;
//! what was given out is never taken back. docs/decisions/0011-harmony-output.md says how
//! `run`, `chat` and `serve` show the two parts.

/// What ends a message to a function, in the answer given out for it.
const CALL_END: &str = "<|call|>";

/// Tokens that end a message's body.
const BODY_ENDS: [&str; 3] = ["<|end|>", "<|return|>", "<|call|>"];

/// The answer and the rest of a piece of harmony text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// Text of the `final` channel.
    pub answer: String,
    /// Text of the other channels (`analysis`, `commentary`).
    pub reasoning: String,
}

#[derive(Debug)]
enum State {
    /// Reading a header, up to `<|message|>`.
    Header,
    /// Reading a body of the `final` channel (true) or of another; `call`: a message to a
    /// function (` to=functions.x`), which goes to the answer framed as harmony writes it, for
    /// a server to parse into a tool call (`serve/tools.rs`).
    Body { answer: bool, call: bool },
}

/// Splits streamed harmony text into channels.
#[derive(Debug)]
pub struct Harmony {
    state: State,
    /// Text not yet given out: a header in progress, or a body's tail that may start a marker.
    held: String,
}

impl Default for Harmony {
    fn default() -> Self {
        Harmony::new()
    }
}

impl Harmony {
    /// For text that follows a prompt ending with `<|start|>assistant` (the harmony template's
    /// generation prompt): the first header is under way.
    pub fn new() -> Harmony {
        Harmony {
            state: State::Header,
            held: String::new(),
        }
    }

    /// The parts of `text` that are now certain.
    pub fn push(&mut self, text: &str) -> Split {
        self.held.push_str(text);
        let mut out = Split::default();
        loop {
            match self.state {
                State::Header => {
                    let Some(at) = self.held.find("<|message|>") else {
                        return out;
                    };
                    let header = &self.held[..at];
                    let call = header.contains("to=functions.");
                    let answer = call || channel(header) == Some("final");
                    if call {
                        // After `<|end|><|start|>` the header begins with the role.
                        let header = header.strip_prefix("assistant").unwrap_or(header);
                        out.answer
                            .push_str(&format!("<|start|>assistant{header}<|message|>"));
                    }
                    self.held.drain(..at + "<|message|>".len());
                    self.state = State::Body { answer, call };
                }
                State::Body { answer, call } => {
                    let end = BODY_ENDS
                        .iter()
                        .filter_map(|m| self.held.find(m).map(|at| (at, m.len())))
                        .min();
                    let (body, rest) = match end {
                        Some((at, len)) => {
                            let body = self.held[..at].to_string();
                            self.held.drain(..at + len);
                            // <|end|><|start|>: the next header follows.
                            if let Some(r) = self.held.strip_prefix("<|start|>") {
                                self.held = r.to_string();
                            }
                            self.state = State::Header;
                            (body, true)
                        }
                        None => {
                            // Hold back a tail that may grow into a marker.
                            let keep = marker_prefix_len(&self.held);
                            let cut = self.held.len() - keep;
                            let body = self.held[..cut].to_string();
                            self.held.drain(..cut);
                            (body, false)
                        }
                    };
                    if answer {
                        out.answer.push_str(&body);
                        if call && rest {
                            out.answer.push_str(CALL_END);
                        }
                    } else {
                        out.reasoning.push_str(&body);
                    }
                    if !rest {
                        return out;
                    }
                }
            }
        }
    }

    /// What is left when generation ends: a held tail of a body goes where its body went; a
    /// header that never reached `<|message|>` is dropped when it is framing (it names a
    /// channel or starts a message), and given out as answer otherwise (a model that wrote no
    /// harmony), so no text is lost.
    pub fn finish(&mut self) -> Split {
        let rest = std::mem::take(&mut self.held);
        match self.state {
            State::Body { call: true, .. } => Split {
                answer: format!("{rest}{CALL_END}"),
                reasoning: String::new(),
            },
            State::Body { answer: false, .. } => Split {
                answer: String::new(),
                reasoning: rest,
            },
            State::Header if rest.contains("<|channel|>") || rest.starts_with("<|start|>") => {
                Split::default()
            }
            _ => Split {
                answer: rest,
                reasoning: String::new(),
            },
        }
    }
}

/// The channel a header names (`<|channel|>analysis`, `<|channel|>commentary to=functions.x`,
/// `<|channel|>commentary<|constrain|>json`).
fn channel(header: &str) -> Option<&str> {
    let after = header.split_once("<|channel|>")?.1;
    let end = after
        .find(|c: char| c.is_whitespace() || c == '<')
        .unwrap_or(after.len());
    Some(&after[..end])
}

/// Length of the longest suffix of `text` that is a proper prefix of a body-ending marker.
fn marker_prefix_len(text: &str) -> usize {
    BODY_ENDS
        .iter()
        .flat_map(|m| (1..m.len()).map(move |n| &m[..n]))
        .filter(|p| text.ends_with(p))
        .map(str::len)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str = "<|channel|>analysis<|message|>User says hi. Reply.<|end|>\
                          <|start|>assistant<|channel|>final<|message|>Hello! How can I help?\
                          <|return|>";

    fn split_all(pieces: &[&str]) -> Split {
        let mut h = Harmony::new();
        let mut all = Split::default();
        for p in pieces {
            let s = h.push(p);
            all.answer.push_str(&s.answer);
            all.reasoning.push_str(&s.reasoning);
        }
        let s = h.finish();
        all.answer.push_str(&s.answer);
        all.reasoning.push_str(&s.reasoning);
        all
    }

    /// The analysis channel and the final one come apart, whether the text arrives at once,
    /// a character at a time, or token by token.
    #[test]
    fn splits_analysis_from_the_final_answer_however_the_text_arrives() {
        let want = Split {
            answer: "Hello! How can I help?".into(),
            reasoning: "User says hi. Reply.".into(),
        };
        assert_eq!(split_all(&[ANSWER]), want);
        let chars: Vec<String> = ANSWER.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(split_all(&refs), want);
        let tokens = [
            "<|channel|>",
            "analysis",
            "<|message|>",
            "User says",
            " hi. Reply.",
            "<|end|>",
            "<|start|>",
            "assistant",
            "<|channel|>",
            "final",
            "<|message|>",
            "Hello!",
            " How can I help?",
            "<|return|>",
        ];
        assert_eq!(split_all(&tokens), want);
    }

    /// A body is given out as it streams, except a tail that may start `<|end|>`; a text that
    /// merely looks like one is given out once it cannot be.
    #[test]
    fn streams_bodies_and_holds_only_a_possible_marker() {
        let mut h = Harmony::new();
        assert_eq!(h.push("<|channel|>final<|message|>a <").answer, "a ");
        assert_eq!(h.push("|e").answer, "");
        assert_eq!(h.push("x").answer, "<|ex");
        assert_eq!(h.push("<|end|>").answer, "");
        assert_eq!(h.finish(), Split::default());
    }

    /// A tool call (a message to `functions.x`) goes to the answer framed as harmony writes
    /// it, ended by `<|call|>` whether or not the text has it (it is an end-of-sequence token);
    /// a preamble in the commentary channel stays reasoning. Text with no harmony framing at
    /// all is the answer.
    #[test]
    fn tool_calls_go_to_the_answer_framed_and_plain_text_is_the_answer() {
        let header = "<|channel|>commentary to=functions.get_weather <|constrain|>json";
        let call = format!("{header}<|message|>{{\"city\": \"Paris\"}}");
        let framed = format!("<|start|>assistant{call}<|call|>");
        for text in [call.clone(), format!("{call}<|call|>")] {
            let pieces: Vec<String> = text.chars().map(String::from).collect();
            let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
            assert_eq!(
                split_all(&pieces),
                Split {
                    answer: framed.clone(),
                    reasoning: String::new(),
                }
            );
        }
        let preamble = "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant";
        assert_eq!(
            split_all(&[preamble, &call]),
            Split {
                answer: framed,
                reasoning: "Checking.".into(),
            }
        );
        assert_eq!(split_all(&["just text"]).answer, "just text");
    }
}
