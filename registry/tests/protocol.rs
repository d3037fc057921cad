//! Answers the real registry (distribution 2.8, see `registry.rs`) never gives but other
//! registries do or a broken one might: paginated tag lists (distribution 2.8 ignores `n` and
//! returns every tag at once; Harbor, GHCR and distribution 3 paginate), manifests whose bytes
//! do not match the announced digest, odd media types and pagination links that leave the
//! registry. A small HTTP server plays the registry, one behaviour per test.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Response, StatusCode, Uri};
use stella_registry::{
    MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_OCI_INDEX, RegistryClient, RegistryConfig, RegistryError,
};

type Behaviour = dyn Fn(&Method, &Uri, &HeaderMap) -> Response<Body> + Send + Sync;

/// A registry played by `behaviour`, recording every request as `METHOD path?query`.
struct FakeRegistry {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeRegistry {
    async fn start(
        behaviour: impl Fn(&Method, &Uri, &HeaderMap) -> Response<Body> + Send + Sync + 'static,
    ) -> Self {
        let behaviour: Arc<Behaviour> = Arc::new(behaviour);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        let app = Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap| {
            let behaviour = Arc::clone(&behaviour);
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push(format!("{method} {uri}"));
                behaviour(&method, &uri, &headers)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, requests }
    }

    fn client(&self, page_size: u32) -> RegistryClient {
        let mut config = RegistryConfig::new(&self.url);
        config.tags_page_size = page_size;
        RegistryClient::new(config).unwrap()
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn respond(status: StatusCode, headers: &[(&str, &str)], body: impl Into<Body>) -> Response<Body> {
    let mut builder = Response::builder().status(status);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(body.into()).unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    stella_pki::sha256_digest(bytes)
}

#[tokio::test]
async fn tag_lists_are_followed_page_by_page() {
    let all = ["a", "b", "c", "d", "e"];
    let fake = FakeRegistry::start(move |_, uri, _| {
        let q = query(uri);
        let n: usize = q["n"].parse().unwrap();
        let start = q
            .get("last")
            .map_or(0, |last| all.iter().position(|t| t == last).unwrap() + 1);
        let page: Vec<&str> = all.iter().skip(start).take(n).copied().collect();
        let mut headers = vec![];
        let link;
        if start + n < all.len() {
            link = format!(
                "</v2/demo/app/tags/list?n={n}&last={}>; rel=\"next\"",
                page[page.len() - 1]
            );
            headers.push(("link", link.as_str()));
        }
        let body = serde_json::json!({"name": "demo/app", "tags": page}).to_string();
        respond(StatusCode::OK, &headers, body)
    })
    .await;

    let tags = fake.client(2).list_tags("demo/app").await.unwrap();

    assert_eq!(tags, all);
    assert_eq!(
        fake.requests(),
        vec![
            "GET /v2/demo/app/tags/list?n=2",
            "GET /v2/demo/app/tags/list?n=2&last=b",
            "GET /v2/demo/app/tags/list?n=2&last=d",
        ]
    );
}

#[tokio::test]
async fn pagination_links_must_stay_on_the_registry_and_move_forward() {
    let leaving = FakeRegistry::start(|_, _, _| {
        respond(
            StatusCode::OK,
            &[(
                "link",
                "<https://elsewhere.example/v2/demo/app/tags/list?last=a>; rel=\"next\"",
            )],
            r#"{"tags":["a"]}"#,
        )
    })
    .await;
    match leaving.client(2).list_tags("demo/app").await {
        Err(RegistryError::BadResponse { detail, .. }) => {
            assert!(detail.contains("leaves the registry"), "{detail}")
        }
        other => panic!("expected BadResponse, got {other:?}"),
    }

    let looping = FakeRegistry::start(|_, _, _| {
        respond(
            StatusCode::OK,
            &[("link", "</v2/demo/app/tags/list?n=2>; rel=\"next\"")],
            r#"{"tags":["a"]}"#,
        )
    })
    .await;
    match looping.client(2).list_tags("demo/app").await {
        Err(RegistryError::BadResponse { detail, .. }) => {
            assert!(detail.contains("already read"), "{detail}")
        }
        other => panic!("expected BadResponse, got {other:?}"),
    }
    assert_eq!(looping.requests().len(), 1);
}

#[tokio::test]
async fn a_manifest_that_does_not_hash_to_its_digest_is_refused() {
    let body =
        r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#;
    let lie = sha256(b"some other manifest");
    let announced = lie.clone();
    // HEAD gives no digest, so the client must fetch the body, which does not match.
    let fake = FakeRegistry::start(move |method, _, _| {
        if method == Method::HEAD {
            respond(
                StatusCode::OK,
                &[("content-type", MEDIA_TYPE_DOCKER_MANIFEST)],
                "",
            )
        } else {
            respond(
                StatusCode::OK,
                &[
                    ("content-type", MEDIA_TYPE_DOCKER_MANIFEST),
                    ("docker-content-digest", &announced),
                ],
                body,
            )
        }
    })
    .await;

    match fake.client(10).resolve("demo/app", "1.0.0").await {
        Err(RegistryError::BadDigest { url, detail }) => {
            assert!(url.ends_with("/v2/demo/app/manifests/1.0.0"), "{url}");
            assert!(detail.contains(&lie), "{detail}");
            assert!(detail.contains(&sha256(body.as_bytes())), "{detail}");
        }
        other => panic!("expected BadDigest, got {other:?}"),
    }
    assert_eq!(
        fake.requests(),
        vec![
            "HEAD /v2/demo/app/manifests/1.0.0",
            "GET /v2/demo/app/manifests/1.0.0"
        ]
    );
}

#[tokio::test]
async fn without_head_the_body_is_fetched_hashed_and_typed() {
    let body =
        format!(r#"{{"schemaVersion":2,"mediaType":"{MEDIA_TYPE_OCI_INDEX}","manifests":[]}}"#);
    let served = body.clone();
    // No HEAD support, no digest header, a generic content type: everything comes from the body.
    let fake = FakeRegistry::start(move |method, _, headers| {
        assert!(
            headers["accept"]
                .to_str()
                .unwrap()
                .contains(MEDIA_TYPE_OCI_INDEX),
            "the client must accept OCI indexes"
        );
        if method == Method::HEAD {
            respond(StatusCode::METHOD_NOT_ALLOWED, &[], "")
        } else {
            respond(
                StatusCode::OK,
                &[("content-type", "application/json")],
                served.clone(),
            )
        }
    })
    .await;

    let resolved = fake.client(10).resolve("demo/app", "2.0.0").await.unwrap();

    assert_eq!(resolved.tag, "2.0.0");
    assert_eq!(resolved.digest, sha256(body.as_bytes()));
    assert_eq!(resolved.media_type, MEDIA_TYPE_OCI_INDEX);
}

#[tokio::test]
async fn schema1_manifests_and_foreign_digests_are_refused() {
    let schema1 = FakeRegistry::start(|_, _, _| {
        respond(
            StatusCode::OK,
            &[(
                "content-type",
                "application/vnd.docker.distribution.manifest.v1+prettyjws",
            )],
            r#"{"schemaVersion":1}"#,
        )
    })
    .await;
    match schema1.client(10).resolve("demo/app", "old").await {
        Err(RegistryError::BadResponse { detail, .. }) => {
            assert!(detail.contains("not supported"), "{detail}")
        }
        other => panic!("expected BadResponse, got {other:?}"),
    }

    let sha512 = format!("sha512:{}", "ab".repeat(64));
    let foreign = FakeRegistry::start(move |_, _, _| {
        respond(
            StatusCode::OK,
            &[
                ("content-type", MEDIA_TYPE_DOCKER_MANIFEST),
                ("docker-content-digest", &sha512),
            ],
            "",
        )
    })
    .await;
    match foreign.client(10).resolve("demo/app", "1.0.0").await {
        Err(RegistryError::BadDigest { detail, .. }) => {
            assert!(detail.contains("only sha256"), "{detail}")
        }
        other => panic!("expected BadDigest, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_input_never_reaches_the_registry() {
    let fake = FakeRegistry::start(|_, _, _| respond(StatusCode::OK, &[], "{}")).await;
    let client = fake.client(10);
    for (repository, tag) in [
        ("Demo/App", "1"),
        ("demo/../admin", "1"),
        ("demo/app", "../../x"),
        ("demo/app", "a/b"),
        ("demo/app?x=1", "1"),
    ] {
        assert!(
            matches!(
                client.resolve(repository, tag).await,
                Err(RegistryError::InvalidInput(_))
            ),
            "{repository} {tag}"
        );
    }
    assert!(matches!(
        client.list_tags("").await,
        Err(RegistryError::InvalidInput(_))
    ));
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
}

#[tokio::test]
async fn error_bodies_are_reported_and_oversized_bodies_refused() {
    let fake = FakeRegistry::start(|_, uri, _| {
        if uri.path().contains("/big/") {
            respond(StatusCode::OK, &[], vec![b' '; 17 << 20])
        } else if uri.path().contains("/gone/") {
            respond(
                StatusCode::NOT_FOUND,
                &[],
                r#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known"}]}"#,
            )
        } else if uri.path().contains("/moved/") {
            respond(
                StatusCode::TEMPORARY_REDIRECT,
                &[("location", "http://registry.example.com/v2/x/manifests/1")],
                "",
            )
        } else {
            respond(
                StatusCode::TOO_MANY_REQUESTS,
                &[],
                r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#,
            )
        }
    })
    .await;
    let client = fake.client(10);
    match client.list_tags("demo/app").await {
        Err(RegistryError::BadResponse { detail, .. }) => {
            assert!(
                detail.contains("429") && detail.contains("TOOMANYREQUESTS: slow down"),
                "{detail}"
            )
        }
        other => panic!("expected BadResponse, got {other:?}"),
    }
    assert!(matches!(
        client.resolve("demo/gone/app", "1.0.0").await,
        Err(RegistryError::RepositoryNotFound { .. })
    ));
    // A redirect may not take the client off TLS to another host.
    match client.resolve("demo/moved/app", "1.0.0").await {
        Err(RegistryError::BadResponse { detail, .. }) => {
            assert!(detail.contains("not loopback"), "{detail}")
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    match client.list_tags("demo/big/app").await {
        Err(RegistryError::BadResponse { detail, .. }) => {
            assert!(detail.contains("larger than"), "{detail}")
        }
        other => panic!("expected BadResponse, got {other:?}"),
    }
}
