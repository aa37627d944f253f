//! Python's string semantics where the reference implementations rely on them.

/// Whether Python's `str.isspace()` holds: Rust's Unicode `White_Space` plus the four ASCII
/// information separators (U+001C..U+001F), which Python counts as whitespace and Rust does not.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.split()` without arguments: runs of whitespace separate, no empty pieces.
pub fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_py_space).filter(|w| !w.is_empty())
}

/// Python's `str.rstrip()` without arguments.
pub fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(is_py_space)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_whitespace() {
        let words: Vec<_> = py_split(" a\u{1c}b\u{a0}c\t\nd \u{3000}e\u{200b}f ").collect();
        assert_eq!(words, ["a", "b", "c", "d", "e\u{200b}f"]);
        assert_eq!(py_rstrip("x \u{1f}\u{85}"), "x");
    }
}
