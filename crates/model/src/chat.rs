//! Chat templates: a checkpoint's Jinja template (`chat_template.jinja`, or tokenizer_config.json's
//! `chat_template`) rendered as HF transformers' `apply_chat_template` renders it, so a chat
//! model (R1-Distill-Qwen, a Qwen2.5 or Llama 3 instruct model) sees the prompt it was trained on.
//!
//! transformers renders with Jinja2 in a sandbox with `trim_blocks` and `lstrip_blocks`, loop
//! controls (`break`, `continue`), its `{% generation %}` tag, the globals `raise_exception`
//! and `strftime_now` (local time, as Python's `datetime.now()`), its own `tojson` (Python's
//! `json.dumps`, not Jinja's HTML-escaping one), and the tokenizer's named special tokens
//! (`bos_token`, `eos_token`, ...) as variables. Templates also call Python's string methods
//! (`content.split('</think>')[-1]`): MiniJinja's Python-compatibility methods serve those, and
//! `{{ value }}` writes Python's `str()` of it (None, True, ['a'], 1e+20). The rendered text is
//! encoded as it is, no BOS added (`add_special_tokens=False`): the template writes its own.

use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};

use crate::tokenizer::{json_of, token_content, TOKENIZER_CONFIG_FILE};
use crate::{Error, Result};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (a template may know others, such as `tool`).
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A checkpoint's chat template with the special tokens it is rendered with.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    /// The file it came from, for errors.
    origin: PathBuf,
    /// The tokenizer's named special tokens (`bos_token`, ...), in HF's order.
    special_tokens: Vec<(String, String)>,
}

/// The named special tokens transformers passes to a template (`SPECIAL_TOKENS_ATTRIBUTES`).
const SPECIAL_TOKENS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

impl ChatTemplate {
    /// A template `source` rendered with `special_tokens` (name, text); `origin` names it in errors.
    pub fn new(source: impl Into<String>, origin: impl Into<PathBuf>, special_tokens: Vec<(String, String)>) -> Self {
        ChatTemplate { source: source.into(), origin: origin.into(), special_tokens }
    }

    /// The chat template of checkpoint directory `dir`, as transformers loads it:
    /// `chat_template.jinja` where there is one (transformers 5 writes it), else
    /// tokenizer_config.json's `chat_template` (a string, or a list of named templates whose
    /// `default` is the one), with the special tokens tokenizer_config.json names (a string or an
    /// AddedToken's `content`), or special_tokens_map.json's in their place for a config without
    /// `added_tokens_decoder` (an older transformers' files), as transformers reads them. `None`
    /// when the checkpoint has no template; an `additional_chat_templates/` folder without
    /// `chat_template.jinja` is refused (its templates would replace the config's).
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config = json_of(dir, TOKENIZER_CONFIG_FILE)?;
        let jinja = dir.join("chat_template.jinja");
        let named = dir.join("additional_chat_templates");
        if named.is_dir() && !jinja.exists() {
            // transformers 5 takes these in place of the config's template, and wants a default.
            return Err(Error::file(
                &named,
                "named chat templates without chat_template.jinja are not supported: name the one to use \
                 chat_template.jinja",
            ));
        }
        let (source, origin) = if jinja.exists() {
            (std::fs::read_to_string(&jinja).map_err(|e| Error::file(&jinja, e))?, jinja)
        } else {
            match &config["chat_template"] {
                serde_json::Value::Null => return Ok(None),
                serde_json::Value::String(s) => (s.clone(), config_path.clone()),
                serde_json::Value::Array(named) => {
                    let default = named.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str());
                    match default {
                        Some(s) => (s.to_string(), config_path.clone()),
                        None => {
                            return Err(Error::file(
                                &config_path,
                                "chat_template: a list of named templates without a `default` one",
                            ))
                        }
                    }
                }
                other => {
                    return Err(Error::file(&config_path, format!("chat_template: a string or a list, not {other}")))
                }
            }
        };
        // transformers 5 reads special_tokens_map.json only for a config that predates
        // `added_tokens_decoder` (which save_pretrained always writes), and then its tokens
        // replace the config's.
        let map = match config.get("added_tokens_decoder") {
            Some(_) => serde_json::Value::Null,
            None => json_of(dir, "special_tokens_map.json")?,
        };
        let special_tokens = SPECIAL_TOKENS
            .iter()
            .filter_map(|&name| {
                let token = token_content(if map.get(name).is_some() { &map[name] } else { &config[name] });
                Some((name.to_string(), token?))
            })
            .collect();
        Ok(Some(ChatTemplate { source, origin, special_tokens }))
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The file the template was read from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// `messages` rendered to the model's text; with `add_generation_prompt` it ends where the
    /// assistant's reply starts. A template error (its `raise_exception` too) names the file.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let env = environment();
        let fail = |e: minijinja::Error| {
            let line = e.line().map(|l| format!(" (template line {l})")).unwrap_or_default();
            let what = e.detail().filter(|d| !d.is_empty()).map_or_else(|| e.kind().to_string(), str::to_string);
            Error::file(&self.origin, format!("chat template: {what}{line}"))
        };
        // Jinja2 reads `\r\n` and a lone `\r` as `\n` (in text and string literals alike), and
        // transformers opens chat_template.jinja as text; MiniJinja keeps them.
        let source = generation_blocks_as_scopes(&self.source.replace("\r\n", "\n").replace('\r', "\n"));
        let template = env.template_from_str(&source).map_err(fail)?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let mut context: Vec<(String, Value)> =
            self.special_tokens.iter().map(|(name, token)| (name.clone(), Value::from(token.as_str()))).collect();
        context.push(("messages".into(), Value::from(messages)));
        context.push(("tools".into(), Value::from(())));
        context.push(("documents".into(), Value::from(())));
        context.push(("add_generation_prompt".into(), Value::from(add_generation_prompt)));
        template.render(Value::from_pairs(context)).map_err(fail)
    }
}

/// `source` with transformers' `{% generation %}...{% endgeneration %}` (its `AssistantTracker`
/// extension, which marks the assistant's text for training masks) written as
/// `{% with %}...{% endwith %}`, whitespace control kept: both render their body as it is, in a
/// scope of its own (a `set` inside does not outlive it), and MiniJinja has no such tag. The
/// scan steps over comments, expressions, strings and raw blocks, so only real tags change.
/// (transformers renders the body as a call block's `caller`, so there `varargs`, `kwargs` and
/// `caller` are the call's own and `break` cannot reach an enclosing loop; no template relies
/// on either.)
fn generation_blocks_as_scopes(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let (mut copied, mut at) = (0, 0);
    while let Some(found) = source[at..].find('{') {
        let open = at + found;
        let kind = source.as_bytes().get(open + 1).copied();
        let Some(end) = (match kind {
            Some(b'#') => source[open + 2..].find("#}").map(|e| open + 2 + e + 2),
            Some(b'{') => end_of(source, open + 2, "}}"),
            Some(b'%') => end_of(source, open + 2, "%}"),
            _ => Some(open + 1),
        }) else {
            break;
        };
        at = end;
        if kind != Some(b'%') {
            continue;
        }
        let tag = &source[open + 2..end - 2];
        match tag_name(tag) {
            "raw" => at = raw_end(source, end),
            name @ ("generation" | "endgeneration") => {
                let scope = if name == "generation" { "with" } else { "endwith" };
                out.push_str(&source[copied..open + 2]);
                out.push_str(&tag.replacen(name, scope, 1));
                copied = end - 2;
            }
            _ => {}
        }
    }
    out.push_str(&source[copied..]);
    out
}

/// A block tag's content without its whitespace-control marks and spaces: `endraw` for
/// `{%- endraw +%}`.
fn tag_name(tag: &str) -> &str {
    tag.trim_matches(['-', '+']).trim()
}

/// The index just past the first `close` at or after `from` that is not inside a quoted string
/// (`'...'` or `"..."`, backslash escapes); `None` when there is none.
fn end_of(source: &str, from: usize, close: &str) -> Option<usize> {
    let bytes = source.as_bytes();
    let (mut i, mut quote) = (from, None);
    while i < bytes.len() {
        match quote {
            Some(_) if bytes[i] == b'\\' => i += 1,
            Some(q) if bytes[i] == q => quote = None,
            Some(_) => {}
            None if bytes[i] == b'\'' || bytes[i] == b'"' => quote = Some(bytes[i]),
            None if bytes[i..].starts_with(close.as_bytes()) => return Some(i + close.len()),
            None => {}
        }
        i += 1;
    }
    None
}

/// The index just past the `{% endraw %}` that closes a raw block whose text starts at `from`
/// (the end of `source` when none does: MiniJinja reports it).
fn raw_end(source: &str, from: usize) -> usize {
    let mut at = from;
    while let Some(found) = source[at..].find("{%") {
        let open = at + found;
        let Some(close) = source[open + 2..].find("%}").map(|e| open + 2 + e) else { break };
        if tag_name(&source[open + 2..close]) == "endraw" {
            return close + 2;
        }
        at = open + 2;
    }
    source.len()
}

/// The environment transformers renders chat templates in (`_compile_jinja_template`).
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("the default delimiters");
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |message: String| -> std::result::Result<Value, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
    });
    env.add_function("strftime_now", |format: String| -> std::result::Result<Value, minijinja::Error> {
        let seconds =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        strftime(&format, seconds + local_utc_offset(seconds).unwrap_or(0)).map(Value::from)
    });
    env.add_filter("tojson", tojson);
    // `{{ 1e20 }}` writes Python's str() of a float (1e+20, nan); MiniJinja's own would be
    // 100000000000000000000.0 and NaN. (It already writes None, True and ['a'] as Python does.)
    env.set_formatter(|out, state, value| {
        if value.kind() == ValueKind::Number && !value.is_integer() {
            let text = match f64::try_from(value.clone()) {
                Ok(x) if x.is_nan() => "nan".to_string(),
                Ok(x) if x.is_infinite() => (if x > 0.0 { "inf" } else { "-inf" }).to_string(),
                _ => python_number(value),
            };
            return out
                .write_str(&text)
                .map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "writing the template's output"));
        }
        minijinja::escape_formatter(out, state, value)
    });
    env
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)` with those keywords, as transformers' `tojson` filter.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    // Python: an int indent is that many spaces, a string is itself; None is one line.
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(" ".repeat(v.as_usize().unwrap_or(0))),
        },
    };
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: separators is two strings")),
        // Python's default item separator drops its space when indenting.
        None => (if indent.is_some() { "," } else { ", " }.to_string(), ": ".to_string()),
    };
    let style =
        JsonStyle { ascii: ensure_ascii.unwrap_or(false), indent, item, key, sort_keys: sort_keys.unwrap_or(false) };
    let mut out = String::new();
    style.write(value, 0, &mut out)?;
    Ok(out)
}

struct JsonStyle {
    ascii: bool,
    indent: Option<String>,
    item: String,
    key: String,
    sort_keys: bool,
}

impl JsonStyle {
    fn write(&self, v: &Value, depth: usize, out: &mut String) -> std::result::Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&python_number(v)),
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container(('[', ']'), items.len(), depth, out, |i, out| self.write(&items[i], depth + 1, out))?;
            }
            ValueKind::Map | ValueKind::Plain => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    // As Python sorts the keys themselves: numbers by value, strings by text.
                    if keys.iter().all(|k| k.kind() == ValueKind::Number) {
                        keys.sort_by(|a, b| {
                            f64::try_from(a.clone()).unwrap_or(0.0).total_cmp(&f64::try_from(b.clone()).unwrap_or(0.0))
                        });
                    } else {
                        keys.sort_by_key(key_text);
                    }
                }
                self.container(('{', '}'), keys.len(), depth, out, |i, out| {
                    self.string(&key_text(&keys[i]), out);
                    out.push_str(&self.key);
                    self.write(&v.get_item(&keys[i])?, depth + 1, out)
                })?;
            }
            kind => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a value of kind {kind} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    /// `open`, the `n` items `each` writes separated as Python separates them, `close`.
    fn container(
        &self,
        (open, close): (char, char),
        n: usize,
        depth: usize,
        out: &mut String,
        mut each: impl FnMut(usize, &mut String) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        out.push(open);
        if n == 0 {
            out.push(close);
            return Ok(());
        }
        let newline = |out: &mut String, level: usize| {
            if let Some(unit) = &self.indent {
                out.push('\n');
                out.push_str(&unit.repeat(level));
            }
        };
        for i in 0..n {
            if i > 0 {
                out.push_str(&self.item);
            }
            newline(out, depth + 1);
            each(i, out)?;
        }
        newline(out, depth);
        out.push(close);
        Ok(())
    }

    /// A JSON string as Python writes it: `"`, `\` and control characters escaped (`\n`, `\t`
    /// and so on by name, others as `\u00XX`), and with `ensure_ascii` every non-ASCII character
    /// as `\uXXXX` (a surrogate pair above U+FFFF).
    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ascii && c as u32 >= 0x7f) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A map key as JSON writes it: a string as itself, anything else as its JSON text.
fn key_text(k: &Value) -> String {
    match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".into(),
        ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).into(),
        ValueKind::Number => python_number(k),
        _ => k.to_string(),
    }
}

/// A number as Python's `json.dumps` writes it: an integer in full; a float as `repr` (the
/// shortest digits that read back, fixed point for exponents -4 to 15, else `1e+16`), `NaN`,
/// `Infinity`, `-Infinity`.
fn python_number(v: &Value) -> String {
    if v.is_integer() {
        return v.to_string();
    }
    let x = f64::try_from(v.clone()).unwrap_or(f64::NAN);
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "1.5e-7".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("an exponent");
    let exp: i32 = exp.parse().expect("an integer exponent");
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let text = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        return format!("{sign}{text}");
    }
    let mantissa = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
    format!("{sign}{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
}

/// How far east of UTC local time is at `seconds` past the epoch, in seconds: C's `localtime_r`,
/// which Python's `datetime.now()` reads too (the `TZ` variable, else /etc/localtime), so a
/// template's date is the one transformers would write on this machine. 0 where C cannot say.
/// `None` on systems whose `struct tm` has no `tm_gmtoff`, where templates write UTC.
#[allow(unreachable_code)]
fn local_utc_offset(seconds: i64) -> Option<i64> {
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_vendor = "apple",
        target_os = "freebsd",
        target_os = "netbsd",
        target_os = "openbsd",
        target_os = "dragonfly"
    ))]
    {
        // A 32-bit time_t wraps after 2038, as C's own clock would.
        let t = seconds as libc::time_t;
        // SAFETY: `tm` is plain data that localtime_r fills, both pointers are to live locals,
        // and localtime_r is the reentrant form.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        let filled = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
        return Some(if filled { tm.tm_gmtoff as i64 } else { 0 });
    }
    let _ = seconds;
    None
}

/// `strftime(format)` of the wall-clock time `seconds` since the epoch (UTC, or local time
/// with [`local_utc_offset`] added), for the specifiers chat templates use (Llama 3's
/// `strftime_now("%d %b %Y")`): `%Y %y %m %d %e %B %b %A %a %H %I %M %S %p %j %%`, glibc's
/// unpadded `%-d` forms of the numbers, and a trailing `%` as itself.
fn strftime(format: &str, seconds: i64) -> std::result::Result<String, minijinja::Error> {
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
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday.
    let weekday = (days + 3).rem_euclid(7) as usize;
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        // `%-d`: the number without its padding.
        let unpadded = spec == Some('-');
        if unpadded {
            spec = chars.next();
        }
        let number = |n: i64, width: usize| if unpadded { n.to_string() } else { format!("{n:0width$}") };
        match spec {
            None => out.push('%'),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&number(year.rem_euclid(100), 2)),
            Some('m') => out.push_str(&number(month, 2)),
            Some('d') => out.push_str(&number(day, 2)),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('b') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&number(hour, 2)),
            Some('I') => out.push_str(&number((hour + 11) % 12 + 1, 2)),
            Some('M') => out.push_str(&number(minute, 2)),
            Some('S') => out.push_str(&number(second, 2)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&number(day_of_year, 3)),
            Some('%') => out.push('%'),
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported format %{}", other.map(String::from).unwrap_or_default()),
                ))
            }
        }
    }
    Ok(out)
}

/// The proleptic Gregorian (year, month, day) of `days` since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test's path, for the child process it starts.
    const LOCAL_TIME_TEST: &str = "chat::tests::strftime_now_writes_the_local_time_python_writes";

    #[test]
    fn strftime_now_writes_the_local_time_python_writes() {
        // The zone is the process's from its start: a child run of this test under a POSIX TZ
        // (which glibc reads without a zone database) checks it. Python under the same TZ gives
        // `time.localtime().tm_gmtoff` 19800.
        if std::env::var_os("WHALE_LOCAL_TIME_CHILD").is_some() {
            assert_eq!(local_utc_offset(1_796_353_509), Some(5 * 3600 + 30 * 60), "TZ=XST-5:30");
            let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
            let template = ChatTemplate::new("{{ strftime_now('%d %b %Y %H:%M') }}", "t.jinja", vec![]);
            let before = strftime("%d %b %Y %H:%M", now() + 19_800).unwrap();
            let rendered = template.render(&[], false).unwrap();
            let after = strftime("%d %b %Y %H:%M", now() + 19_800).unwrap();
            assert!(rendered == before || rendered == after, "{rendered} at {before}..{after}");
            return;
        }
        if local_utc_offset(0).is_some() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", LOCAL_TIME_TEST, "--test-threads=1"])
                .env("TZ", "XST-5:30")
                .env("WHALE_LOCAL_TIME_CHILD", "1")
                .output()
                .unwrap();
            let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success() && stdout.contains("1 passed"), "{stdout}{stderr}");
        }
    }

    #[test]
    fn only_real_generation_tags_are_rewritten_and_nothing_panics() {
        let rewritten = generation_blocks_as_scopes;
        assert_eq!(rewritten("é{%-generation+%}ü{%endgeneration -%}"), "é{%-with+%}ü{%endwith -%}");
        // Text that only looks like a tag, and unterminated tags, pass through unchanged.
        for same in [
            "{{ '{%}' }}{# {% generation %} #}",
            "{{ \"}}{% generation %}\" }}",
            "{% set x = '%}{% generation %}' %}",
            "{% raw %}{% generation %}{%- endraw %}",
            "{% raw %}{% generation %}",
            "{%}",
            "{%",
            "{",
            "{#",
            "{% generation",
            "{{ 'unclosed }}",
            "{% set generation = 1 %}{% generation_x %}",
        ] {
            assert_eq!(rewritten(same), same, "{same:?}");
        }
        assert_eq!(rewritten("{% raw %}a{% endraw %}{% generation %}"), "{% raw %}a{% endraw %}{% with %}");
        assert_eq!(rewritten("{# it's #}{%generation%}"), "{# it's #}{%with%}");
        // Every string of up to five of the characters the scan reacts to: no panic, and nothing
        // changes without a generation tag.
        let alphabet = ['{', '%', '}', '#', '\'', '"', '\\', 'é'];
        let mut strings = vec![String::new()];
        for _ in 0..5 {
            strings = strings.iter().flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}"))).collect();
            for s in &strings {
                assert_eq!(&rewritten(s), s);
            }
        }
    }

    #[test]
    fn dates_and_numbers_are_written_as_python_writes_them() {
        // 2026-12-04 03:05:09 UTC, a Friday, day 338.
        let t = 1_796_353_509;
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %I%p %e %%", t).unwrap(),
            "2026-12-04 03:05:09 Fri Friday Dec December 338 26 03AM  4 %"
        );
        assert_eq!(strftime("%d %b %Y", 0).unwrap(), "01 Jan 1970");
        assert_eq!(strftime("%d %b %Y", 951_782_400).unwrap(), "29 Feb 2000");
        assert!(strftime("%Z", 0).is_err());
        assert_eq!(strftime("%-d/%-m/%y %-H:%M %-j 100%", 951_782_400 + 3600).unwrap(), "29/2/00 1:00 60 100%");
        for days in [-800_000, -1, 0, 59, 10_957, 20_000, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        let cases: [(f64, &str); 10] = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456.789, "123456.789"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (-3.25e100, "-3.25e+100"),
        ];
        for (x, python) in cases {
            assert_eq!(python_number(&Value::from(x)), python, "{x}");
        }
        assert_eq!(python_number(&Value::from(-12)), "-12");
    }
}
