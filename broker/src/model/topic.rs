//! Topic binding keys, compiled once at bind time.
//!
//! RabbitMQ's semantics: keys are split on `.` and empty words count (`a..b` has
//! three words, `a.` two), but the empty key has no words at all. `*` matches
//! exactly one word, `#` zero or more.

#[derive(Clone, Debug, PartialEq, Eq)]
enum Word {
    Literal(String),
    Star,
    Hash,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicPattern {
    words: Vec<Word>,
}

/// Splits a routing key into words the way RabbitMQ does.
pub fn split_key(key: &str) -> Vec<&str> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    }
}

impl TopicPattern {
    pub fn compile(binding_key: &str) -> Self {
        let mut words: Vec<Word> = Vec::new();
        for w in split_key(binding_key) {
            let word = match w {
                "*" => Word::Star,
                "#" => Word::Hash,
                other => Word::Literal(other.to_owned()),
            };
            // `#.#` means the same as `#`; collapsing keeps matching linear.
            if word == Word::Hash && words.last() == Some(&Word::Hash) {
                continue;
            }
            words.push(word);
        }
        TopicPattern { words }
    }

    /// Matches against a key already split with [`split_key`].
    pub fn matches(&self, key: &[&str]) -> bool {
        match_words(&self.words, key)
    }
}

fn match_words(pattern: &[Word], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((Word::Hash, rest)) => {
            if rest.is_empty() {
                return true;
            }
            (0..=key.len()).any(|skip| match_words(rest, &key[skip..]))
        }
        Some((Word::Star, rest)) => !key.is_empty() && match_words(rest, &key[1..]),
        Some((Word::Literal(w), rest)) => {
            key.first().is_some_and(|k| k == w) && match_words(rest, &key[1..])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, key: &str) -> bool {
        TopicPattern::compile(pattern).matches(&split_key(key))
    }

    #[test]
    fn rabbitmq_topic_semantics() {
        assert!(m("a.b", "a.b"));
        assert!(!m("a.b", "a.b.c"));
        assert!(m("a.*", "a.b"));
        assert!(!m("a.*", "a"));
        assert!(m("a.*", "a."));
        assert!(m("a.#", "a"));
        assert!(m("a.#", "a.b.c"));
        assert!(m("#", ""));
        assert!(m("#", "a.b"));
        assert!(!m("*", ""));
        assert!(m("*", "x"));
        assert!(m("", ""));
        assert!(!m("", "a"));
        assert!(m("a.#.b", "a.b"));
        assert!(m("a.#.b", "a.x.y.b"));
        assert!(!m("a.#.b", "a.x.y"));
        assert!(m("#.#", "a"));
        assert!(m("a..b", "a..b"));
        assert!(m("a.*.b", "a..b"));
        assert!(m("*.*", "."));
        assert!(m("#.*", "a"));
        assert!(!m("#.*", ""));
    }
}
