//! Every error of a config file, not just the first: serde stops at the first error, so
//! `check-config` parses again with the offending lines blanked out (replaced by spaces of
//! the same length, so that the line and column of every later error stay right) until
//! the rest parses, then validates what is left.

use crate::config::Config;

/// At most this many parse errors are collected (a file that is not TOML at all would
/// otherwise yield one per line).
const MAX_ERRORS: usize = 50;

/// The parse errors of `text`, each with its line (toml's message and snippet), and the
/// config made of the lines without errors (`None` when even that does not parse).
pub fn parse_all(text: &str) -> (Vec<String>, Option<Config>) {
    let (mut errors, cfg) = collect(text);
    // In file order (serde meets them in its own).
    errors.sort_by_key(|e| line_of(e));
    (errors, cfg)
}

/// The line toml's message names ("TOML parse error at line 7, column 1").
fn line_of(message: &str) -> usize {
    message
        .split_once("at line ")
        .and_then(|(_, r)| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

fn collect(text: &str) -> (Vec<String>, Option<Config>) {
    let mut text = text.to_string();
    let mut errors = Vec::new();
    let mut blanked: Vec<std::ops::Range<usize>> = Vec::new();
    while errors.len() < MAX_ERRORS {
        let e = match Config::parse(&text) {
            Ok(cfg) => return (errors, Some(cfg)),
            Err(e) => e,
        };
        let span = e.downcast_ref::<toml::de::Error>().and_then(|t| t.span());
        let Some(span) = span else {
            errors.push(e.to_string());
            break;
        };
        let lines = whole_lines(&text, span.clone());
        // An error that only exists because lines inside it were blanked (a table that
        // lost a required key to an earlier error) is a consequence, not news.
        if !blanked
            .iter()
            .any(|b| b.start >= lines.start && b.end <= lines.end)
        {
            errors.push(e.to_string());
        }
        if lines.is_empty() || blanked.contains(&lines) {
            break;
        }
        blank(&mut text, lines.clone());
        blanked.push(lines);
    }
    (errors, None)
}

/// The lines `span` touches; for a table header, the whole table (its keys would
/// otherwise land in the table before it).
fn whole_lines(text: &str, span: std::ops::Range<usize>) -> std::ops::Range<usize> {
    let span = span.start.min(text.len())..span.end.min(text.len());
    let start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
    let mut end = text[span.end..]
        .find('\n')
        .map_or(text.len(), |i| span.end + i);
    if text[start..].trim_start().starts_with('[') && span.end <= end {
        // Up to the next header line.
        let mut at = end;
        while at < text.len() {
            let line_end = text[at + 1..].find('\n').map_or(text.len(), |i| at + 1 + i);
            if text[at + 1..line_end].trim_start().starts_with('[') {
                break;
            }
            at = line_end;
        }
        end = at;
    }
    start..end
}

fn blank(text: &mut String, range: std::ops::Range<usize>) {
    let spaces: String = text[range.clone()]
        .chars()
        .map(|c| {
            if c == '\n' {
                "\n".to_string()
            } else {
                " ".repeat(c.len_utf8())
            }
        })
        .collect();
    text.replace_range(range, &spaces);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_each_error_with_its_own_line() {
        let text = "[server]\nlisten = 5\nshards = \"two\"\n\n[limits]\nmax_batch = 10\nno_such_limit = 1\n";
        let (errors, cfg) = parse_all(text);
        assert_eq!(errors.len(), 3, "{errors:#?}");
        // In the order serde meets them, each at its own line.
        for line in ["line 2,", "line 3,", "line 7,"] {
            assert_eq!(
                errors.iter().filter(|e| e.contains(line)).count(),
                1,
                "{line} {errors:#?}"
            );
        }
        assert!(errors.iter().any(|e| e.contains("no_such_limit")));
        // What is left parses: the good line kept its value.
        assert_eq!(cfg.unwrap().limits.max_batch, 10);
    }

    #[test]
    fn an_unknown_table_is_one_error() {
        let text = "[nonsense]\na = 1\nb = 2\n[limits]\nmax_batch = 7\n";
        let (errors, cfg) = parse_all(text);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_eq!(cfg.unwrap().limits.max_batch, 7);
    }

    #[test]
    fn a_valid_file_has_no_errors() {
        let (errors, cfg) = parse_all("[limits]\nmax_batch = 7\n");
        assert!(errors.is_empty());
        assert_eq!(cfg.unwrap().limits.max_batch, 7);
    }
}
