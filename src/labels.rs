//! Agent labels and selectors. An agent starts with `--label key=value`
//! (repeatable) and reports its labels on `getTask` in the `contact-labels`
//! metadata (`key=value,key=value`); an operator targets agents with a
//! selector, `key=value[,key=value]`, which matches the agents that carry
//! every pair (like Kubernetes' equality-based label selectors).
//!
//! Keys and values are 1 to 63 characters of letters, digits, `.`, `_`,
//! `-` and `/` (keys start with a letter or digit); an agent has at most
//! [`MAX_LABELS`] labels.

use std::collections::BTreeMap;
use std::fmt;

/// An agent's labels, by key.
pub type Labels = BTreeMap<String, String>;

/// Request metadata key of an agent's labels on `getTask`.
pub const LABELS_KEY: &str = "contact-labels";

/// Labels an agent may carry at most.
pub const MAX_LABELS: usize = 32;

/// Longest key or value.
const MAX_PART: usize = 63;

fn check_part(what: &str, part: &str, whole: &str) -> Result<(), String> {
    if part.is_empty() || part.len() > MAX_PART {
        return Err(format!(
            "{what} of {whole:?} must be 1 to {MAX_PART} characters long"
        ));
    }
    if let Some(c) = part
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
    {
        return Err(format!(
            "{what} of {whole:?} contains {c:?}; use letters, digits, '.', '_', '-' and '/'"
        ));
    }
    if what == "the key" && !part.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!(
            "the key of {whole:?} must start with a letter or digit"
        ));
    }
    Ok(())
}

/// One `key=value` pair, checked.
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not key=value"))?;
    check_part("the key", key, text)?;
    check_part("the value", value, text)?;
    Ok((key.to_string(), value.to_string()))
}

/// Comma-separated `key=value` pairs; a key may appear once.
fn parse_pairs(text: &str) -> Result<Labels, String> {
    let mut labels = Labels::new();
    for part in text.split(',') {
        let (k, v) = parse_label(part.trim())?;
        if labels.insert(k.clone(), v).is_some() {
            return Err(format!("key {k:?} is given twice in {text:?}"));
        }
    }
    if labels.len() > MAX_LABELS {
        return Err(format!(
            "{} labels; at most {MAX_LABELS} are allowed",
            labels.len()
        ));
    }
    Ok(labels)
}

/// The metadata value that carries `labels` (empty when there are none).
pub fn to_metadata(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The labels a caller reported on `getTask` (none without the metadata),
/// or what is wrong with them.
pub fn from_metadata(headers: &grpcio::Metadata) -> Result<Labels, String> {
    for (key, value) in headers.iter() {
        if key.eq_ignore_ascii_case(LABELS_KEY) {
            let text =
                std::str::from_utf8(value).map_err(|_| format!("{LABELS_KEY} is not UTF-8"))?;
            if text.is_empty() {
                return Ok(Labels::new());
            }
            return parse_pairs(text).map_err(|e| format!("{LABELS_KEY}: {e}"));
        }
    }
    Ok(Labels::new())
}

/// Which agents a task is for: those carrying every one of its pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(Labels);

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, String> {
        if text.trim().is_empty() {
            return Err("the selector is empty; give key=value[,key=value]".into());
        }
        parse_pairs(text).map(Selector)
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_metadata(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(text: &str) -> Labels {
        parse_pairs(text).unwrap()
    }

    #[test]
    fn labels_are_checked_and_the_problem_named() {
        assert_eq!(
            parse_label("role=web").unwrap(),
            ("role".into(), "web".into())
        );
        assert_eq!(
            parse_label("kubernetes.io/zone=eu-west-1a").unwrap().0,
            "kubernetes.io/zone"
        );
        assert!(parse_label("role").unwrap_err().contains("not key=value"));
        assert!(parse_label("=web").unwrap_err().contains("the key"));
        assert!(parse_label("role=").unwrap_err().contains("the value"));
        assert!(parse_label("role=we b").unwrap_err().contains("' '"));
        assert!(parse_label("-x=1").unwrap_err().contains("start with"));
        assert!(parse_label(&format!("k={}", "v".repeat(64)))
            .unwrap_err()
            .contains("63"));
        assert!(parse_pairs("a=1,a=2").unwrap_err().contains("twice"));
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert!(parse_pairs(&many.join(","))
            .unwrap_err()
            .contains("at most 32"));
    }

    #[test]
    fn labels_round_trip_through_metadata() {
        let l = labels("role=web,zone=eu");
        let mut b = grpcio::MetadataBuilder::new();
        b.add_str(LABELS_KEY, &to_metadata(&l)).unwrap();
        assert_eq!(from_metadata(&b.build()).unwrap(), l);
        let none = grpcio::MetadataBuilder::new().build();
        assert!(from_metadata(&none).unwrap().is_empty());
        let mut b = grpcio::MetadataBuilder::new();
        b.add_str(LABELS_KEY, "role").unwrap();
        assert!(from_metadata(&b.build()).unwrap_err().contains(LABELS_KEY));
    }

    #[test]
    fn a_selector_matches_agents_with_every_pair() {
        let s = Selector::parse("role=web, zone=eu").unwrap();
        assert!(s.matches(&labels("role=web,zone=eu,os=debian")));
        assert!(!s.matches(&labels("role=web")));
        assert!(!s.matches(&labels("role=db,zone=eu")));
        assert_eq!(s.to_string(), "role=web,zone=eu");
        assert!(Selector::parse(" ").unwrap_err().contains("empty"));
    }
}
