//! The control API's request handling: a request built from the input
//! (method, path, content type, body) driven through the real router of a
//! real `Server` in-process, as the Unix socket would deliver it.
//!
//! Input: `METHOD PATH` on the first line, the content type on the second
//! (empty: none), the body after it. Nothing may panic (in the handlers,
//! the apply path or the workers: libfuzzer-sys aborts on any thread's
//! panic); no request gets a 5xx; an applied config is what the server
//! then runs.
//!
//! Every input gets a fresh server (one worker, no listeners), so a run is
//! reproducible whatever ran before. Configs applied bind their listeners
//! and start their health checks, so the target first moves into a
//! network namespace of its own (root only), where nothing reaches the
//! machine's network; without one, `PUT` requests are left out.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use siphon_dataplane::{Config, Options, Server};
use tower::ServiceExt;

struct Env {
    runtime: tokio::runtime::Runtime,
    /// In a network namespace of our own: applies are safe.
    isolated: bool,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        // Before any thread exists: threads made later (workers, health,
        // tokio's blocking pool) inherit the namespace.
        let isolated = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_ok();
        if !isolated {
            eprintln!(
                "api fuzz target: no network namespace (not root?): PUT requests are skipped"
            );
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        Env { runtime, isolated }
    })
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let head = parts.next().unwrap_or_default();
    let content_type = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    let (method, path) = match head.iter().position(|&b| b == b' ') {
        Some(i) => (&head[..i], &head[i + 1..]),
        None => (head, &b"/"[..]),
    };
    let Ok(method) = Method::from_bytes(method) else {
        return;
    };
    if method == Method::PUT && !env.isolated {
        return;
    }
    let mut req = Request::builder().method(method.clone()).uri(path);
    if !content_type.is_empty() {
        req = req.header("content-type", content_type);
    }
    // What hyper would refuse to deliver (a bad URI or header) never
    // reaches the router.
    let Ok(req) = req.body(Body::from(body.to_vec())) else {
        return;
    };
    let is_config = req.uri().path() == "/v1/config";

    let first = Config {
        generation: 1,
        listeners: vec![],
        pools: vec![],
    };
    let opts = Options {
        workers: 1,
        ..Options::default()
    };
    let server = Arc::new(Server::start(first, opts).expect("a server with no listeners starts"));
    let app = siphon_dataplane::api::router_for(server.clone());
    let (status, reply) = env.runtime.block_on(async {
        let resp = app.oneshot(req).await.expect("the router is infallible");
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .expect("a response body reads")
            .to_bytes();
        (status, bytes)
    });
    assert!(
        !status.is_server_error(),
        "{status}: {}",
        String::from_utf8_lossy(&reply)
    );
    if is_config && method == Method::PUT && status.is_success() {
        // 200: applied (or the same document as running): the server now
        // runs the generation it answered with.
        let answer: serde_json::Value =
            serde_json::from_slice(&reply).expect("a 200 answer is JSON");
        assert_eq!(
            answer["generation"].as_u64(),
            Some(server.generation()),
            "{answer}"
        );
    }
    if is_config && method == Method::GET {
        assert!(status.is_success());
        let config: Config = serde_json::from_slice(&reply).expect("GET /v1/config is a config");
        assert_eq!(config.generation, 1);
    }
    server.shutdown(Duration::ZERO);
});
