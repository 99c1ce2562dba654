//! Chat templates from `tokenizer.chat_template`, rendered with minijinja.

use super::InferenceError;
use minijinja::value::{Value as JValue, ValueKind};
use minijinja::{Environment, Error as JError, ErrorKind, State};
use std::time::{Duration, Instant};

/// Bounds on one render of a chat template. A template comes with the model
/// file, which may be anyone's (a chat request naming an id pulls it from the
/// mesh), so a render must not be able to run, or grow, without end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateLimits {
    /// minijinja fuel: instructions one render may execute (about one per
    /// loop iteration, output and expression step).
    pub fuel: u64,
    /// Largest rendered text in bytes.
    pub max_output: usize,
    /// Wall time after which a render stops at its next write of output
    /// (loops that write nothing are bounded by `fuel`).
    pub time: Duration,
    /// Renders of one template that may run at once; more are refused. A
    /// render that is slow per step (huge string operations) is bounded by
    /// `fuel` only, so this caps the CPU one hostile template can hold.
    pub concurrent: usize,
}

impl Default for TemplateLimits {
    /// 20 million instructions (about a second; a real template spends a
    /// few dozen per message), 8 MiB of text (8x the default request body
    /// limit), 2 s, 4 renders at once.
    fn default() -> Self {
        TemplateLimits {
            fuel: 20_000_000,
            max_output: 8 << 20,
            time: Duration::from_secs(2),
            concurrent: 4,
        }
    }
}

/// Which limit a render hit (set by the writer, read after the render).
#[derive(Debug, Clone, Copy)]
enum Hit {
    Output,
    Time,
}

/// Collects a render's output, refusing to grow past `max` bytes or past
/// the deadline.
struct Bounded {
    buf: Vec<u8>,
    max: usize,
    deadline: Instant,
    hit: Option<Hit>,
}

impl std::io::Write for Bounded {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.max {
            self.hit = Some(Hit::Output);
            return Err(std::io::Error::other("template output limit"));
        }
        if Instant::now() >= self.deadline {
            self.hit = Some(Hit::Time);
            return Err(std::io::Error::other("template time limit"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

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
    limits: TemplateLimits,
    running: std::sync::atomic::AtomicUsize,
    /// Whether the template renders a leading `system` message (see
    /// [`ChatTemplate::supports_system_role`]).
    system_role: bool,
    /// Whether `developer` messages become `system` ones (all templates but
    /// OpenAI's harmony format, as llama.cpp does).
    developer_to_system: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

fn raise_exception(msg: String) -> Result<JValue, JError> {
    Err(JError::new(ErrorKind::InvalidOperation, msg))
}

/// Fuel of the system-role probe at compile time.
const PROBE_FUEL: u64 = 200_000;

/// The context variable holding a render's time (seconds since the epoch).
const NOW_VAR: &str = "__shoal_now";

/// `strftime_now(fmt)`: the render's UTC time ([`ChatTemplate::render_at`]),
/// for %Y %m %d %H %M %S %b %B %y %e %j %%.
fn strftime_now(state: &State, fmt: String) -> String {
    let secs = state
        .lookup(NOW_VAR)
        .and_then(|v| i64::try_from(v).ok())
        .unwrap_or(0);
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
    /// Compiles a template with the default [`TemplateLimits`]; `bos` and
    /// `eos` are the texts of the BOS/EOS tokens.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, InferenceError> {
        Self::with_limits(source, bos, eos, TemplateLimits::default())
    }

    /// Compiles a template whose renders are bounded by `limits`.
    pub fn with_limits(
        source: &str,
        bos: &str,
        eos: &str,
        limits: TemplateLimits,
    ) -> Result<Self, InferenceError> {
        let mut env = Environment::new();
        // minijinja keeps the fuel in an isize.
        env.set_fuel(Some(limits.fuel.min(isize::MAX as u64)));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.set_unknown_method_callback(py_methods);
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| InferenceError::Template(e.to_string()))?;
        let mut t = ChatTemplate {
            env,
            bos: bos.to_owned(),
            eos: eos.to_owned(),
            limits,
            running: std::sync::atomic::AtomicUsize::new(0),
            system_role: true,
            developer_to_system: !source.contains("<|channel|>"),
        };
        // llama.cpp's capability probe: a system message whose content the
        // template never uses (it raises, or skips it) is not supported.
        // Its content is then merged into the next message (see `render_at`).
        const PROBE: &str = "System message";
        let probe = [
            ChatMessage::new("system", PROBE),
            ChatMessage::new("user", "User message"),
        ];
        // A real template renders two messages in a few thousand steps;
        // a hostile one must not cost a full render's fuel here as well.
        t.env.set_fuel(Some(limits.fuel.min(PROBE_FUEL)));
        t.system_role = t
            .render_messages(&probe, true, 0)
            .is_ok_and(|s| s.contains(PROBE));
        t.env.set_fuel(Some(limits.fuel.min(isize::MAX as u64)));
        Ok(t)
    }

    /// Whether the template renders a leading `system` message. When it
    /// does not (Gemma's raise an error), [`ChatTemplate::render`] merges
    /// the system text into the next message, `system + "\n" + next`, or
    /// drops it when it is alone, like llama-server.
    pub fn supports_system_role(&self) -> bool {
        self.system_role
    }

    /// The limits renders run under.
    pub fn limits(&self) -> TemplateLimits {
        self.limits
    }

    /// Renders the conversation; with `add_generation_prompt` the text ends
    /// where the assistant's reply should begin.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, InferenceError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()) as i64;
        self.render_at(messages, add_generation_prompt, now)
    }

    /// [`ChatTemplate::render`] as at `unix_secs` (UTC): the time behind
    /// `strftime_now()` and the `date_string` (`%d %b %Y`) and `datetime`
    /// (`%b %d %Y`) variables llama-server passes every template.
    ///
    /// Messages are first adjusted as llama-server adjusts them: `developer`
    /// becomes `system`, and a leading system message the template cannot
    /// render is merged into the next one.
    pub fn render_at(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        unix_secs: i64,
    ) -> Result<String, InferenceError> {
        let mut msgs = messages.to_vec();
        if self.developer_to_system {
            for m in &mut msgs {
                if m.role == "developer" {
                    m.role = "system".to_owned();
                }
            }
        }
        if !self.system_role && msgs.first().is_some_and(|m| m.role == "system") {
            let sys = msgs.remove(0);
            if let Some(next) = msgs.first_mut() {
                next.content = format!("{}\n{}", sys.content, next.content);
            }
        }
        self.render_messages(&msgs, add_generation_prompt, unix_secs)
    }

    /// Renders a conversation that ends with a partial assistant message
    /// (a prefill) so that the model continues that message, as
    /// llama-server does: the text of the earlier messages without
    /// generation prompt, then what the generation prompt adds to it, then
    /// the last message's content. (For templates with a reasoning block,
    /// llama-server also inserts an empty `<think>` block here; that is not
    /// reproduced.) Without a final assistant message this is
    /// [`ChatTemplate::render_at`] with a generation prompt.
    pub fn render_continuation_at(
        &self,
        messages: &[ChatMessage],
        unix_secs: i64,
    ) -> Result<String, InferenceError> {
        let Some((last, head)) = messages
            .split_last()
            .filter(|(last, _)| last.role == "assistant")
        else {
            return self.render_at(messages, true, unix_secs);
        };
        let without = self.render_at(head, false, unix_secs)?;
        let with = self.render_at(head, true, unix_secs)?;
        let common = without
            .bytes()
            .zip(with.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        // Back to a char boundary of `with` (the texts may differ inside a
        // multi-byte character).
        let mut cut = common;
        while !with.is_char_boundary(cut) {
            cut -= 1;
        }
        Ok(format!("{without}{}{}", &with[cut..], last.content))
    }

    fn render_messages(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        unix_secs: i64,
    ) -> Result<String, InferenceError> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| InferenceError::Template(e.to_string()))?;
        use std::sync::atomic::Ordering;
        let l = self.limits;
        if self.running.fetch_add(1, Ordering::AcqRel) >= l.concurrent {
            self.running.fetch_sub(1, Ordering::AcqRel);
            return Err(InferenceError::Template(format!(
                "template limit: {} renders of this model's chat template are already running",
                l.concurrent
            )));
        }
        struct Running<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _running = Running(&self.running);
        let mut out = Bounded {
            buf: Vec::new(),
            max: self.limits.max_output,
            deadline: Instant::now() + self.limits.time,
            hit: None,
        };
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
            date_string => strftime(unix_secs, "%d %b %Y"),
            datetime => strftime(unix_secs, "%b %d %Y"),
            // llama-server's default for templates with a reasoning block
            // (thinking on); templates without one do not read it.
            enable_thinking => true,
            __shoal_now => unix_secs,
        };
        let res = t.render_captured_to(ctx, &mut out);
        match (res, out.hit) {
            (Ok(_), _) => String::from_utf8(out.buf)
                .map_err(|_| InferenceError::Template("rendered text is not UTF-8".into())),
            (Err(_), Some(Hit::Output)) => Err(InferenceError::Template(format!(
                "template limit: the rendered prompt exceeds {} bytes",
                l.max_output
            ))),
            (Err(_), Some(Hit::Time)) => Err(InferenceError::Template(format!(
                "template limit: rendering took longer than {:?}",
                l.time
            ))),
            (Err(e), None) if is_out_of_fuel(&e) => Err(InferenceError::Template(format!(
                "template limit: rendering exceeded {} steps (the model's chat template loops too long)",
                l.fuel
            ))),
            (Err(e), None) => Err(InferenceError::Template(e.to_string())),
        }
    }
}

fn is_out_of_fuel(e: &JError) -> bool {
    matches!(e.kind(), ErrorKind::OutOfFuel)
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

    /// A template that refuses system messages gets the system text merged
    /// into the next message; one that renders them is left alone.
    #[test]
    fn system_role_probe_and_merge() {
        let gemma = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}<{{ m.role }}>{{ m.content }}{% endfor %}";
        let t = ChatTemplate::new(gemma, "", "").expect("compile");
        assert!(!t.supports_system_role());
        let msgs = [
            ChatMessage::new("system", "S"),
            ChatMessage::new("user", "U"),
        ];
        assert_eq!(t.render(&msgs, false).expect("render"), "<user>S\nU");
        assert_eq!(t.render(&msgs[..1], false).expect("render"), "");
        let plain = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}";
        let t = ChatTemplate::new(plain, "", "").expect("compile");
        assert!(t.supports_system_role());
        let dev = [ChatMessage::new("developer", "D")];
        assert_eq!(t.render(&dev, false).expect("render"), "<system>D");
    }

    /// The render's time drives `date_string` and `strftime_now`; a prefill
    /// continues the last assistant message after the generation prompt.
    #[test]
    fn render_time_and_continuation() {
        let src = "{{ date_string }}|{{ strftime_now('%Y') }}|{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}{% if add_generation_prompt %}[assistant:{% endif %}";
        let t = ChatTemplate::new(src, "", "").expect("compile");
        let msgs = [
            ChatMessage::new("user", "hi"),
            ChatMessage::new("assistant", "Sure"),
        ];
        assert_eq!(
            t.render_at(&msgs[..1], true, 1_709_210_096)
                .expect("render"),
            "29 Feb 2024|2024|[user:hi][assistant:"
        );
        assert_eq!(
            t.render_continuation_at(&msgs, 0).expect("render"),
            "01 Jan 1970|1970|[user:hi][assistant:Sure"
        );
    }

    /// The template of issue 14: two nested `range(100000)` loops. It
    /// must end with a clear error naming the limit, not run for hours.
    #[test]
    fn hostile_loops_run_out_of_fuel() {
        let src =
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").expect("compile");
        let e = t
            .render(&[ChatMessage::new("user", "hi")], true)
            .expect_err("must run out");
        let m = e.to_string();
        assert!(m.contains("template limit") && m.contains("steps"), "{m}");
    }

    /// Output is bounded even when the loop is short.
    #[test]
    fn huge_output_is_refused() {
        let src = "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}";
        let limits = TemplateLimits {
            max_output: 1 << 20,
            ..TemplateLimits::default()
        };
        let t = ChatTemplate::with_limits(src, "", "", limits).expect("compile");
        let e = t.render(&[], true).expect_err("must stop");
        let m = e.to_string();
        assert!(m.contains("template limit") && m.contains("bytes"), "{m}");
    }

    /// A render that writes past its deadline stops at the next write.
    #[test]
    fn slow_render_stops_at_the_deadline() {
        let src =
            "{% for i in range(100000) %}{% for j in range(100000) %}.{% endfor %}{% endfor %}";
        let limits = TemplateLimits {
            fuel: u64::MAX,
            max_output: usize::MAX,
            time: Duration::ZERO,
            concurrent: 1,
        };
        let t = ChatTemplate::with_limits(src, "", "", limits).expect("compile");
        let e = t.render(&[], true).expect_err("must stop");
        assert!(e.to_string().contains("took longer"), "{e}");
    }
}
