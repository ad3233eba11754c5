//! Text out of generated ids: incremental decoding and stop strings.
//!
//! In: token ids as they are generated. Out: text pieces that, joined, equal
//! `tokenizer.decode(ids)` (up to a stop string, which is cut with everything after it).
//! Invariant: a piece never ends inside a UTF-8 character the next token may complete, and
//! never ends with text that may be the start of a stop string: what a client is sent is never
//! taken back.

/// The text of generated ids as it streams: [`TextStream::push`] gives what is new since the
/// last piece, holding back a trailing incomplete UTF-8 sequence (which decodes to U+FFFD) until
/// its next byte arrives; [`TextStream::finish`] gives what is left, a final incomplete sequence
/// as U+FFFD. All pieces together equal `tokenizer.decode(ids)`, as mlx-lm prints.
pub struct TextStream {
    tokenizer: std::sync::Arc<tokenizers::Tokenizer>,
    ids: Vec<u32>,
    printed: usize,
}

impl TextStream {
    pub fn new(tokenizer: std::sync::Arc<tokenizers::Tokenizer>) -> Self {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            printed: 0,
        }
    }

    /// The ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn push(&mut self, id: u32) -> Option<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, false).ok()?;
        if text.ends_with('\u{FFFD}') {
            return None;
        }
        self.piece(text)
    }

    pub fn finish(&mut self) -> Option<String> {
        let text = self.tokenizer.decode(&self.ids, false).ok()?;
        self.piece(text)
    }

    fn piece(&mut self, text: String) -> Option<String> {
        let rest = text
            .get(self.printed..)
            .filter(|r| !r.is_empty())?
            .to_string();
        self.printed = text.len();
        Some(rest)
    }
}

/// What [`StopScan::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// Text that is safe to send (possibly empty: all of it may start a stop string).
    Send(String),
    /// A stop string completed: send this text, the part before it, and stop.
    Stop(String),
}

/// Finds stop strings in streamed text (OpenAI's `stop`): text that may still grow into a stop
/// string is held back; a completed one ends the text just before it.
#[derive(Debug, Default)]
pub struct StopScan {
    stops: Vec<String>,
    text: String,
    sent: usize,
    /// The stop string that ended the text, once one has.
    matched: Option<String>,
}

impl StopScan {
    /// Empty stop strings are ignored (they would stop before any text).
    pub fn new(stops: &[String]) -> StopScan {
        StopScan {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            text: String::new(),
            sent: 0,
            matched: None,
        }
    }

    /// The stop string that ended the text (Anthropic's `stop_sequence`), if one did.
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }

    pub fn push(&mut self, piece: &str) -> Scan {
        self.text.push_str(piece);
        let rest = &self.text[self.sent..];
        // The earliest stop string to complete (the longest where two start together).
        let hit = self
            .stops
            .iter()
            .filter_map(|s| {
                rest.find(s.as_str())
                    .map(|i| (i, std::cmp::Reverse(s.len())))
            })
            .min();
        if let Some((i, std::cmp::Reverse(len))) = hit {
            self.matched = Some(rest[i..i + len].to_string());
            let out = rest[..i].to_string();
            self.sent = self.text.len();
            return Scan::Stop(out);
        }
        // Hold back the longest tail of `rest` that begins some stop string.
        let hold = rest
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &rest[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .map_or(0, |i| rest.len() - i);
        let out = rest[..rest.len() - hold].to_string();
        self.sent += out.len();
        Scan::Send(out)
    }

    /// The held-back text, once generation ended without completing a stop string.
    pub fn finish(&mut self) -> String {
        let out = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        out
    }
}

/// The raw bytes of one token, as OpenAI's `bytes` field carries them: the bytes of its text,
/// or for a token that is part of a UTF-8 character (its text alone decodes to U+FFFD), the
/// bytes it stands for: a byte-level BPE token's characters mapped back through GPT-2's byte
/// alphabet, or a SentencePiece byte-fallback token `<0xE4>`. Two byte tokens thus never look
/// the same, and a character's tokens joined give its bytes.
pub fn token_bytes(tokenizer: &tokenizers::Tokenizer, id: u32) -> Vec<u8> {
    let text = tokenizer.decode(&[id], false).unwrap_or_default();
    if !text.contains('\u{FFFD}') {
        return text.into_bytes();
    }
    let Some(piece) = tokenizer.id_to_token(id) else {
        return text.into_bytes();
    };
    if let Some(byte) = piece
        .strip_prefix("<0x")
        .and_then(|h| h.strip_suffix('>'))
        .and_then(|h| u8::from_str_radix(h, 16).ok())
    {
        return vec![byte];
    }
    piece
        .chars()
        .map(byte_level_byte)
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| text.into_bytes())
}

/// The byte a character of GPT-2's byte-level alphabet stands for (`bytes_to_unicode` in
/// openai/gpt-2's encoder.py): printable bytes are themselves, the other 68 bytes are the
/// characters from U+0100 up, in byte order.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let c = c as u32;
    if c < 256 {
        return printable(c).then_some(c as u8);
    }
    (0..256u32)
        .filter(|&b| !printable(b))
        .nth((c - 256) as usize)
        .map(|b| b as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Item 5 of issue 33: the three byte tokens of 中 each decode to U+FFFD; their own bytes
    /// differ and join to the character's.
    #[test]
    fn byte_tokens_carry_their_own_bytes() {
        let tok = tokenizers::Tokenizer::from_file(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures/qwen3moe-tiny/tokenizer.json"),
        )
        .unwrap();
        let ids = tok.encode("The 中", false).unwrap().get_ids().to_vec();
        let tok = std::sync::Arc::new(tok);
        let bytes: Vec<Vec<u8>> = ids.iter().map(|&i| token_bytes(&tok, i)).collect();
        assert_eq!(bytes[0], b"The");
        assert_eq!(bytes[1], b" ");
        assert_eq!(bytes[2..].concat(), "中".as_bytes());
        assert_eq!(bytes[2], [0xE4]);
        // Every byte of the alphabet maps back to itself.
        for b in 0..=255u8 {
            let c = if (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174 {
                b as u32
            } else {
                256 + (0..b)
                    .filter(|&x| !((33..=126).contains(&x) || (161..=172).contains(&x) || x >= 174))
                    .count() as u32
            };
            assert_eq!(byte_level_byte(char::from_u32(c).unwrap()), Some(b));
        }
    }

    /// "The 中" in the bundled tokenizer is The, Ġ, then the three byte tokens of 中
    /// (0xE4 0xB8 0xAD): the partial character is held back until complete, and a generation
    /// that stops inside it ends with U+FFFD, as `decode` gives it.
    #[test]
    fn streamed_text_holds_back_partial_characters_and_flushes_the_tail() {
        let tok = tokenizers::Tokenizer::from_file(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures/qwen3moe-tiny/tokenizer.json"),
        )
        .unwrap();
        let ids = tok.encode("The 中", false).unwrap().get_ids().to_vec();
        let tok = std::sync::Arc::new(tok);
        assert_eq!(ids.len(), 5, "{ids:?}");
        let mut s = TextStream::new(tok.clone());
        let pieces: Vec<Option<String>> = ids.iter().map(|&i| s.push(i)).collect();
        assert_eq!(pieces[0].as_deref(), Some("The"));
        assert_eq!(pieces[1].as_deref(), Some(" "));
        assert_eq!((&pieces[2], &pieces[3]), (&None, &None), "held back");
        assert_eq!(pieces[4].as_deref(), Some("中"));
        assert_eq!(s.finish(), None);
        // Stopped after the first byte of the character: the tail is flushed as U+FFFD.
        let mut s = TextStream::new(tok.clone());
        let mut out = String::new();
        for &i in &ids[..3] {
            out.extend(s.push(i));
        }
        out.extend(s.finish());
        assert_eq!(out, tok.decode(&ids[..3], false).unwrap());
        assert!(out.ends_with('\u{FFFD}'), "{out:?}");
    }

    fn scan(stops: &[&str], pieces: &[&str]) -> (Vec<Scan>, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = StopScan::new(&stops);
        let out: Vec<Scan> = pieces.iter().map(|p| s.push(p)).collect();
        let tail = s.finish();
        (out, tail)
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_held_back_then_cut() {
        let (out, _) = scan(&["\nUser:"], &["Hi", " there\n", "Us", "er: more"]);
        assert_eq!(
            out,
            vec![
                Scan::Send("Hi".into()),
                Scan::Send(" there".into()),
                Scan::Send(String::new()),
                Scan::Stop(String::new()),
            ]
        );
    }

    #[test]
    fn held_back_text_that_does_not_complete_a_stop_is_sent_later_or_at_the_end() {
        let (out, tail) = scan(&["END"], &["a E", "x", " EN"]);
        assert_eq!(
            out,
            vec![
                Scan::Send("a ".into()),
                Scan::Send("Ex".into()),
                Scan::Send(" ".into())
            ]
        );
        assert_eq!(tail, "EN");
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_multibyte_text_is_cut_on_characters() {
        let (out, _) = scan(&["é!", "b"], &["中a", "é!b"]);
        assert_eq!(
            out,
            vec![Scan::Send("中a".into()), Scan::Stop(String::new())]
        );
        let (out, tail) = scan(&["中文"], &["x中"]);
        assert_eq!(out, vec![Scan::Send("x".into())]);
        assert_eq!(tail, "中");
        // Empty stop strings are ignored.
        let (out, _) = scan(&[""], &["text"]);
        assert_eq!(out, vec![Scan::Send("text".into())]);
    }
}
