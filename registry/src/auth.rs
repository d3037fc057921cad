//! The registry side of authentication: `WWW-Authenticate` challenges and bearer tokens cached
//! per scope (the Docker token protocol that distribution, Harbor, GHCR and Docker Hub speak).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What the registry asked for in a `401`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// The first challenge of a scheme Stella speaks, among all `WWW-Authenticate` values.
pub(crate) fn parse_challenges<'a>(values: impl Iterator<Item = &'a str>) -> Option<Challenge> {
    for value in values {
        for (scheme, params) in split_challenges(value) {
            if scheme.eq_ignore_ascii_case("basic") {
                return Some(Challenge::Basic);
            }
            if scheme.eq_ignore_ascii_case("bearer") {
                let get = |key: &str| {
                    params
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(key))
                        .map(|(_, v)| v.clone())
                };
                if let Some(realm) = get("realm").filter(|r| !r.is_empty()) {
                    return Some(Challenge::Bearer {
                        realm,
                        service: get("service"),
                        scope: get("scope"),
                    });
                }
            }
        }
    }
    None
}

type Params = Vec<(String, String)>;

/// RFC 7235: `scheme param=value, param="quoted, value", scheme2 param=…`. A token that is not
/// followed by `=` starts the next challenge.
fn split_challenges(value: &str) -> Vec<(String, Params)> {
    let chars: Vec<char> = value.chars().collect();
    let mut i = 0;
    let mut out: Vec<(String, Params)> = Vec::new();
    let skip = |i: &mut usize, set: &[char]| {
        while *i < chars.len() && set.contains(&chars[*i]) {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let start = *i;
        while *i < chars.len() && !matches!(chars[*i], ' ' | '\t' | ',' | '=' | '"') {
            *i += 1;
        }
        chars[start..*i].iter().collect::<String>()
    };
    while i < chars.len() {
        skip(&mut i, &[' ', '\t', ',']);
        let word = token(&mut i);
        if word.is_empty() {
            // A stray '=' or '"' where a token belongs: nothing sensible follows.
            break;
        }
        skip(&mut i, &[' ', '\t']);
        if i < chars.len() && chars[i] == '=' && !out.is_empty() {
            i += 1;
            skip(&mut i, &[' ', '\t']);
            let value = if i < chars.len() && chars[i] == '"' {
                i += 1;
                let mut v = String::new();
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' && i + 1 < chars.len() {
                        i += 1;
                    }
                    v.push(chars[i]);
                    i += 1;
                }
                i += 1;
                v
            } else {
                token(&mut i)
            };
            if let Some((_, params)) = out.last_mut() {
                params.push((word, value));
            }
        } else {
            out.push((word, Vec::new()));
        }
    }
    out
}

/// A token is not reused in its last seconds: it could expire on its way to the registry.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// The spec's default when the token service gives no `expires_in`.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// Bearer tokens by scope (`repository:demo/app:pull`), so that listing a repository and
/// resolving its tags asks the token service once.
#[derive(Default)]
pub(crate) struct TokenCache {
    tokens: Mutex<HashMap<String, CachedToken>>,
}

struct CachedToken {
    token: String,
    valid_until: Instant,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scopes: Vec<String> = self
            .tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        f.debug_struct("TokenCache")
            .field("scopes", &scopes)
            .finish_non_exhaustive()
    }
}

impl TokenCache {
    pub(crate) fn get(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        tokens
            .get(scope)
            .filter(|t| Instant::now() < t.valid_until)
            .map(|t| t.token.clone())
    }

    pub(crate) fn put(&self, scope: &str, token: String, expires_in: Option<u64>) {
        let lifetime = expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        let valid_until = Instant::now() + lifetime.saturating_sub(EXPIRY_MARGIN);
        self.tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(scope.to_string(), CachedToken { token, valid_until });
    }
}

/// A token service's answer: `token` (Docker) or `access_token` (OAuth2).
#[derive(serde::Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    pub(crate) expires_in: Option<u64>,
}

impl TokenResponse {
    pub(crate) fn into_token(self) -> Option<String> {
        self.token
            .filter(|t| !t.is_empty())
            .or(self.access_token.filter(|t| !t.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_are_parsed() {
        let c = parse_challenges(std::iter::once(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:demo/app:pull,push""#,
        ));
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".to_string(),
                service: Some("registry.example".to_string()),
                scope: Some("repository:demo/app:pull,push".to_string()),
            })
        );
        let c = parse_challenges(std::iter::once(
            r#"bearer realm=http://127.0.0.1:1/t, scope="a \"b\"""#,
        ));
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:1/t".to_string(),
                service: None,
                scope: Some(r#"a "b""#.to_string()),
            })
        );
    }

    #[test]
    fn the_first_supported_challenge_wins() {
        assert_eq!(
            parse_challenges(std::iter::once(r#"Basic realm="basic-realm""#)),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenges(
                [
                    r#"Negotiate abc, Bearer realm="https://a/t""#,
                    r#"Basic realm="x""#
                ]
                .into_iter()
            ),
            Some(Challenge::Bearer {
                realm: "https://a/t".to_string(),
                service: None,
                scope: None
            })
        );
        assert_eq!(parse_challenges(std::iter::once("Negotiate")), None);
        assert_eq!(parse_challenges(std::iter::once("Bearer service=x")), None);
        assert_eq!(parse_challenges(std::iter::once("=\"")), None);
        assert_eq!(parse_challenges(std::iter::empty()), None);
    }

    #[test]
    fn tokens_are_cached_per_scope_until_they_expire() {
        let cache = TokenCache::default();
        cache.put("repository:a:pull", "t1".to_string(), Some(300));
        cache.put("repository:b:pull", "t2".to_string(), Some(5));
        assert_eq!(cache.get("repository:a:pull").as_deref(), Some("t1"));
        // Lives shorter than the safety margin: never reused.
        assert_eq!(cache.get("repository:b:pull"), None);
        assert_eq!(cache.get("repository:c:pull"), None);
        // A new token for a scope replaces the old one.
        cache.put("repository:a:pull", "secret-token".to_string(), None);
        assert_eq!(
            cache.get("repository:a:pull").as_deref(),
            Some("secret-token")
        );
        assert!(!format!("{cache:?}").contains("secret-token"));
    }

    #[test]
    fn token_or_access_token() {
        let r: TokenResponse = serde_json::from_str(r#"{"access_token":"a"}"#).unwrap();
        assert_eq!(r.into_token().as_deref(), Some("a"));
        let r: TokenResponse =
            serde_json::from_str(r#"{"token":"t","access_token":"a","expires_in":9}"#).unwrap();
        assert_eq!(r.expires_in, Some(9));
        assert_eq!(r.into_token().as_deref(), Some("t"));
        let r: TokenResponse = serde_json::from_str(r#"{"token":""}"#).unwrap();
        assert_eq!(r.into_token(), None);
    }
}
