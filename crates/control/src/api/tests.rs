//! Which routes each kind of caller reaches, enumerated from the routers themselves: a route
//! added later is covered without touching these tests.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use tower::ServiceExt;

use super::*;
use crate::guest_api::FromSandbox;

const SANDBOX: &str = "sb-aaaaaaaaaa";
const METHODS: [Method; 5] = [Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::PATCH];

/// A daemon's state without an engine: enough for routing and authentication, which is all
/// these tests reach.
pub(crate) async fn state() -> (AppState, tempfile::TempDir) {
    state_with(|_| {}).await
}

/// The same, with the configuration changed by `edit` first.
pub(crate) async fn state_with(edit: impl FnOnce(&mut crate::config::Config)) -> (AppState, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = crate::config::Config {
        data_dir: dir.path().to_path_buf(),
        image_dir: dir.path().join("images"),
        dns_upstreams: vec!["127.0.0.1".parse().unwrap()],
        ..Default::default()
    };
    edit(&mut cfg);
    let store = crate::store::Store::open(&dir.path().join("torpor.db")).await.unwrap();
    let manager = Manager::new(Arc::new(cfg), store, Box::new(|| Err("no engine in unit tests".into()))).unwrap();
    let relay = crate::relay::Relay::new(manager.clone());
    let state = AppState { manager, api_key: Arc::new("tp_test".into()), auth_failures: Default::default(), relay };
    (state, dir)
}

/// A peer that accepts connections and never says anything (a stalled upstream, a hung guest).
pub(crate) async fn silent_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    addr
}

/// Every (method, concrete path) the document lists, ids filled in.
fn documented(doc: &utoipa::openapi::OpenApi) -> Vec<(Method, String)> {
    let mut routes = Vec::new();
    for (path, item) in doc.paths.paths.iter() {
        let concrete = path.replace("{id}", SANDBOX).replace("{name}", "some-name").replace("{exec_id}", "e1");
        let methods = [
            (Method::GET, item.get.is_some()),
            (Method::POST, item.post.is_some()),
            (Method::PUT, item.put.is_some()),
            (Method::DELETE, item.delete.is_some()),
            (Method::PATCH, item.patch.is_some()),
        ];
        for (method, present) in methods {
            if present {
                routes.push((method, concrete.clone()));
            }
        }
    }
    routes
}

fn request(method: &Method, path: &str, bearer: Option<&str>) -> Request<Body> {
    let mut req = Request::builder().method(method.clone()).uri(path).header("content-type", "application/json");
    if let Some(token) = bearer {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    req.body(Body::from("{}")).unwrap()
}

async fn body_text(resp: Response) -> String {
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn no_operator_route_accepts_a_device_token() {
    let (state, _dir) = state().await;
    let (token, _) = state.manager.tokens.issue(SANDBOX, "local").unwrap();
    let app = router(state);
    let (_, operator) = operator_routes().split_for_parts();
    let routes = documented(&operator);
    assert!(routes.len() >= 25, "the operator API lists only {} routes", routes.len());
    for path in routes.iter().map(|(_, p)| p).collect::<std::collections::BTreeSet<_>>() {
        // Every method, not only the documented ones: none may reach a handler.
        for method in &METHODS {
            let resp = app.clone().oneshot(request(method, path, Some(&token))).await.unwrap();
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{method} {path} with a device token");
            let resp = app.clone().oneshot(request(method, path, None)).await.unwrap();
            let refused = [StatusCode::UNAUTHORIZED, StatusCode::TOO_MANY_REQUESTS];
            assert!(refused.contains(&resp.status()), "{method} {path} without a key: {}", resp.status());
        }
    }
}

#[tokio::test]
async fn the_public_routes_are_exactly_these() {
    let (_, public) = public_routes().split_for_parts();
    let mut routes: Vec<String> = documented(&public).into_iter().map(|(m, p)| format!("{m} {p}")).collect();
    routes.sort();
    assert_eq!(
        routes,
        [
            "GET /v1/.well-known/jwks.json",
            "GET /v1/health",
            "GET /v1/openapi.json",
            "POST /v1/hooks/slack/some-name",
            "POST /v1/hooks/telegram/some-name",
        ]
    );
    // And the served document is the union of both routers.
    let served = documented(openapi()).len();
    assert_eq!(served, documented(&public).len() + documented(&operator_routes().split_for_parts().1).len());
}

#[tokio::test]
async fn the_right_key_is_never_locked_out() {
    let (state, _dir) = state().await;
    let app = router(state)
        .layer(axum::Extension(axum::extract::ConnectInfo(std::net::SocketAddr::from(([127, 0, 0, 1], 40000)))));
    let mut statuses = Vec::new();
    for _ in 0..AUTH_FAILURES_ALLOWED + 3 {
        let resp = app.clone().oneshot(request(&Method::GET, "/v1/sandboxes", Some("wrong"))).await.unwrap();
        statuses.push(resp.status());
    }
    assert_eq!(statuses[0], StatusCode::UNAUTHORIZED);
    assert_eq!(*statuses.last().unwrap(), StatusCode::TOO_MANY_REQUESTS, "failures past the allowance: {statuses:?}");
    let resp = app.clone().oneshot(request(&Method::GET, "/v1/sandboxes", Some("tp_test"))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "the right key from a client that failed many times");
}

/// The sandbox API, asked for every operator route with the sandbox's own device token: only
/// the reads of its own record answer; everything else does not exist there.
#[tokio::test]
async fn a_sandbox_reaches_only_its_own_reads() {
    let (state, _dir) = state().await;
    let (token, _) = state.manager.tokens.issue(SANDBOX, "local").unwrap();
    let guest = crate::guest_api::router(state.manager.clone()).layer(axum::Extension(FromSandbox(SANDBOX.into())));
    let served_to_guests = [
        "GET /v1/sandboxes/sb-aaaaaaaaaa",
        "GET /v1/sandboxes/sb-aaaaaaaaaa/usage",
        "GET /v1/sandboxes/sb-aaaaaaaaaa/network",
        "GET /v1/health",
        "GET /v1/.well-known/jwks.json",
    ];
    let paths: std::collections::BTreeSet<String> = documented(openapi()).into_iter().map(|(_, p)| p).collect();
    let mut reached = Vec::new();
    for path in &paths {
        for method in &METHODS {
            let resp = guest.clone().oneshot(request(method, path, Some(&token))).await.unwrap();
            let status = resp.status();
            let text = body_text(resp).await;
            let absent = status == StatusCode::METHOD_NOT_ALLOWED
                || (status == StatusCode::NOT_FOUND && text.contains("is not part of the API sandboxes reach"));
            if !absent {
                reached.push(format!("{method} {path}"));
            }
        }
    }
    reached.sort();
    let mut expected: Vec<String> = served_to_guests.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(reached, expected);

    // Those reads are its own only, and need its own token.
    let other = "/v1/sandboxes/sb-bbbbbbbbbb";
    let resp = guest.clone().oneshot(request(&Method::GET, other, Some(&token))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let (other_token, _) = state.manager.tokens.issue("sb-bbbbbbbbbb", "local").unwrap();
    let own = format!("/v1/sandboxes/{SANDBOX}");
    let resp = guest.clone().oneshot(request(&Method::GET, &own, Some(&other_token))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "another sandbox's token");
    let resp = guest.clone().oneshot(request(&Method::GET, &own, None)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}
