//! Against a real registry: CNCF distribution 2.8 (Debian's `docker-registry`) on loopback,
//! holding busybox images imported and pushed by the machine's Docker Engine. Basic auth runs
//! over TLS with a certificate from a test CA; bearer auth runs distribution's own token
//! authentication against a token issuer written here (ES256 JWTs whose signing certificate is
//! the registry's `rootcertbundle`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use stella_pki::CertificateAuthority;
use stella_plugin_testkit::docker::Scratch;
use stella_plugin_testkit::registry::{Registry, RegistryAuth, RegistryOptions, write_htpasswd};
use stella_registry::{
    Credentials, MEDIA_TYPE_DOCKER_MANIFEST, RegistryClient, RegistryConfig, RegistryError,
    SkippedTag, VersionRules,
};

const REPO: &str = "demo/app";
const USER: &str = "alice";
const PASSWORD: &str = "s3cret-pass";

/// A registry holding `demo/app` with two images under five tags; `digests` is what
/// `docker push` printed per tag (and the engine's `RepoDigests` showed, see
/// [`Registry::push`]).
struct Pushed {
    registry: Registry,
    digests: BTreeMap<&'static str, String>,
    _scratch: Scratch,
}

fn pushed() -> Pushed {
    let scratch = Scratch::new("stella-reg");
    scratch.sleeper("one", 3600);
    scratch.sleeper("two", 3601);
    let registry = Registry::start();
    let mut digests = BTreeMap::new();
    for (tag, image) in [
        ("1.2.3", "one"),
        ("1.2.4", "two"),
        ("2.0.0-beta.1", "two"),
        ("latest", "two"),
        ("build-7", "one"),
    ] {
        let local = format!("{}:{image}", scratch.repo);
        digests.insert(tag, registry.push(&local, REPO, tag));
    }
    Pushed {
        registry,
        digests,
        _scratch: scratch,
    }
}

fn client(config: RegistryConfig) -> RegistryClient {
    RegistryClient::new(config).unwrap()
}

fn sorted(mut tags: Vec<String>) -> Vec<String> {
    tags.sort();
    tags
}

#[tokio::test]
async fn tags_are_listed_and_resolved_to_the_pushed_digests() {
    let p = pushed();
    let mut config = RegistryConfig::new(p.registry.url());
    config.tags_page_size = 2;
    let client = client(config);
    client.ping().await.unwrap();

    let tags = client.list_tags(REPO).await.unwrap();

    // distribution 2.8 ignores `n` and answers with one page; pagination itself is covered in
    // protocol.rs. The request still asked for pages of two.
    assert_eq!(
        sorted(tags),
        vec!["1.2.3", "1.2.4", "2.0.0-beta.1", "build-7", "latest"]
    );
    assert!(
        p.registry.log().contains("GET /v2/demo/app/tags/list?n=2"),
        "{}",
        p.registry.log()
    );
    for (tag, digest) in &p.digests {
        let resolved = client.resolve(REPO, tag).await.unwrap();
        assert_eq!(&resolved.tag, tag);
        assert_eq!(&resolved.digest, digest, "{tag}");
        assert_eq!(resolved.media_type, MEDIA_TYPE_DOCKER_MANIFEST);
    }
    assert_ne!(p.digests["1.2.3"], p.digests["1.2.4"]);
    assert_eq!(p.digests["1.2.4"], p.digests["latest"]);
}

#[tokio::test]
async fn sync_classifies_versions_and_skips_other_tags() {
    let p = pushed();
    let client = client(RegistryConfig::new(p.registry.url()));

    let report = client.sync(REPO, &VersionRules::semver()).await.unwrap();

    let versions: Vec<(&str, &str, String, &str)> = report
        .versions
        .iter()
        .map(|v| {
            (
                v.tag.as_str(),
                v.digest.as_str(),
                v.semver.as_ref().unwrap().to_string(),
                v.channel.as_str(),
            )
        })
        .collect();
    assert_eq!(
        versions,
        vec![
            (
                "2.0.0-beta.1",
                p.digests["2.0.0-beta.1"].as_str(),
                "2.0.0-beta.1".to_string(),
                "beta"
            ),
            (
                "1.2.4",
                p.digests["1.2.4"].as_str(),
                "1.2.4".to_string(),
                "stable"
            ),
            (
                "1.2.3",
                p.digests["1.2.3"].as_str(),
                "1.2.3".to_string(),
                "stable"
            ),
        ]
    );
    let mut skipped = report.skipped.clone();
    skipped.sort_by(|a, b| a.tag.cmp(&b.tag));
    assert_eq!(
        skipped,
        vec![
            SkippedTag {
                tag: "build-7".to_string(),
                reason: "does not match the tag pattern".to_string()
            },
            SkippedTag {
                tag: "latest".to_string(),
                reason: "does not match the tag pattern".to_string()
            },
        ]
    );

    // Other rules see other versions in the same tags.
    let custom = VersionRules::new(r"(?P<version>\d+\.\d+\.\d+)(?:-beta\.\d+)?")
        .unwrap()
        .with_channel("beta=~.*-beta.*".parse().unwrap())
        .with_default_channel("ga")
        .unwrap();
    let report = client.sync(REPO, &custom).await.unwrap();
    let versions: Vec<(&str, String, &str)> = report
        .versions
        .iter()
        .map(|v| {
            (
                v.tag.as_str(),
                v.semver.as_ref().unwrap().to_string(),
                v.channel.as_str(),
            )
        })
        .collect();
    assert_eq!(
        versions,
        vec![
            ("2.0.0-beta.1", "2.0.0".to_string(), "beta"),
            ("1.2.4", "1.2.4".to_string(), "ga"),
            ("1.2.3", "1.2.3".to_string(), "ga"),
        ]
    );
    let builds = VersionRules::new(r"build-(?P<version>\d+)").unwrap();
    let report = client.sync(REPO, &builds).await.unwrap();
    assert!(report.versions.is_empty());
    assert!(
        report
            .skipped
            .iter()
            .any(|s| s.tag == "build-7" && s.reason.contains("not a semantic version")),
        "{:?}",
        report.skipped
    );
}

#[tokio::test]
async fn unknown_repositories_tags_and_registries_fail_clearly() {
    let p = pushed();
    let client = client(RegistryConfig::new(p.registry.url()));

    match client.list_tags("nobody/here").await {
        Err(RegistryError::RepositoryNotFound { repository, url }) => {
            assert_eq!(repository, "nobody/here");
            assert!(url.ends_with("/v2/nobody/here/tags/list?n=100"), "{url}");
        }
        other => panic!("expected RepositoryNotFound, got {other:?}"),
    }
    match client.resolve(REPO, "9.9.9").await {
        Err(RegistryError::TagNotFound {
            repository, tag, ..
        }) => {
            assert_eq!((repository.as_str(), tag.as_str()), (REPO, "9.9.9"))
        }
        other => panic!("expected TagNotFound, got {other:?}"),
    }
    // distribution 2.8 answers MANIFEST_UNKNOWN, not NAME_UNKNOWN, for a manifest of an unknown
    // repository: all the client can say is that the tag is not there.
    assert!(matches!(
        client.resolve("nobody/here", "1.0.0").await,
        Err(RegistryError::TagNotFound { .. })
    ));
    assert!(matches!(
        client.sync("nobody/here", &VersionRules::semver()).await,
        Err(RegistryError::RepositoryNotFound { .. })
    ));

    let port = p.registry.port;
    drop(p);
    let gone =
        RegistryClient::new(RegistryConfig::new(format!("http://127.0.0.1:{port}"))).unwrap();
    match gone.list_tags(REPO).await {
        Err(RegistryError::Unreachable { url, detail }) => {
            assert!(
                url.starts_with(&format!("http://127.0.0.1:{port}/")),
                "{url}"
            );
            assert!(!detail.is_empty());
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

/// A test CA and a server certificate for 127.0.0.1, written where the registry reads them.
fn tls_files(dir: &std::path::Path) -> (String, PathBuf, PathBuf) {
    let ca = CertificateAuthority::generate("stella registry test CA").unwrap();
    let issued = ca
        .issue_server_cert(
            &[],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            Duration::from_secs(3600),
        )
        .unwrap();
    let cert = dir.join("registry.crt");
    let key = dir.join("registry.key");
    std::fs::write(&cert, format!("{}{}", issued.cert_pem, ca.cert_pem())).unwrap();
    std::fs::write(&key, issued.key_pem).unwrap();
    (ca.cert_pem().to_string(), cert, key)
}

fn unauthorized(result: Result<impl std::fmt::Debug, RegistryError>) -> String {
    match result {
        Err(e @ RegistryError::Unauthorized { .. }) => {
            let text = e.to_string();
            assert!(!text.contains(PASSWORD), "secret in {text}");
            text
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
}

#[tokio::test]
async fn basic_auth_over_tls_with_a_private_ca() {
    let p = pushed();
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    write_htpasswd(&htpasswd, USER, PASSWORD);
    let (ca_pem, cert, key) = tls_files(dir.path());
    // The same content, served by a second registry process that wants TLS and a password.
    let secured = Registry::start_with(RegistryOptions {
        auth: RegistryAuth::Htpasswd { file: htpasswd },
        tls: Some((cert, key)),
        storage: Some(p.registry.storage.clone()),
    });
    assert!(secured.url().starts_with("https://"));
    let config = |credentials| {
        RegistryConfig::new(secured.url())
            .with_credentials(credentials)
            .with_extra_ca_pem(ca_pem.clone())
    };
    let alice = Credentials::Basic {
        username: USER.to_string(),
        password: PASSWORD.to_string(),
    };

    let client = client(config(alice.clone()));
    assert_eq!(sorted(client.list_tags(REPO).await.unwrap()).len(), 5);
    let resolved = client.resolve(REPO, "1.2.3").await.unwrap();
    assert_eq!(resolved.digest, p.digests["1.2.3"]);

    let wrong = Credentials::Basic {
        username: USER.to_string(),
        password: "not-the-password".to_string(),
    };
    let text = unauthorized(self::client(config(wrong)).list_tags(REPO).await);
    assert!(
        text.contains("refused the password of user \"alice\""),
        "{text}"
    );
    assert!(!text.contains("not-the-password"), "{text}");
    let text = unauthorized(
        self::client(config(Credentials::Anonymous))
            .resolve(REPO, "1.2.3")
            .await,
    );
    assert!(text.contains("requires a username and password"), "{text}");

    // Without the private CA the certificate is not trusted, whatever the credentials.
    let untrusted =
        RegistryClient::new(RegistryConfig::new(secured.url()).with_credentials(alice)).unwrap();
    match untrusted.list_tags(REPO).await {
        Err(RegistryError::Unreachable { detail, .. }) => {
            assert!(detail.to_lowercase().contains("certificate"), "{detail}")
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

/// A token service in the Docker token protocol: checks Basic credentials (when `password`
/// is set), grants what the scope asks for, signs ES256 JWTs with `key` and counts requests
/// per scope.
#[derive(Clone)]
struct TokenIssuer {
    key: Arc<EcdsaKeyPair>,
    cert_der: Vec<u8>,
    issuer: String,
    service: String,
    password: Option<String>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl TokenIssuer {
    fn jwt(&self, scope: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let access: Vec<serde_json::Value> = scope
            .split(' ')
            .filter_map(|s| {
                let mut parts = s.splitn(3, ':');
                let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                Some(serde_json::json!({
                    "type": kind,
                    "name": name,
                    "actions": actions.split(',').collect::<Vec<_>>(),
                }))
            })
            .collect();
        let header = serde_json::json!({
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [STANDARD.encode(&self.cert_der)],
        });
        let claims = serde_json::json!({
            "iss": self.issuer,
            "sub": USER,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": format!("{now}-{}", self.requests.lock().unwrap().len()),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .unwrap();
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        )
    }
}

async fn issue_token(
    State(issuer): State<TokenIssuer>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> axum::response::Response {
    let scope = query.get("scope").cloned().unwrap_or_default();
    issuer.requests.lock().unwrap().push(scope.clone());
    if let Some(password) = &issuer.password {
        let expected = format!("Basic {}", STANDARD.encode(format!("{USER}:{password}")));
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if given != expected {
            return (StatusCode::UNAUTHORIZED, "bad credentials").into_response();
        }
    }
    if query.get("service") != Some(&issuer.service) {
        return (StatusCode::BAD_REQUEST, "unknown service").into_response();
    }
    axum::Json(serde_json::json!({"token": issuer.jwt(&scope), "expires_in": 300})).into_response()
}

#[tokio::test]
async fn bearer_tokens_from_the_token_service_are_fetched_once_per_scope() {
    let p = pushed();
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("stella token issuer").unwrap();
    let key_der = stella_pki::private_key_from_pem(&ca.key_pem()).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        key_der.secret_der(),
        &SystemRandom::new(),
    )
    .unwrap();
    let bundle = dir.path().join("token-ca.pem");
    std::fs::write(&bundle, ca.cert_pem()).unwrap();

    let issuer = TokenIssuer {
        key: Arc::new(key),
        cert_der: ca.cert_der().to_vec(),
        issuer: "stella-test-issuer".to_string(),
        service: "stella-test-registry".to_string(),
        password: Some(PASSWORD.to_string()),
        requests: Arc::new(Mutex::new(Vec::new())),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let realm = format!("http://{}/token", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/token", get(issue_token))
        .with_state(issuer.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let secured = Registry::start_with(RegistryOptions {
        auth: RegistryAuth::Token {
            realm,
            service: issuer.service.clone(),
            issuer: issuer.issuer.clone(),
            root_cert_bundle: bundle,
        },
        tls: None,
        storage: Some(p.registry.storage.clone()),
    });
    let alice = Credentials::Basic {
        username: USER.to_string(),
        password: PASSWORD.to_string(),
    };

    let client = client(RegistryConfig::new(secured.url()).with_credentials(alice));
    let report = client.sync(REPO, &VersionRules::semver()).await.unwrap();
    assert_eq!(report.versions.len(), 3);
    assert_eq!(report.versions[1].digest, p.digests["1.2.4"]);
    assert_eq!(
        client.resolve(REPO, "latest").await.unwrap().digest,
        p.digests["latest"]
    );
    // One token for the repository's pull scope served the listing and all four resolutions.
    assert_eq!(
        issuer.requests.lock().unwrap().clone(),
        vec!["repository:demo/app:pull".to_string()]
    );

    let wrong = Credentials::Basic {
        username: USER.to_string(),
        password: "not-the-password".to_string(),
    };
    let text = unauthorized(
        self::client(RegistryConfig::new(secured.url()).with_credentials(wrong))
            .list_tags(REPO)
            .await,
    );
    assert!(
        text.contains("token service refused user \"alice\""),
        "{text}"
    );
    let text = unauthorized(
        self::client(RegistryConfig::new(secured.url()))
            .list_tags(REPO)
            .await,
    );
    assert!(text.contains("anonymous"), "{text}");

    // A static bearer token is sent as it is; the registry checks it itself.
    let token = issuer.jwt("repository:demo/app:pull");
    let fixed = self::client(
        RegistryConfig::new(secured.url()).with_credentials(Credentials::Bearer { token }),
    );
    assert_eq!(
        fixed.resolve(REPO, "1.2.3").await.unwrap().digest,
        p.digests["1.2.3"]
    );
    let forged = self::client(RegistryConfig::new(secured.url()).with_credentials(
        Credentials::Bearer {
            token: "eyJhbGciOiJub25lIn0.e30.".to_string(),
        },
    ));
    let text = unauthorized(forged.resolve(REPO, "1.2.3").await);
    assert!(text.contains("refused the bearer token"), "{text}");
    // A token for one repository does not open another.
    let other = issuer.jwt("repository:other/app:pull");
    let narrow = self::client(
        RegistryConfig::new(secured.url()).with_credentials(Credentials::Bearer { token: other }),
    );
    unauthorized(narrow.resolve(REPO, "1.2.3").await);
}
