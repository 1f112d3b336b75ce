//! A one-pass scanner for the common shape of a base64 response message: the fast path of
//! [`super::Decoder::response`].
//!
//! serde_json checks every byte of the 4 kB base64 string for quotes and escapes, and even with that
//! value cut out, its derived struct parse (after two substring searches and a copy of the rest) took a
//! large share of the responses thread at d = 768; with this scanner, a zero-free decode buffer and the
//! bitwise finite check, decoding a d = 768 response went from 2.1–2.4 to 1.6–1.9 µs (docs/bench/history.md,
//! "Daemon" §1, third round). The scanner walks the top-level object once: keys and the schema/id values
//! must be plain strings (no escape, no control character), `embedding_b64` a string whose end is found
//! with `memchr` (its decoder then accepts only the base64 alphabet), and `metadata` an object or `null`, captured by serde_json
//! itself (same parser, same raw text as the plain parse).
//!
//! It never decides a rejection: any deviation (an unknown, duplicate or escaped key, another value type,
//! a missing field, trailing bytes, invalid UTF-8 in what it reads) returns `None`, and the plain serde
//! parse decides, with its exact error. A differential property test checks both paths give identical
//! results on near-valid messages.

use serde::Deserialize as _;
use serde_json::value::RawValue;

/// The fields of a response as the plain parse would produce them, `embedding_b64` still encoded.
pub(super) struct Scanned<'a> {
    pub schema: &'a str,
    pub prompt_id: &'a str,
    pub response_id: &'a str,
    pub embedding_b64: &'a [u8],
    pub metadata: Option<Box<RawValue>>,
}

/// Scans `bytes` (the whole payload); `None` when the message is not of the plain shape.
pub(super) fn scan(bytes: &[u8]) -> Option<Scanned<'_>> {
    let mut s = Cursor { bytes, at: 0 };
    let (mut schema, mut prompt_id, mut response_id, mut b64) = (None, None, None, None);
    let mut metadata: Option<Option<Box<RawValue>>> = None;
    s.ws();
    s.eat(b'{')?;
    loop {
        s.ws();
        s.eat(b'"')?;
        // Matched as bytes: every accepted key is ASCII, anything else is left to the plain parse.
        let key = s.plain_bytes()?;
        s.ws();
        s.eat(b':')?;
        s.ws();
        // A key seen twice is a serde error ("duplicate field"): left to the plain parse.
        match key {
            b"schema" => set(&mut schema, s.plain_string_value()?)?,
            b"prompt_id" => set(&mut prompt_id, s.plain_string_value()?)?,
            b"response_id" => set(&mut response_id, s.plain_string_value()?)?,
            b"embedding_b64" => {
                s.eat(b'"')?;
                let start = s.at;
                // The base64 alphabet holds neither a quote nor a backslash: if the value holds an escape,
                // its decoding fails and the plain parse decides.
                let len = memchr::memchr(b'"', &bytes[start..])?;
                s.at = start + len + 1;
                set(&mut b64, &bytes[start..start + len])?
            }
            b"metadata" => set(&mut metadata, s.metadata()?)?,
            _ => return None,
        }
        s.ws();
        match s.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    s.ws();
    if s.at != bytes.len() {
        return None;
    }
    Some(Scanned {
        schema: schema?,
        prompt_id: prompt_id?,
        response_id: response_id?,
        embedding_b64: b64?,
        metadata: metadata.flatten(),
    })
}

fn set<T>(slot: &mut Option<T>, v: T) -> Option<()> {
    match slot {
        Some(_) => None,
        None => {
            *slot = Some(v);
            Some(())
        }
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    /// Skips JSON whitespace (exactly the four bytes JSON allows).
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    fn next(&mut self) -> Option<u8> {
        let c = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(c)
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    /// The rest of a string whose opening quote was eaten, when it holds no escape and no control
    /// character (both valid in other forms JSON allows, left to serde). A byte loop: keys and ids are
    /// short, where `memchr` and `from_utf8` cost more in set-up than they save.
    fn plain_bytes(&mut self) -> Option<&'a [u8]> {
        let rest = &self.bytes[self.at..];
        let mut len = 0;
        loop {
            match *rest.get(len)? {
                b'"' => break,
                b'\\' | 0..0x20 => return None,
                _ => len += 1,
            }
        }
        self.at += len + 1;
        Some(&rest[..len])
    }

    /// [`Self::plain_bytes`] as text (valid UTF-8).
    fn plain_string(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.plain_bytes()?).ok()
    }

    fn plain_string_value(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        self.plain_string()
    }

    /// `metadata`'s value: an object, captured as serde_json's raw value (the same text the plain parse
    /// keeps), or `null` (absent). Anything else is left to the plain parse.
    fn metadata(&mut self) -> Option<Option<Box<RawValue>>> {
        let rest = &self.bytes[self.at..];
        match rest.first()? {
            b'{' => {
                let mut de = serde_json::Deserializer::from_slice(rest);
                let raw = Box::<RawValue>::deserialize(&mut de).ok()?;
                // The raw text starts at the value (no whitespace was left before it) and ends with it.
                self.at += raw.get().len();
                Some(Some(raw))
            }
            _ if rest.starts_with(b"null") => {
                self.at += 4;
                Some(None)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(s: &str) -> Option<(String, String, String, String, Option<String>)> {
        scan(s.as_bytes()).map(|f| {
            (
                f.schema.to_string(),
                f.prompt_id.to_string(),
                f.response_id.to_string(),
                String::from_utf8(f.embedding_b64.to_vec()).unwrap(),
                f.metadata.map(|m| m.get().to_string()),
            )
        })
    }

    #[test]
    fn reads_the_plain_shape_in_any_order_and_spacing() {
        let want = |m: Option<&str>| {
            Some((
                "s".to_string(),
                "p".to_string(),
                "r".to_string(),
                "QUJD".to_string(),
                m.map(str::to_string),
            ))
        };
        assert_eq!(
            fields(r#"{"schema":"s","prompt_id":"p","response_id":"r","embedding_b64":"QUJD"}"#),
            want(None)
        );
        assert_eq!(
            fields(
                " \r\n{ \"embedding_b64\" : \"QUJD\" ,\t\"metadata\": {\"k\": [1, \"a\\\"}\"]} , \"response_id\":\"r\", \"prompt_id\":\"p\",\"schema\":\"s\" }\n"
            ),
            want(Some(r#"{"k": [1, "a\"}"]}"#))
        );
        assert_eq!(
            fields(
                r#"{"metadata":null,"schema":"s","prompt_id":"p","response_id":"r","embedding_b64":"QUJD"}"#
            ),
            want(None)
        );
    }

    #[test]
    fn leaves_every_other_shape_to_the_plain_parse() {
        let base = r#""schema":"s","prompt_id":"p","response_id":"r","embedding_b64":"QUJD""#;
        for text in [
            // missing field, unknown field, duplicate field
            r#"{"schema":"s","prompt_id":"p","embedding_b64":"QUJD"}"#.to_string(),
            format!(r#"{{{base},"extra":1}}"#),
            format!(r#"{{{base},"prompt_id":"q"}}"#),
            // escapes or control characters in a key or a value, a non-string id
            format!(r#"{{{base},"metadata":{{}},"sch\u0065ma":"s"}}"#),
            r#"{"schema":"s","prompt_id":"p\u00e9","response_id":"r","embedding_b64":"QUJD"}"#
                .to_string(),
            "{\"schema\":\"s\",\"prompt_id\":\"p\t\",\"response_id\":\"r\",\"embedding_b64\":\"QUJD\"}"
                .to_string(),
            r#"{"schema":"s","prompt_id":"p","response_id":7,"embedding_b64":"QUJD"}"#.to_string(),
            // metadata not an object, or broken; embedding as an array
            format!(r#"{{{base},"metadata":[1]}}"#),
            format!(r#"{{{base},"metadata":{{"k":}}}}"#),
            format!(r#"{{{base},"metadata":nul}}"#),
            r#"{"schema":"s","prompt_id":"p","response_id":"r","embedding":[1]}"#.to_string(),
            // trailing bytes, truncation, a missing comma, not an object
            format!(r#"{{{base}}} x"#),
            format!(r#"{{{base}"#),
            r#"{"schema":"s" "prompt_id":"p","response_id":"r","embedding_b64":"QUJD"}"#.to_string(),
            format!("[{base}]"),
            "{}".to_string(),
        ] {
            assert!(fields(&text).is_none(), "{text}");
        }
        // Invalid UTF-8 in an id.
        let mut bytes = format!(r#"{{{base},"metadata":{{}}}}"#).into_bytes();
        let at = bytes.iter().position(|&c| c == b'p').unwrap() + 12;
        assert_eq!(bytes[at], b'p');
        bytes[at] = 0xff;
        assert!(scan(&bytes).is_none());
    }
}
