//! The configuration machinery: value types written for people, the
//! description of a setting, and the generic parts of a TOML configuration
//! file with `SHOAL_*` environment overrides and command-line flags.
//!
//! This module is a leaf: it imports nothing from the crate. Each layer owns
//! the serde type of its section and declares its settings next to it
//! (`pub const SETTINGS: &[config::Setting]`); [`crate::settings`] composes
//! the whole file from them and calls the functions here ([`parse_toml`],
//! [`apply_env`], [`set_value`], [`render_toml`]), which work over any
//! serde type and its table of [`Setting`]s.
//!
//! Sizes are written like `"20G"`, `"512M"`, `"64K"` or a plain number of
//! bytes (binary units), or `"unlimited"`; durations like `"90s"`, `"30m"`,
//! `"24h"`, `"7d"` or a plain number of seconds.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// The configuration-file format this build reads and writes.
pub const CONFIG_VERSION: u32 = 1;

/// Errors from loading or overriding the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or holds a bad value, at this line and column (1-based).
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Line, from 1.
        line: usize,
        /// Column, from 1 (in characters).
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// An environment variable holds a bad value.
    #[error("environment variable {var}={value:?}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// A setting given on the command line (or through `set`) is bad.
    #[error("setting {key} = {value:?}: {message}")]
    Override {
        /// Dotted key, e.g. `store.quota`.
        key: String,
        /// The value given.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// No setting has this key.
    #[error("unknown setting {0:?} (see `shoal config show` for the list)")]
    UnknownKey(String),
    /// The file was written for a configuration format this build does not read.
    #[error("config version {0} is not supported (this build reads version {CONFIG_VERSION})")]
    UnsupportedVersion(u32),
    /// Settings that are each valid but make no sense together, or out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

// ---------------------------------------------------------------------------
// Value types

/// A byte size written for people: `"20G"`, `"512M"`, `"64K"`, `1024`, `"unlimited"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// No limit.
    pub const UNLIMITED: ByteSize = ByteSize(u64::MAX);

    /// The number of bytes (`u64::MAX` when unlimited).
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Whether this is the "no limit" value.
    pub fn is_unlimited(self) -> bool {
        self.0 == u64::MAX
    }
}

/// Why a size or duration does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseValueError(String);

impl FromStr for ByteSize {
    type Err = ParseValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("unlimited") || s.eq_ignore_ascii_case("none") {
            return Ok(ByteSize::UNLIMITED);
        }
        let bad = || {
            ParseValueError(format!(
                "not a size: {s:?} (use e.g. 20G, 512M, 64K, 1024 or \"unlimited\")"
            ))
        };
        let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let unit = unit.to_ascii_uppercase();
        let mult: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
            "" => 1,
            "K" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            "T" => 1 << 40,
            _ => return Err(bad()),
        };
        let num = num.trim();
        if let Ok(n) = num.parse::<u64>() {
            return n.checked_mul(mult).map(ByteSize).ok_or_else(bad);
        }
        let n: f64 = num.parse().map_err(|_| bad())?;
        let v = n * mult as f64;
        if !(0.0..1.8e19).contains(&v) {
            return Err(bad());
        }
        Ok(ByteSize(v as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unlimited() {
            return f.write_str("unlimited");
        }
        for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
            let m = 1u64 << shift;
            if self.0 >= m && self.0.is_multiple_of(m) {
                return write!(f, "{}{unit}", self.0 / m);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// A duration written for people: `"500ms"`, `"90s"`, `"30m"`, `"24h"`, `"7d"`, or seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }

    /// From whole seconds.
    pub const fn secs(s: u64) -> Self {
        HumanDuration(Duration::from_secs(s))
    }
}

impl FromStr for HumanDuration {
    type Err = ParseValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let bad = || {
            ParseValueError(format!(
                "not a duration: {s:?} (use e.g. 500ms, 90s, 30m, 24h, 7d)"
            ))
        };
        let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.trim().parse().map_err(|_| bad())?;
        let ms: u64 = match unit {
            "ms" => 1,
            "" | "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        n.checked_mul(ms)
            .map(|ms| HumanDuration(Duration::from_millis(ms)))
            .ok_or_else(bad)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        let s = ms / 1000;
        for (unit, n) in [("d", 86_400), ("h", 3600), ("m", 60)] {
            if s >= n && s.is_multiple_of(n) {
                return write!(f, "{}{unit}", s / n);
            }
        }
        write!(f, "{s}s")
    }
}

/// Serde for types that are written as a string and may also be given as a
/// plain integer (bytes, seconds).
macro_rules! string_or_int_serde {
    ($t:ty, $what:literal) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl de::Visitor<'_> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$t, E> {
                        v.parse().map_err(E::custom)
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$t, E> {
                        u64::try_from(v)
                            .map_err(|_| E::custom(concat!("a negative ", $what)))
                            .and_then(|v| v.to_string().parse().map_err(E::custom))
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$t, E> {
                        v.to_string().parse().map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

string_or_int_serde!(ByteSize, "a size such as \"20G\" or a number of bytes");
string_or_int_serde!(
    HumanDuration,
    "a duration such as \"24h\" or a number of seconds"
);

/// Serde for a `u64` byte count written as a [`ByteSize`]
/// (`#[serde(with = "crate::config::size")]`).
pub mod size {
    use super::ByteSize;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Writes the bytes as a size (`"512M"`).
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        ByteSize(*v).serialize(s)
    }

    /// Reads a size or a plain number of bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        ByteSize::deserialize(d).map(ByteSize::bytes)
    }
}

/// Serde for an `Option<u64>` byte count written as a [`ByteSize`]
/// (`#[serde(with = "crate::config::opt_size")]`); `None` is left out.
pub mod opt_size {
    use super::ByteSize;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Writes the bytes as a size; `None` writes nothing (with `skip_serializing_if`).
    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        v.map(ByteSize).serialize(s)
    }

    /// Reads a size or a plain number of bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Option::<ByteSize>::deserialize(d).map(|b| b.map(ByteSize::bytes))
    }
}

/// Serde for a `usize` byte count written as a [`ByteSize`]
/// (`#[serde(with = "crate::config::usize_size")]`).
pub mod usize_size {
    use super::ByteSize;
    use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

    /// Writes the bytes as a size (`"256K"`).
    pub fn serialize<S: Serializer>(v: &usize, s: S) -> Result<S::Ok, S::Error> {
        ByteSize(*v as u64).serialize(s)
    }

    /// Reads a size or a plain number of bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        let b = ByteSize::deserialize(d)?;
        usize::try_from(b.bytes()).map_err(|_| de::Error::custom(format!("{b} is too large")))
    }
}

/// Serde for a [`Duration`] written as a [`HumanDuration`]
/// (`#[serde(with = "crate::config::duration")]`).
pub mod duration {
    use super::HumanDuration;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::time::Duration;

    /// Writes the duration for people (`"24h"`).
    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        HumanDuration(*v).serialize(s)
    }

    /// Reads a duration or a plain number of seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        HumanDuration::deserialize(d).map(HumanDuration::get)
    }
}

// ---------------------------------------------------------------------------
// The description of a setting

/// How a setting is written in TOML (and so how its environment variable is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A string (paths, sizes, durations, addresses, names).
    Str,
    /// `true`/`false` (environment: also `1`/`0`, `yes`/`no`, `on`/`off`).
    Bool,
    /// An integer.
    Int,
    /// A list of strings (environment: comma-separated).
    List,
}

/// One setting: its dotted key, environment variable, TOML kind and documentation.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// Dotted key: `store.quota`; top-level keys have no dot.
    pub key: &'static str,
    /// The `SHOAL_*` environment variable overriding it, if any.
    pub env: Option<&'static str>,
    /// How it is written.
    pub kind: Kind,
    /// What it does (one or more lines).
    pub doc: &'static str,
    /// An example value shown (commented out) when the setting is unset.
    pub example: &'static str,
}

impl Setting {
    /// A setting (for the `SETTINGS` tables of the layers).
    pub const fn new(
        key: &'static str,
        env: Option<&'static str>,
        kind: Kind,
        doc: &'static str,
        example: &'static str,
    ) -> Setting {
        Setting {
            key,
            env,
            kind,
            doc,
            example,
        }
    }
}

/// A section of the file: its name (`"store"`) and its documentation.
pub type Section = (&'static str, &'static str);

/// Looks up a setting by dotted key in `table`.
pub fn setting<'a>(table: &'a [Setting], key: &str) -> Option<&'a Setting> {
    table.iter().find(|s| s.key == key)
}

// ---------------------------------------------------------------------------
// The generic machinery

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

/// Reads an environment value as TOML of the setting's kind.
fn env_value(kind: Kind, raw: &str) -> Result<toml::Value, String> {
    Ok(match kind {
        Kind::Str => toml::Value::String(raw.to_owned()),
        Kind::Bool => match raw.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => toml::Value::Boolean(true),
            "0" | "false" | "no" | "off" => toml::Value::Boolean(false),
            _ => return Err("expected true or false".into()),
        },
        Kind::Int => toml::Value::Integer(
            raw.trim()
                .parse()
                .map_err(|_| "expected an integer".to_owned())?,
        ),
        Kind::List => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(|x| toml::Value::String(x.to_owned()))
                .collect(),
        ),
    })
}

/// Parses a configuration file's text into `T` (missing keys take their
/// defaults when `T` says `#[serde(default)]`). `path` is only used in error
/// messages, which carry the line and column.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = line_col(text, e.span().map(|s| s.start).unwrap_or(0));
        ConfigError::Parse {
            path: path.to_owned(),
            line,
            column,
            message: e.message().trim().to_owned(),
        }
    })
}

/// Reads the file at `path` into `T` ([`parse_toml`]).
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(&text, path)
}

/// `cfg` with one setting of `table` changed from its string form, as written
/// on a command line: `("store.quota", "20G")`, `("mesh.peers", "/ip4/…,/ip4/…")`.
/// `validate` checks the result; on any error `cfg` is left as it was.
pub fn set_value<T: Serialize + DeserializeOwned>(
    cfg: &T,
    table: &[Setting],
    key: &str,
    raw: &str,
    validate: impl Fn(&T) -> Result<(), ConfigError>,
) -> Result<T, ConfigError> {
    let st = setting(table, key).ok_or_else(|| ConfigError::UnknownKey(key.to_owned()))?;
    let err = |message: String| ConfigError::Override {
        key: key.to_owned(),
        value: raw.to_owned(),
        message,
    };
    let value = env_value(st.kind, raw).map_err(err)?;
    let mut tree = toml::Value::try_from(cfg).map_err(|e| err(e.to_string()))?;
    let (section, name) = match key.split_once('.') {
        Some((a, b)) => (Some(a), b),
        None => (None, key),
    };
    let table = match section {
        Some(sec) => tree.get_mut(sec),
        None => Some(&mut tree),
    }
    .and_then(toml::Value::as_table_mut)
    .ok_or_else(|| err("internal: section missing".into()))?;
    table.insert(name.to_owned(), value);
    let new: T = tree
        .try_into()
        .map_err(|e: toml::de::Error| err(e.message().trim().to_owned()))?;
    validate(&new).map_err(|e| err(e.to_string()))?;
    Ok(new)
}

/// Applies the `SHOAL_*` environment variables of `table` (read through
/// `env`) to `cfg`, in table order, each as [`set_value`] would.
pub fn apply_env<T: Serialize + DeserializeOwned>(
    cfg: &mut T,
    table: &[Setting],
    env: impl Fn(&str) -> Option<String>,
    validate: impl Fn(&T) -> Result<(), ConfigError>,
) -> Result<(), ConfigError> {
    for st in table {
        let Some(var) = st.env else { continue };
        let Some(raw) = env(var) else { continue };
        *cfg = set_value(cfg, table, st.key, &raw, &validate).map_err(|e| ConfigError::Env {
            var: var.to_owned(),
            value: raw.clone(),
            message: match e {
                ConfigError::Override { message, .. } => message,
                other => other.to_string(),
            },
        })?;
    }
    Ok(())
}

/// `cfg` as a commented TOML file: `header`, then every setting of `table`
/// in order with its documentation and environment variable, under the
/// section headers of `sections`; settings `cfg` leaves unset are shown
/// commented out with their example. Parsing it gives back `cfg`.
pub fn render_toml<T: Serialize>(
    cfg: &T,
    header: &str,
    table: &[Setting],
    sections: &[Section],
) -> String {
    let tree = toml::Value::try_from(cfg).unwrap_or(toml::Value::Table(Default::default()));
    let mut out = String::from(header);
    let mut current: Option<&str> = None;
    for st in table {
        let (section, name) = match st.key.split_once('.') {
            Some((a, b)) => (Some(a), b),
            None => (None, st.key),
        };
        if section != current {
            current = section;
            if let Some(sec) = section {
                out.push('\n');
                if let Some((_, doc)) = sections.iter().find(|(n, _)| *n == sec) {
                    out.push_str(&format!("# {doc}\n"));
                }
                out.push_str(&format!("[{sec}]\n"));
            }
        }
        out.push('\n');
        for line in st.doc.lines() {
            out.push_str(&format!("# {line}\n"));
        }
        if let Some(var) = st.env {
            out.push_str(&format!("# Environment: {var}\n"));
        }
        let value = match section {
            Some(sec) => tree.get(sec).and_then(|t| t.get(name)),
            None => tree.get(name),
        };
        match value {
            Some(v) => out.push_str(&format!("{name} = {v}\n")),
            None => out.push_str(&format!("#{name} = {}\n", st.example)),
        }
    }
    out
}

/// Where to look for a configuration file when none is given: `$SHOAL_CONFIG`,
/// else `$XDG_CONFIG_HOME/shoal/shoal.toml` (or `~/.config/shoal/shoal.toml`)
/// if it exists, else `/etc/shoal/shoal.toml` if it exists.
pub fn discover() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SHOAL_CONFIG").filter(|s| !s.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let user = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|s| !s.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })
        .map(|d| d.join("shoal/shoal.toml"));
    user.into_iter()
        .chain([PathBuf::from("/etc/shoal/shoal.toml")])
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        let ok = |s: &str| s.parse::<ByteSize>().ok().map(|b| b.0);
        assert_eq!(ok("1024"), Some(1024));
        assert_eq!(ok("64K"), Some(65536));
        assert_eq!(ok("20G"), Some(20 << 30));
        assert_eq!(ok("2GiB"), Some(2 << 30));
        assert_eq!(ok("1.5G"), Some(3 << 29));
        assert_eq!(ok("unlimited"), Some(u64::MAX));
        assert_eq!(ok("12Q"), None);
        assert_eq!(ok("-1"), None);
        assert_eq!(ok("99999999T"), None);
        for s in ["20G", "512M", "1536M", "1000", "unlimited", "3K"] {
            assert_eq!(
                s.parse::<ByteSize>().map(|b| b.to_string()).ok(),
                Some(s.into())
            );
        }
        let d = |s: &str| s.parse::<HumanDuration>().ok().map(|d| d.0);
        assert_eq!(d("90s"), Some(Duration::from_secs(90)));
        assert_eq!(d("90"), Some(Duration::from_secs(90)));
        assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(d("7d"), Some(Duration::from_secs(7 * 86400)));
        assert_eq!(d("1w"), None);
        assert_eq!(d("h"), None);
        for s in ["90s", "30m", "2h", "7d", "1500ms", "25h"] {
            assert_eq!(
                s.parse::<HumanDuration>().map(|d| d.to_string()).ok(),
                Some(s.into())
            );
        }
    }
}
