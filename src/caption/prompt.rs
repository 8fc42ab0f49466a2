//! Prompt templates: `{name}` variables filled per slice, `{{`/`}}` for
//! literal braces, and an unknown variable is an error that names it (so a
//! typo in the config is not sent to millions of requests).
use crate::artifacts::cache::Plane;
use crate::fsutil::sha256_bytes;

pub const VARIABLES: [&str; 5] = ["plane", "modality", "position_pct", "axis", "max_words"];

/// What a slice fills into the template.
#[derive(Debug, Clone)]
pub struct Vars<'a> {
    pub plane: Plane,
    pub modality: &'a str,
    /// Position along the plane's axis, in [0, 1].
    pub position: f64,
    pub max_words: usize,
}

/// The direction a plane's position runs along, low end first (RAS).
pub fn axis_words(plane: Plane) -> (&'static str, &'static str) {
    match plane {
        Plane::Axial => ("inferior", "superior"),
        Plane::Coronal => ("posterior", "anterior"),
        // RAS: x grows towards the patient's right.
        Plane::Sagittal => ("left", "right"),
    }
}

fn value(name: &str, v: &Vars) -> Option<String> {
    Some(match name {
        "plane" => v.plane.name().to_string(),
        "modality" => v.modality.to_string(),
        "position_pct" => format!("{}", (v.position * 100.0).round() as i64),
        "axis" => {
            let (lo, hi) = axis_words(v.plane);
            format!("{lo}-to-{hi}")
        }
        "max_words" => v.max_words.to_string(),
        _ => return None,
    })
}

/// Fills a template; the error names the offending variable or brace.
pub fn render(template: &str, v: &Vars) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + 32);
    let mut chars = template.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|x| x.1) == Some('{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek().map(|x| x.1) == Some('}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let rest = &template[i + 1..];
                let Some(end) = rest.find('}') else {
                    return Err(format!("unclosed '{{' at byte {i} (write '{{{{' for a literal brace)"));
                };
                let name = &rest[..end];
                let val = value(name, v).ok_or_else(|| {
                    format!(
                        "unknown variable {{{name}}}; known: {}",
                        VARIABLES.map(|n| format!("{{{n}}}")).join(" ")
                    )
                })?;
                out.push_str(&val);
                for (_, c) in chars.by_ref() {
                    if c == '}' {
                        break;
                    }
                }
            }
            '}' => return Err(format!("lone '}}' at byte {i} (write '}}}}' for a literal brace)")),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Checks a template renders (every variable known, braces balanced).
pub fn check(template: &str) -> Result<(), String> {
    let v = Vars {
        plane: Plane::Axial,
        modality: "CT",
        position: 0.5,
        max_words: 10,
    };
    render(template, &v).map(|_| ())
}

/// Identity of what was asked: a record whose hash differs from the one the
/// current config would send is redone on the next run. Short (64 bits):
/// it tells configs apart, it does not defend against forgery.
pub fn hash(parts: &serde_json::Value) -> String {
    let s = serde_json::to_string(parts).unwrap_or_default();
    sha256_bytes(s.as_bytes())[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars<'static> {
        Vars {
            plane: Plane::Sagittal,
            modality: "MR",
            position: 0.426,
            max_words: 40,
        }
    }

    #[test]
    fn renders_every_variable_and_literal_braces() {
        let t = "{plane} {modality} {position_pct}% {axis} <= {max_words} words {{json}}";
        assert_eq!(
            render(t, &vars()).unwrap(),
            "sagittal MR 43% left-to-right <= 40 words {json}"
        );
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(render("a {plnae}", &vars()).unwrap_err().contains("{plnae}"));
        assert!(render("a {plane", &vars()).unwrap_err().contains("unclosed"));
        assert!(render("a } b", &vars()).unwrap_err().contains("lone"));
        check(super::super::config::DEFAULT_PROMPT).unwrap();
    }

    #[test]
    fn hash_changes_with_any_part() {
        let a = hash(&serde_json::json!({"model": "m", "prompt": "p"}));
        let b = hash(&serde_json::json!({"model": "m", "prompt": "q"}));
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
        assert_eq!(a, hash(&serde_json::json!({"model": "m", "prompt": "p"})));
    }
}
