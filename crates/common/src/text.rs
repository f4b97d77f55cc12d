//! Bounds on text that comes from outside offload's control: a handler's or a target's error,
//! a client's kind or key, whatever a writer put on the events stream. Every such text is cut
//! to a bound on a character boundary, with a marker that says so, before it is stored,
//! logged, put in a header or an event, or answered.

use std::borrow::Cow;

/// The most bytes of an error kept anywhere: an event, a status, a header, a log line.
pub const ERROR_MAX_BYTES: usize = 1024;

/// `text`, or its first bytes up to about `max` (cut on a character boundary) followed by a
/// marker naming its whole length when it is longer.
#[must_use]
pub fn bounded(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… (cut from {} bytes)", &text[..end], text.len()))
}

/// [`bounded`], in place.
pub fn bound(text: &mut String, max: usize) {
    if let Cow::Owned(cut) = bounded(text, max) {
        *text = cut;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept_and_long_text_is_cut_on_a_character_boundary_with_a_marker() {
        assert_eq!(bounded("boom", 8), "boom");
        let long = "é".repeat(10); // 20 bytes, two each
        let cut = bounded(&long, 5);
        assert_eq!(cut, "éé… (cut from 20 bytes)");
        let mut owned = "b".repeat(250_000);
        bound(&mut owned, ERROR_MAX_BYTES);
        assert!(owned.len() < ERROR_MAX_BYTES + 40, "{}", owned.len());
        assert!(owned.ends_with("… (cut from 250000 bytes)"));
    }
}
