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
            // `#.#` means the same as `#`; collapsing saves the matcher a state.
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

/// Patterns with up to this many words match without allocating.
const INLINE_STATES: usize = 64;

/// Runs the pattern as an NFA over the key: state `i` means "the first `i`
/// pattern words have matched the key words read so far". A `#` state keeps
/// itself on every word and also stands for the state after it (zero words).
/// Every key word advances each live state at most once, so the cost is
/// O(pattern words x key words) whatever the pattern, with no recursion.
fn match_words(pattern: &[Word], key: &[&str]) -> bool {
    let states = pattern.len() + 1;
    if states <= INLINE_STATES {
        let mut buf = [false; 2 * INLINE_STATES];
        run_nfa(pattern, key, &mut buf[..2 * states])
    } else {
        run_nfa(pattern, key, &mut vec![false; 2 * states])
    }
}

/// `buf` holds two state sets (current and next) of `pattern.len() + 1`
/// entries each, all false.
fn run_nfa(pattern: &[Word], key: &[&str], buf: &mut [bool]) -> bool {
    let (mut live, mut next) = buf.split_at_mut(pattern.len() + 1);
    live[0] = true;
    close_over_hashes(pattern, live);
    for word in key {
        next.fill(false);
        let mut any = false;
        for (i, p) in pattern.iter().enumerate() {
            if !live[i] {
                continue;
            }
            let target = match p {
                Word::Hash => i,
                Word::Star => i + 1,
                Word::Literal(l) if l == word => i + 1,
                Word::Literal(_) => continue,
            };
            next[target] = true;
            any = true;
        }
        if !any {
            return false;
        }
        close_over_hashes(pattern, next);
        std::mem::swap(&mut live, &mut next);
    }
    live[pattern.len()]
}

/// Adds the states reachable without reading a word: past each live `#`.
fn close_over_hashes(pattern: &[Word], states: &mut [bool]) {
    for (i, p) in pattern.iter().enumerate() {
        if states[i] && *p == Word::Hash {
            states[i + 1] = true;
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

    #[test]
    fn hashes_and_stars_combined() {
        assert!(m("#.a.#", "a"));
        assert!(m("#.a.#", "x.a.y"));
        assert!(!m("#.a.#", "b"));
        assert!(!m("#.a.#", ""));
        assert!(!m("*.#.*", "a"));
        assert!(m("*.#.*", "a.b"));
        assert!(m("*.#.*", "a.b.c.d"));
        assert!(m("#.#.#", ""));
        assert!(m("#.#.#", "a.b"));
        assert!(m("a.#.#.b", "a.b"));
        assert!(m("#.b.#.b", "b.b"));
        assert!(!m("#.b.#.b", "b"));
        assert!(m("#..#", "."));
        assert!(m("#..#", "a..b"));
        assert!(!m("#..#", "a.b"));
        assert!(m("#.*.*", "a.b"));
        assert!(!m("#.*.*", "a"));
        // Longer than the inline state buffer.
        let long = ["a"; 100].join(".");
        assert!(m(&long, &long));
        assert!(m(&format!("#.{long}.#"), &format!("x.{long}")));
        assert!(!m(&long, &["a"; 99].join(".")));
        assert!(m(&["*"; 100].join("."), &long));
        assert!(m(&format!("{}#", "a.#.".repeat(70)), &long));
        assert!(!m(&format!("{}#", "a.#.".repeat(101)), &long));
    }

    /// The old backtracking matcher, straight from the definition: the oracle
    /// for the NFA on small inputs.
    fn reference(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|skip| reference(rest, &key[skip..])),
            Some((&"*", rest)) => !key.is_empty() && reference(rest, &key[1..]),
            Some((w, rest)) => key.first() == Some(w) && reference(rest, &key[1..]),
        }
    }

    /// All sequences of up to `max` words drawn from `alphabet`, joined with dots.
    fn keys(alphabet: &[&str], max: usize) -> Vec<String> {
        let mut all = vec![Vec::<&str>::new()];
        let mut last = all.clone();
        for _ in 0..max {
            let longer: Vec<Vec<&str>> = last
                .iter()
                .flat_map(|k| {
                    alphabet.iter().map(move |w| {
                        let mut k = k.clone();
                        k.push(w);
                        k
                    })
                })
                .collect();
            all.extend(longer.iter().cloned());
            last = longer;
        }
        all.iter().map(|k| k.join(".")).collect()
    }

    #[test]
    fn agrees_with_backtracking_on_small_inputs() {
        let patterns = keys(&["a", "b", "", "*", "#"], 4);
        let routing_keys = keys(&["a", "b", ""], 4);
        for pattern in &patterns {
            let compiled = TopicPattern::compile(pattern);
            let words = split_key(pattern);
            for key in &routing_keys {
                let key_words = split_key(key);
                assert_eq!(
                    compiled.matches(&key_words),
                    reference(&words, &key_words),
                    "pattern {pattern:?} against key {key:?}"
                );
            }
        }
    }

    /// A backtracking matcher takes exponential time here (seconds to
    /// minutes); the NFA is linear in both lengths.
    #[test]
    fn many_hashes_against_a_long_key_is_fast() {
        let pattern = TopicPattern::compile(&format!("{}#.b", "#.a.".repeat(8)));
        let all_a = ["a"; 50].join(".");
        let ends_in_b = format!("{}.b", ["a"; 49].join("."));
        let too_few_a = format!("{}.b", ["a"; 7].join("."));
        let started = std::time::Instant::now();
        assert!(!pattern.matches(&split_key(&all_a)));
        assert!(pattern.matches(&split_key(&ends_in_b)));
        assert!(!pattern.matches(&split_key(&too_few_a)));
        assert!(pattern.matches(&split_key(&format!("{}.b", ["a"; 8].join(".")))));
        let elapsed = started.elapsed();
        assert!(
            elapsed < std::time::Duration::from_millis(50),
            "matching took {elapsed:?}"
        );
    }
}
