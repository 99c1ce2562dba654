//! Chat templates from `tokenizer.chat_template`, rendered with minijinja.

use super::InferenceError;
use minijinja::value::{Value as JValue, ValueKind};
use minijinja::{Environment, Error as JError, ErrorKind, State};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.to_owned(),
            content: content.to_owned(),
        }
    }
}

/// A compiled Hugging Face style chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

fn raise_exception(msg: String) -> Result<JValue, JError> {
    Err(JError::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)`: the current UTC time, for %Y %m %d %H %M %S %b %B %y %e %j %%.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    strftime(secs, &fmt)
}

pub(crate) fn strftime(secs: i64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let jday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('j') => out.push_str(&format!("{jday:03}")),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Python string/dict methods HF templates use (`.strip()`, `.items()`, ...).
fn py_methods(_state: &State, v: &JValue, name: &str, args: &[JValue]) -> Result<JValue, JError> {
    let unknown = || JError::new(ErrorKind::UnknownMethod, format!("unknown method {name}"));
    let arg_str = |i: usize| args.get(i).and_then(|a| a.as_str().map(str::to_owned));
    match v.kind() {
        ValueKind::String => {
            let s = v.as_str().unwrap_or_default();
            Ok(match name {
                "strip" => JValue::from(match arg_str(0) {
                    Some(cs) => s.trim_matches(|c| cs.contains(c)),
                    None => s.trim(),
                }),
                "lstrip" => JValue::from(match arg_str(0) {
                    Some(cs) => s.trim_start_matches(|c| cs.contains(c)),
                    None => s.trim_start(),
                }),
                "rstrip" => JValue::from(match arg_str(0) {
                    Some(cs) => s.trim_end_matches(|c| cs.contains(c)),
                    None => s.trim_end(),
                }),
                "startswith" => JValue::from(arg_str(0).is_some_and(|p| s.starts_with(&p))),
                "endswith" => JValue::from(arg_str(0).is_some_and(|p| s.ends_with(&p))),
                "lower" => JValue::from(s.to_lowercase()),
                "upper" => JValue::from(s.to_uppercase()),
                "replace" => match (arg_str(0), arg_str(1)) {
                    (Some(a), Some(b)) => JValue::from(s.replace(&a, &b)),
                    _ => return Err(unknown()),
                },
                "split" => {
                    let parts: Vec<JValue> = match arg_str(0) {
                        Some(sep) => s.split(sep.as_str()).map(JValue::from).collect(),
                        None => s.split_whitespace().map(JValue::from).collect(),
                    };
                    JValue::from(parts)
                }
                _ => return Err(unknown()),
            })
        }
        ValueKind::Map => match name {
            "items" => {
                let mut items = Vec::new();
                for k in v.try_iter()? {
                    let val = v.get_item(&k)?;
                    items.push(JValue::from(vec![k, val]));
                }
                Ok(JValue::from(items))
            }
            "keys" => Ok(JValue::from(v.try_iter()?.collect::<Vec<_>>())),
            "values" => {
                let mut vals = Vec::new();
                for k in v.try_iter()? {
                    vals.push(v.get_item(&k)?);
                }
                Ok(JValue::from(vals))
            }
            "get" => {
                let k = args.first().cloned().unwrap_or_default();
                let r = v.get_item(&k)?;
                Ok(if r.is_undefined() {
                    args.get(1).cloned().unwrap_or(JValue::from(()))
                } else {
                    r
                })
            }
            _ => Err(unknown()),
        },
        _ => Err(unknown()),
    }
}

impl ChatTemplate {
    /// Compiles a template; `bos` and `eos` are the texts of the BOS/EOS tokens.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, InferenceError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.set_unknown_method_callback(py_methods);
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| InferenceError::Template(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos: bos.to_owned(),
            eos: eos.to_owned(),
        })
    }

    /// Renders the conversation; with `add_generation_prompt` the text ends
    /// where the assistant's reply should begin.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, InferenceError> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| InferenceError::Template(e.to_string()))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
        })
        .map_err(|e| InferenceError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_dates() {
        assert_eq!(strftime(0, "%Y-%m-%d %H:%M:%S"), "1970-01-01 00:00:00");
        // 2024-02-29 12:34:56 UTC
        assert_eq!(
            strftime(1_709_210_096, "%d %b %Y %H:%M:%S %j"),
            "29 Feb 2024 12:34:56 060"
        );
    }

    #[test]
    fn renders_with_python_methods_and_exceptions() {
        let src = "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no') }}{% endif %}[{{ m.role.upper() }}]{{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").expect("compile");
        let s = t
            .render(&[ChatMessage::new("user", "  hi  ")], true)
            .expect("render");
        assert_eq!(s, "[USER]hi\n>");
        let e = t
            .render(&[ChatMessage::new("bad", "x")], false)
            .expect_err("raise");
        assert!(e.to_string().contains("no"), "{e}");
        assert!(ChatTemplate::new("{% if %}", "", "").is_err());
    }
}
