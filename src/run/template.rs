//! Chat templates: a conversation becomes prompt text through the pack's Hugging Face template
//! (minijinja), or a plain transcript for packs that carry none.
//!
//! In: messages (role, content) and the pack's special tokens. Out: the prompt text, ending with
//! the assistant's turn when `add_generation_prompt` is set.
//! Invariant: rendering the conversation so far and then the same conversation with one more
//! turn gives texts that share the first as a prefix wherever the template allows it, which is
//! what lets the KV cache be reused across turns (prefix reuse, `generate.rs`).

use crate::format::Pack;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    #[error("the pack's chat template does not parse; use --raw")]
    Parse(#[source] minijinja::Error),
    #[error("the pack's chat template failed to render; use --raw")]
    Render(#[source] minijinja::Error),
}

/// For packs without a chat template (base models such as the bundled tiny one): a transcript
/// of `User:` / `Assistant:` lines after the system text, ending with `Assistant:`. An answer is
/// rendered trimmed after `Assistant: `, which is the text the model generated after
/// `Assistant:` (its first token carries the space), so the next turn's prompt starts with the
/// tokens already in the KV cache.
/// [`PLAIN_STOP`] ends an answer where the model starts the user's next line.
pub const PLAIN_TEMPLATE: &str = "{% for m in messages %}\
{% if m.role == 'system' %}{{ m.content }}\n\n\
{% elif m.role == 'user' %}User: {{ m.content }}\n\
{% else %}Assistant: {{ m.content | trim }}\n{% endif %}\
{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}";

/// The stop string that goes with [`PLAIN_TEMPLATE`].
pub const PLAIN_STOP: &str = "\nUser:";

/// A pack's chat template (or [`PLAIN_TEMPLATE`]) with the special tokens it may use.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    plain: bool,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// The pack's own template; `None` if it has none.
    pub fn of_pack(pack: &Pack) -> Option<ChatTemplate> {
        let source = crate::run::open::chat_template(pack)?;
        Some(ChatTemplate::new(source, false, pack))
    }

    /// The pack's template, else the plain transcript.
    pub fn of_pack_or_plain(pack: &Pack) -> ChatTemplate {
        ChatTemplate::of_pack(pack)
            .unwrap_or_else(|| ChatTemplate::new(PLAIN_TEMPLATE.into(), true, pack))
    }

    fn new(source: String, plain: bool, pack: &Pack) -> ChatTemplate {
        let token = |key: &str| pack.meta().special_token(key).unwrap_or("").to_string();
        ChatTemplate {
            source,
            plain,
            bos: token("bos_token"),
            eos: token("eos_token"),
        }
    }

    /// Whether this is the plain transcript (the pack has no template).
    pub fn is_plain(&self) -> bool {
        self.plain
    }

    /// Stop strings an answer needs beyond the model's end-of-sequence tokens.
    pub fn stops(&self) -> Vec<String> {
        if self.plain {
            vec![PLAIN_STOP.to_string()]
        } else {
            Vec::new()
        }
    }

    /// The prompt text for `messages`, ending with the assistant's turn.
    pub fn render(&self, messages: &[Message]) -> Result<String, TemplateError> {
        let mut env = minijinja::Environment::new();
        env.add_template("chat", &self.source)
            .map_err(TemplateError::Parse)?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(TemplateError::Render)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain() -> ChatTemplate {
        ChatTemplate {
            source: PLAIN_TEMPLATE.into(),
            plain: true,
            bos: String::new(),
            eos: String::new(),
        }
    }

    #[test]
    fn the_plain_transcript_renders_turns_and_each_turn_extends_the_last() {
        let t = plain();
        let one = [
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
        ];
        let first = t.render(&one).unwrap();
        assert_eq!(first, "Be brief.\n\nUser: Hi\nAssistant:");
        let two = [
            one[0].clone(),
            one[1].clone(),
            Message::new("assistant", " Hello."),
            Message::new("user", "Bye"),
        ];
        let second = t.render(&two).unwrap();
        assert!(second.starts_with(&first), "{second:?}");
        assert!(
            second.ends_with("Assistant: Hello.\nUser: Bye\nAssistant:"),
            "{second:?}"
        );
        assert_eq!(t.stops(), vec!["\nUser:".to_string()]);
    }

    #[test]
    fn a_broken_template_is_an_error_that_names_it() {
        let t = ChatTemplate {
            source: "{% for m in messages %}".into(),
            plain: false,
            bos: String::new(),
            eos: String::new(),
        };
        let err = t.render(&[Message::new("user", "x")]).unwrap_err();
        assert!(matches!(err, TemplateError::Parse(_)), "{err}");
    }
}
