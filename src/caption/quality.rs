//! Quality flags on a caption. Each is a cheap, documented heuristic; what
//! happens to a flagged caption is the config's `caption.policy`.
//!
//! - `empty`: nothing but whitespace and punctuation.
//! - `refusal`: the first 200 characters hold a refusal phrase ("I cannot",
//!   "I can't", "I'm sorry", "As an AI", "I am unable to", "unable to
//!   provide/assist/help/analyze/interpret/determine/identify", ...). Only
//!   the opening is searched, so "the septum is unable to be seen" late in a
//!   long description does not count.
//! - `truncated`: the server stopped at the token limit (`finish_reason`
//!   `length`).
//! - `not_english`: more than 10% of the letters are outside ASCII (Chinese,
//!   Cyrillic, accented scripts), or a text of at least 8 words has none of
//!   a short list of English function words that other languages do not
//!   share ("the", "of", "and", "with", "is", "are", "this", "shows", ...).
//! - `repeated`: the same normalised text (lower case, letters and digits
//!   only, single spaces) on at least `repeated_threshold` different slices;
//!   decided over all records at the end of a run.
use serde::{Deserialize, Serialize};

use super::config::{Action, FlagPolicy};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flag {
    Empty,
    Refusal,
    Truncated,
    NotEnglish,
    Repeated,
}

impl Flag {
    pub const ALL: [Flag; 5] = [
        Flag::Empty,
        Flag::Refusal,
        Flag::Truncated,
        Flag::NotEnglish,
        Flag::Repeated,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Flag::Empty => "empty",
            Flag::Refusal => "refusal",
            Flag::Truncated => "truncated",
            Flag::NotEnglish => "not_english",
            Flag::Repeated => "repeated",
        }
    }

    pub fn action(self, p: &FlagPolicy) -> Action {
        match self {
            Flag::Empty => p.empty,
            Flag::Refusal => p.refusal,
            Flag::Truncated => p.truncated,
            Flag::NotEnglish => p.not_english,
            Flag::Repeated => p.repeated,
        }
    }
}

const REFUSALS: [&str; 14] = [
    "i cannot",
    "i can't",
    "i can not",
    "i'm sorry",
    "i am sorry",
    "sorry, i",
    "as an ai",
    "as a language model",
    "i'm unable",
    "i am unable",
    "i'm not able",
    "i am not able",
    "i won't be able",
    "i will not be able",
];

const UNABLE_TO: [&str; 8] = [
    "provide",
    "assist",
    "help",
    "analyze",
    "analyse",
    "interpret",
    "determine",
    "identify",
];

/// English function words that Romance and Germanic languages do not share
/// with English (so "de", "in", "a" are deliberately absent).
const ENGLISH: [&str; 20] = [
    "the", "of", "and", "with", "is", "are", "this", "that", "shows", "showing", "to", "at", "on", "which", "from",
    "its", "there", "visible", "seen", "appears",
];

/// Lower case, letters and digits only, single spaces.
pub fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for w in text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(w.chars().flat_map(char::to_lowercase));
    }
    out
}

pub fn is_empty(text: &str) -> bool {
    !text.chars().any(char::is_alphanumeric)
}

pub fn is_refusal(text: &str) -> bool {
    let head: String = text
        .chars()
        .take(200)
        .flat_map(char::to_lowercase)
        .map(|c| if c == '\u{2019}' { '\'' } else { c })
        .collect();
    if REFUSALS.iter().any(|p| head.contains(p)) {
        return true;
    }
    head.match_indices("unable to ").any(|(i, m)| {
        let after = &head[i + m.len()..];
        UNABLE_TO.iter().any(|v| after.starts_with(v))
    })
}

pub fn is_not_english(text: &str) -> bool {
    let letters = text.chars().filter(|c| c.is_alphabetic()).count();
    if letters == 0 {
        return false;
    }
    let foreign = text.chars().filter(|c| c.is_alphabetic() && !c.is_ascii()).count();
    if foreign * 10 > letters {
        return true;
    }
    let words: Vec<String> = normalise(text).split(' ').map(str::to_string).collect();
    words.len() >= 8 && !words.iter().any(|w| ENGLISH.contains(&w.as_str()))
}

/// Flags a single reply can carry (all but `repeated`).
pub fn reply_flags(text: &str, truncated: bool) -> Vec<Flag> {
    let mut f = Vec::new();
    if is_empty(text) {
        f.push(Flag::Empty);
    } else {
        if is_refusal(text) {
            f.push(Flag::Refusal);
        }
        if is_not_english(text) {
            f.push(Flag::NotEnglish);
        }
    }
    if truncated {
        f.push(Flag::Truncated);
    }
    f
}

/// The strongest action the policy asks for over a set of flags
/// (retry over drop over keep).
pub fn verdict(flags: &[Flag], p: &FlagPolicy) -> Action {
    let acts: Vec<Action> = flags.iter().map(|f| f.action(p)).collect();
    if acts.contains(&Action::Retry) {
        Action::Retry
    } else if acts.contains(&Action::Drop) {
        Action::Drop
    } else {
        Action::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_caught_only_in_the_opening() {
        assert!(is_refusal("I'm sorry, but I can't help with that."));
        assert!(is_refusal("I\u{2019}m unable to interpret medical images."));
        assert!(is_refusal("As an AI, I do not give diagnoses."));
        assert!(is_refusal("Unfortunately I am unable to determine this."));
        assert!(!is_refusal(
            "Axial T1 slice through the lateral ventricles; the septum is intact."
        ));
        let late = format!(
            "{} The vessel is unable to be assessed.",
            "Axial slice of the brain. ".repeat(10)
        );
        assert!(!is_refusal(&late));
        let long_then_refusal = format!("{} I cannot say more.", "x".repeat(300));
        assert!(!is_refusal(&long_then_refusal));
    }

    #[test]
    fn non_english_heuristic() {
        assert!(is_not_english("轴位脑部MRI切片，显示侧脑室。"));
        assert!(is_not_english(
            "Corte axial del cerebro donde se observan los ventrículos laterales y el cuerpo calloso"
        ));
        assert!(is_not_english(
            "Axialer Schnitt durch das Gehirn mit den Seitenventrikeln und dem Balken im Zentrum"
        ));
        assert!(!is_not_english(
            "Axial slice of the brain at the level of the lateral ventricles, with the corpus callosum visible."
        ));
        // short telegraphic English is not accused
        assert!(!is_not_english("Axial brain MRI, lateral ventricles"));
        assert!(!is_not_english(""));
    }

    #[test]
    fn flags_and_verdicts() {
        let p = FlagPolicy::default();
        assert_eq!(reply_flags("  ... ", false), vec![Flag::Empty]);
        assert_eq!(
            reply_flags("I cannot do that", true),
            vec![Flag::Refusal, Flag::Truncated]
        );
        assert!(reply_flags("Coronal slice of the abdomen showing the liver.", false).is_empty());
        assert_eq!(verdict(&[Flag::Truncated], &p), Action::Keep);
        assert_eq!(verdict(&[Flag::Truncated, Flag::Refusal], &p), Action::Retry);
        let drop = FlagPolicy {
            truncated: Action::Drop,
            ..p
        };
        assert_eq!(verdict(&[Flag::Truncated, Flag::NotEnglish], &drop), Action::Drop);
    }

    #[test]
    fn normalise_keeps_letters_and_digits_in_lower_case() {
        assert_eq!(normalise(" The  Liver's edge, T2. "), "the liver s edge t2");
        assert_eq!(normalise("An axial slice!"), normalise("an AXIAL   slice"));
    }
}
