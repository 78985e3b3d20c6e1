//! GNU parallel's replacement strings, for `batchctl map`'s `--param` values and `--out`: `{}` the
//! path, `{/}` its basename, `{//}` its dirname, `{.}` the path without extension, `{/.}` the
//! basename without extension, `{#}` the job number; `{{` and `}}` write literal braces.
//!
//! The path operations are GNU parallel's own (checked against `parallel` 20221122): `{.}` removes
//! the last `.` of the basename and what follows (`a/.bashrc` → `a/`), `{//}` is Perl's `dirname`
//! (`a` → `.`, `/a` → `/`).

use std::fmt;

/// A text with replacement strings, parsed once and rendered per input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// Why a template cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{template:?}: {reason}")]
pub struct TemplateError {
    /// The template as given.
    pub template: String,
    /// What is wrong with it.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    /// `{}`
    Path,
    /// `{/}`
    Base,
    /// `{//}`
    Dir,
    /// `{.}`
    NoExt,
    /// `{/.}`
    BaseNoExt,
    /// `{#}`
    Number,
}

// === impl Template ===

impl Template {
    /// Parses `text`; an unknown `{…}` or a lone brace is an error (`{{`/`}}` write braces).
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let err = |reason: String| TemplateError {
            template: text.to_owned(),
            reason,
        };
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        while let Some(i) = rest.find(['{', '}']) {
            lit.push_str(&rest[..i]);
            let tail = &rest[i..];
            if let Some(after) = tail.strip_prefix("{{").or_else(|| tail.strip_prefix("}}")) {
                lit.push_str(&tail[..1]);
                rest = after;
                continue;
            }
            if tail.starts_with('}') {
                return Err(err("a lone \"}\" (write \"}}\" for a brace)".into()));
            }
            let Some(end) = tail.find('}') else {
                return Err(err(
                    "a \"{\" without its \"}\" (write \"{{\" for a brace)".into()
                ));
            };
            let part = match &tail[..=end] {
                "{}" => Part::Path,
                "{/}" => Part::Base,
                "{//}" => Part::Dir,
                "{.}" => Part::NoExt,
                "{/.}" => Part::BaseNoExt,
                "{#}" => Part::Number,
                other => {
                    return Err(err(format!(
                        "unknown replacement string {other} (known: {{}} {{/}} {{//}} {{.}} \
                         {{/.}} {{#}}; \"{{{{\" and \"}}}}\" write braces)"
                    )))
                }
            };
            if !lit.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut lit)));
            }
            parts.push(part);
            rest = &tail[end + 1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Text(lit));
        }
        Ok(Self { parts })
    }

    /// Whether the text holds a replacement string (else it renders the same for every input).
    pub fn varies(&self) -> bool {
        self.parts.iter().any(|p| !matches!(p, Part::Text(_)))
    }

    /// The text for input `path`, job number `number`.
    pub fn render(&self, path: &str, number: u64) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Path => out.push_str(path),
                Part::Base => out.push_str(basename(path)),
                Part::Dir => out.push_str(dirname(path)),
                Part::NoExt => out.push_str(without_extension(path)),
                Part::BaseNoExt => out.push_str(without_extension(basename(path))),
                Part::Number => out.push_str(&number.to_string()),
            }
        }
        out
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.parts {
            match part {
                Part::Text(t) => write!(f, "{}", t.replace('{', "{{").replace('}', "}}"))?,
                Part::Path => f.write_str("{}")?,
                Part::Base => f.write_str("{/}")?,
                Part::Dir => f.write_str("{//}")?,
                Part::NoExt => f.write_str("{.}")?,
                Part::BaseNoExt => f.write_str("{/.}")?,
                Part::Number => f.write_str("{#}")?,
            }
        }
        Ok(())
    }
}

/// What follows the last `/` (`s:^.*/::`).
fn basename(path: &str) -> &str {
    path.rfind('/').map_or(path, |i| &path[i + 1..])
}

/// Perl's `File::Basename::dirname`: trailing slashes ignored, `.` when there is no directory.
fn dirname(path: &str) -> &str {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return if path.is_empty() { "." } else { "/" };
    }
    match trimmed.rfind('/') {
        None => ".",
        Some(i) => match trimmed[..i].trim_end_matches('/') {
            "" => "/",
            dir => dir,
        },
    }
}

/// The path without its last extension (`s:\.[^/.]*$::`).
fn without_extension(path: &str) -> &str {
    match path.rfind(['.', '/']) {
        Some(i) if path.as_bytes()[i] == b'.' => &path[..i],
        _ => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(path: &str) -> String {
        Template::parse("[{}] [{/}] [{//}] [{.}] [{/.}] [{#}]")
            .unwrap()
            .render(path, 7)
    }

    #[test]
    fn replacement_strings_match_gnu_parallel() {
        // Each line as `parallel -k echo '[{}] [{/}] [{//}] [{.}] [{/.}] [{#}]' ::: PATH` prints it
        // (parallel 20221122), with {#} = 7.
        for (path, expected) in [
            ("a", "[a] [a] [.] [a] [a] [7]"),
            ("a/b", "[a/b] [b] [a] [a/b] [b] [7]"),
            ("/a", "[/a] [a] [/] [/a] [a] [7]"),
            ("/a/b.c", "[/a/b.c] [b.c] [/a] [/a/b] [b] [7]"),
            ("a.b/c", "[a.b/c] [c] [a.b] [a.b/c] [c] [7]"),
            (".bashrc", "[.bashrc] [.bashrc] [.] [] [] [7]"),
            ("a/.bashrc", "[a/.bashrc] [.bashrc] [a] [a/] [] [7]"),
            ("x.tar.gz", "[x.tar.gz] [x.tar.gz] [.] [x.tar] [x.tar] [7]"),
            ("a/b/", "[a/b/] [] [a] [a/b/] [] [7]"),
            ("./a.jpg", "[./a.jpg] [a.jpg] [.] [./a] [a] [7]"),
            ("/", "[/] [] [/] [/] [] [7]"),
            ("a.", "[a.] [a.] [.] [a] [a] [7]"),
            ("a..b", "[a..b] [a..b] [.] [a.] [a.] [7]"),
            ("", "[] [] [.] [] [] [7]"),
            ("a/b.c.d", "[a/b.c.d] [b.c.d] [a] [a/b.c] [b.c] [7]"),
            ("a//b.c", "[a//b.c] [b.c] [a] [a//b] [b] [7]"),
            (
                "dir with space/new\nline.txt",
                "[dir with space/new\nline.txt] [new\nline.txt] [dir with space] \
                 [dir with space/new\nline] [new\nline] [7]",
            ),
        ] {
            assert_eq!(all(path), expected, "{path:?}");
        }
    }

    #[test]
    fn braces_and_errors() {
        let t = Template::parse("{{x}} {/.}.json}}").unwrap();
        assert_eq!(t.render("d/f.txt", 1), "{x} f.json}");
        assert!(t.varies());
        assert_eq!(t.to_string(), "{{x}} {/.}.json}}");
        assert!(!Template::parse("plain {{}}").unwrap().varies());
        for (bad, word) in [
            ("{1}", "unknown replacement string {1}"),
            ("{%}", "unknown"),
            ("a{", "without its"),
            ("a}b", "lone"),
            ("^[0-9]{1,4}$", "{1,4}"),
        ] {
            let e = Template::parse(bad).unwrap_err();
            assert!(e.to_string().contains(word), "{bad}: {e}");
        }
    }
}
