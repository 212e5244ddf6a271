//! Texts from outside (ids, keys, values, a store's answers) as messages show them: cut to a bound,
//! so no input makes a reply or a log line large.

use std::borrow::Cow;

/// `text` cut to at most `max` bytes at a character boundary, ending in `...` when cut.
pub fn cut(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}...", &text[..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_a_character_boundary_within_the_bound() {
        assert_eq!(cut("short", 10), "short");
        assert_eq!(cut("0123456789", 10), "0123456789");
        assert_eq!(cut("0123456789a", 10), "0123456...");
        let e = "é".repeat(10);
        let cut_e = cut(&e, 10);
        assert!(cut_e.len() <= 10 && cut_e.ends_with("..."), "{cut_e}");
    }
}
