//! Secrets from the environment or files, and keeping them out of every output.
//!
//! The connection URLs come from `[redis] url` / `[postgres] url`, overridden by `REDIS_URL` /
//! `DATABASE_URL`, or by `REDIS_URL_FILE` / `DATABASE_URL_FILE` (a file holding the URL: the
//! Docker and Kubernetes secrets convention). A password may instead live in its own file,
//! `[redis] password_file` / `[postgres] password_file`, and is then put into the URL here. A
//! file's content is used as it is, less one trailing newline. `strata_stages::Config::load`
//! resolves all of this through [`resolve_env`] and [`with_password`], and nowhere else.
//!
//! Since a resolved URL may carry a password, a URL is shown only through [`redact_url`] (or
//! [`Redacted`]): in `status`, logs, errors and the `Debug` of the config sections.

use std::fmt;
use std::path::Path;

/// Why a secret could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Both the variable and its `_FILE` form are set, so which one wins would be a guess.
    #[error("both {var} and {file_var} are set: set only one of them")]
    Both {
        /// The variable holding the value (`REDIS_URL`).
        var: String,
        /// The variable naming a file holding it (`REDIS_URL_FILE`).
        file_var: String,
    },
    /// The file could not be read.
    #[error("cannot read {what} from {path}")]
    Read {
        /// What the file holds, as the config names it (`[redis] password_file`).
        what: String,
        /// The file.
        path: String,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The file holds nothing (a secret mounted empty is a deployment mistake).
    #[error("{what}: {path} is empty")]
    Empty {
        /// What the file holds, as the config names it.
        what: String,
        /// The file.
        path: String,
    },
}

/// Reads a secret file: its content less one trailing newline (`\n` or `\r\n`). `what` names the
/// setting in errors.
pub fn read_secret_file(path: &Path, what: &str) -> Result<String, SecretError> {
    let mut text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
        what: what.to_string(),
        path: path.display().to_string(),
        source,
    })?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err(SecretError::Empty {
            what: what.to_string(),
            path: path.display().to_string(),
        });
    }
    Ok(text)
}

/// The value of `var`, or of the file named by `var_FILE`; None when neither is set (an empty
/// variable counts as unset). Both set is an error naming both.
pub fn resolve_env(
    var: &str,
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Option<String>, SecretError> {
    let file_var = format!("{var}_FILE");
    let set = |k: &str| get(k).filter(|v| !v.is_empty());
    match (set(var), set(&file_var)) {
        (Some(_), Some(_)) => Err(SecretError::Both {
            var: var.to_string(),
            file_var,
        }),
        (Some(v), None) => Ok(Some(v)),
        (None, Some(path)) => read_secret_file(Path::new(&path), &file_var).map(Some),
        (None, None) => Ok(None),
    }
}

/// `url` with `password` as its password: in the userinfo of a URL (`scheme://user:pw@host`,
/// percent-encoded), or as `password='…'` appended to a libpq key=value string.
pub fn with_password(url: &str, password: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        let quoted = password.replace('\\', "\\\\").replace('\'', "\\'");
        return format!("{url} password='{quoted}'");
    };
    let encoded: String = password
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (authority, path) = split_authority(rest);
    let (user, host) = match authority.rsplit_once('@') {
        Some((userinfo, host)) => (userinfo.split(':').next().unwrap_or(""), host),
        None => ("", authority),
    };
    format!("{scheme}://{user}:{encoded}@{host}{path}")
}

/// `rest` (after `scheme://`) split into the authority and what follows it.
fn split_authority(rest: &str) -> (&str, &str) {
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    rest.split_at(end)
}

/// `url` without its password: `scheme://user@host…` for a URL; for a libpq key=value string,
/// the value of `password` replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return redact_key_value(url);
    };
    let (authority, path) = split_authority(rest);
    let path = redact_query(path);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split(':').next().unwrap_or("") {
            "" => format!("{scheme}://{host}{path}"),
            user => format!("{scheme}://{user}@{host}{path}"),
        },
        None => format!("{scheme}://{authority}{path}"),
    }
}

/// A URL's `?password=…` query parameter (libpq accepts it) replaced by `***`.
fn redact_query(path: &str) -> String {
    let Some((before, query)) = path.split_once('?') else {
        return path.to_string();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => p.to_string(),
        })
        .collect();
    format!("{before}?{}", params.join("&"))
}

/// A libpq key=value string with the value of `password` replaced by `***`.
fn redact_key_value(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = find_key(rest, "password") {
        out.push_str(&rest[..at]);
        out.push_str("password=***");
        let value = rest[at + "password".len()..].trim_start();
        let value = value.strip_prefix('=').unwrap_or(value).trim_start();
        rest = skip_value(value);
    }
    out.push_str(rest);
    out
}

/// Where `key` (followed by optional spaces and `=`) starts in `s` as a whole word.
fn find_key(s: &str, key: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find(key) {
        let at = from + i;
        let word_start = at == 0 || s.as_bytes()[at - 1].is_ascii_whitespace();
        let after = s[at + key.len()..].trim_start();
        if word_start && after.starts_with('=') {
            return Some(at);
        }
        from = at + key.len();
    }
    None
}

/// What follows a key=value value (quoted with `'…'` and backslash escapes, or up to a space).
fn skip_value(v: &str) -> &str {
    if let Some(quoted) = v.strip_prefix('\'') {
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '\'' => return &quoted[i + 1..],
                _ => {}
            }
        }
        ""
    } else {
        v.find(char::is_whitespace).map_or("", |i| &v[i..])
    }
}

/// Displays a URL through [`redact_url`]: `info!(url = %Redacted(&url))`.
#[derive(Debug, Clone, Copy)]
pub struct Redacted<'a>(pub &'a str);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(self.0))
    }
}

/// Compares two secrets in time that depends on their lengths only, not on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_go_into_urls_and_never_come_out() {
        let u = with_password("redis://strata@h:6379/0", "p@ss:w/rd");
        assert_eq!(u, "redis://strata:p%40ss%3Aw%2Frd@h:6379/0");
        let info = redis::IntoConnectionInfo::into_connection_info(u.as_str()).unwrap();
        assert_eq!(info.redis_settings().password(), Some("p@ss:w/rd"));
        assert_eq!(redact_url(&u), "redis://strata@h:6379/0");
        let pg = with_password("postgres://app:old@db:5432/strata", "n3w'pw");
        let cfg: tokio_postgres::Config = pg.parse().unwrap();
        assert_eq!(cfg.get_password(), Some(&b"n3w'pw"[..]));
        assert_eq!(redact_url(&pg), "postgres://app@db:5432/strata");
        let kv = with_password("host=db user=app dbname=strata", "it's secret");
        let cfg: tokio_postgres::Config = kv.parse().unwrap();
        assert_eq!(cfg.get_password(), Some(&b"it's secret"[..]));
        assert_eq!(
            redact_url(&kv),
            "host=db user=app dbname=strata password=***"
        );
        assert_eq!(
            redact_url("postgres://db/x?user=a&password=s3"),
            "postgres://db/x?user=a&password=***"
        );
        assert_eq!(redact_url("redis://:secret@h:6379/0"), "redis://h:6379/0");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn env_and_file_forms_exclude_each_other() {
        let dir = std::env::temp_dir().join(format!("strata-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("url");
        std::fs::write(&file, "redis://u:pw@h\n").unwrap();
        let path = file.display().to_string();
        let only_file = |k: &str| (k == "REDIS_URL_FILE").then(|| path.clone());
        assert_eq!(
            resolve_env("REDIS_URL", &only_file).unwrap().as_deref(),
            Some("redis://u:pw@h")
        );
        let both = |k: &str| {
            Some(if k.ends_with("_FILE") {
                path.clone()
            } else {
                "x".into()
            })
        };
        let err = resolve_env("REDIS_URL", &both).unwrap_err().to_string();
        assert!(err.contains("REDIS_URL and REDIS_URL_FILE"), "{err}");
        assert_eq!(resolve_env("REDIS_URL", &|_| None).unwrap(), None);
        std::fs::write(&file, "\n").unwrap();
        assert!(matches!(
            read_secret_file(&file, "[redis] password_file"),
            Err(SecretError::Empty { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
