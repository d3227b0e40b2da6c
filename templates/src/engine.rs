//! Tera set up for configuration files: strict (an undefined variable is an error, never an
//! empty string or `<no value>`, confd #82), autoescape off whatever the file name, and error
//! messages that name the template and where in it the problem is.

use std::error::Error as _;
use std::fmt;

/// Why a template could not be compiled or rendered.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(String);

/// One compiled template.
pub struct Template {
    name: String,
    source: String,
    tera: tera::Tera,
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Template")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Template {
    /// Parses `source`; syntax errors carry Tera's line and column.
    pub fn compile(name: &str, source: &str) -> Result<Self, TemplateError> {
        let mut tera = tera::Tera::default();
        // Config files are not HTML: `&` in an nginx `if` must stay `&`.
        tera.autoescape_on(vec![]);
        tera.add_raw_template(name, source)
            .map_err(|e| TemplateError(format!("template {name}: {}", chain(&e))))?;
        Ok(Self {
            name: name.to_owned(),
            source: source.to_owned(),
            tera,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Renders with `context` (a JSON object).
    pub fn render(&self, context: &serde_json::Value) -> Result<String, TemplateError> {
        let ctx = tera::Context::from_value(context.clone())
            .map_err(|e| TemplateError(format!("template {}: {}", self.name, chain(&e))))?;
        self.tera.render(&self.name, &ctx).map_err(|e| {
            let message = chain(&e);
            let at = self.locate(&message).unwrap_or_default();
            TemplateError(format!("template {}{at}: {message}", self.name))
        })
    }

    /// Tera's render errors carry no position, so find where the name the error is about
    /// (the first back-quoted word, e.g. ``Variable `services.web.x` not found``) is used.
    fn locate(&self, message: &str) -> Option<String> {
        let start = message.find('`')? + 1;
        let len = message[start..].find('`')?;
        let needle = &message[start..start + len];
        if needle.is_empty() {
            return None;
        }
        let mut hits = Vec::new();
        for (i, line) in self.source.lines().enumerate() {
            let mut from = 0;
            while let Some(pos) = line[from..].find(needle) {
                let col = from + pos;
                let before = line[..col].chars().next_back();
                let after = line[col + needle.len()..].chars().next();
                let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
                // `x` must not match inside `max` or `x_y`; a `.` before it is fine only if it
                // is part of what the error names.
                if !word(before) && before != Some('.') && !word(after) {
                    hits.push((i + 1, col + 1));
                }
                from = col + needle.len();
            }
        }
        match hits.as_slice() {
            [] => None,
            [(l, c)] => Some(format!(":{l}:{c}")),
            [(l, c), rest @ ..] => Some(format!(":{l}:{c} (and {} more uses)", rest.len())),
        }
    }
}

/// An error and its sources, joined: Tera puts the useful part in the source.
fn chain(e: &tera::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn undefined_variable_is_an_error_with_position() {
        let t =
            Template::compile("a.cfg.tera", "line one\n  x = {{ services.web.nope }}\n").unwrap();
        let err = t
            .render(&json!({"services": {"web": {}}}))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("template a.cfg.tera:2:"), "{err}");
        assert!(err.contains("services.web.nope"), "{err}");
    }

    #[test]
    fn default_filter_and_no_autoescape() {
        let t = Template::compile(
            "x.html",
            "{{ missing | default(value=\"d\") }} {{ v }} {{ e | default(value=\"\") }}",
        )
        .unwrap();
        assert_eq!(t.render(&json!({"v": "a&b<c>"})).unwrap(), "d a&b<c> ");
    }

    #[test]
    fn syntax_error_names_template_and_line() {
        let err = Template::compile("b.tera", "ok\n{% for x in %}\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("template b.tera:"), "{err}");
        assert!(err.contains("2:"), "{err}");
    }
}
