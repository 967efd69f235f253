//! `Quoted`: peer-supplied text (task output, status messages, task lines)
//! made safe to put in a log line. Control characters are escaped, so a
//! newline in a result cannot forge a log line of its own and an escape
//! sequence cannot repaint the operator's terminal, and the text is cut at a
//! cap, so one message cannot flood the log. Formatting is lazy: nothing is
//! done unless the line is actually logged.

use std::fmt::{self, Write};

/// Bytes of peer text quoted in one log line by default.
pub const LOG_TEXT_CAP: usize = 200;

/// Displays `text` escaped and capped (see the module docs).
pub struct Quoted<'a> {
    text: &'a str,
    cap: usize,
}

/// `text` escaped and capped at [`LOG_TEXT_CAP`] bytes.
pub fn quoted(text: &str) -> Quoted<'_> {
    Quoted {
        text,
        cap: LOG_TEXT_CAP,
    }
}

impl Quoted<'_> {
    /// The same text with another cap.
    pub fn cap(self, cap: usize) -> Self {
        Quoted { cap, ..self }
    }
}

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = 0;
        for (i, c) in self.text.char_indices() {
            if shown >= self.cap {
                return write!(f, "…(+{} bytes)", self.text.len() - i);
            }
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202e}') {
                for e in c.escape_default() {
                    f.write_char(e)?;
                }
                shown += 4;
            } else {
                f.write_char(c)?;
                shown += c.len_utf8();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn control_characters_are_escaped_and_long_text_is_cut() {
        assert_eq!(quoted("ok\nINFO forged").to_string(), "ok\\nINFO forged");
        assert_eq!(quoted("\x1b[31mred\r").to_string(), "\\u{1b}[31mred\\r");
        assert_eq!(quoted("héllo").to_string(), "héllo");
        let long = "x".repeat(1000);
        assert_eq!(
            quoted(&long).cap(10).to_string(),
            format!("{}…(+990 bytes)", "x".repeat(10))
        );
        assert_eq!(quoted("abc").cap(3).to_string(), "abc");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn output_is_one_line_of_bounded_length(text in any::<String>(), cap in 0usize..300) {
            let out = quoted(&text).cap(cap).to_string();
            prop_assert!(!out.chars().any(|c| c.is_control()));
            // The cap, plus one escaped character, plus the marker.
            prop_assert!(out.len() <= cap + 16 + 40);
        }
    }
}
