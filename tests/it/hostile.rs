//! A model whose chat template never ends (issue 14, item 4) must not stall
//! the server: the request fails with a clear error naming the template
//! limit, and other routes answer meanwhile. The server runs on a runtime
//! with a single thread (as the daemon's runtime can), on a thread of its
//! own; the client uses blocking sockets with read timeouts, so a stalled
//! server fails the test instead of hanging it.

use shoal::gguf::writer::with_metadata;
use shoal::gguf::{GgmlType, Value};
use shoal::serve::ServeConfig;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Two nested `range(100000)` loops: 10^10 iterations.
const HOSTILE: &str =
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";

/// The tiny llama of the inference tests with `tokenizer.chat_template` set.
fn tiny_with_template(template: &str) -> Vec<u8> {
    let bytes = crate::util::synth::tiny_llama(GgmlType::Q8_0, "llama");
    with_metadata(
        &bytes,
        "tokenizer.chat_template",
        Value::String(template.to_owned()),
    )
    .expect("rewrite tiny model")
}

/// One HTTP/1.1 request with `Connection: close`; the whole response, or an
/// error if the server does not answer within `wait`.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str, wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(wait)).expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        panic!(
            "{method} {path}: no complete answer within {wait:?} ({e}); got {:?}",
            String::from_utf8_lossy(&out)
        );
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_template_that_never_ends_fails_clearly_and_stalls_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hostile.gguf");
    std::fs::write(&path, tiny_with_template(HOSTILE)).expect("write model");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut opts = shoal::daemon::DaemonOptions::loopback(dir.path().join("data"), Vec::new());
    opts.serve = ServeConfig {
        kv: None,
        response_cache_budget: 0,
        threads: 1,
        ..ServeConfig::default()
    };
    let daemon = rt
        .block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            shoal::daemon::Daemon::start(opts, listener).await
        })
        .expect("daemon");
    daemon.serving().load_model("hostile", &path).expect("load");
    let addr = daemon.addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        rt.block_on(daemon.run_until(async {
            let _ = stop_rx.await;
        }))
        .expect("serve");
    });
    let chat = std::thread::spawn(move || {
        http(
            addr,
            "POST",
            "/v1/chat/completions",
            r#"{"model":"hostile","messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#,
            Duration::from_secs(120),
        )
    });
    // Let the chat request reach its render before asking for the models.
    std::thread::sleep(Duration::from_millis(300));
    let models = http(addr, "GET", "/v1/models", "", Duration::from_secs(60));
    assert!(models.starts_with("HTTP/1.1 200"), "{models}");
    assert!(models.contains("\"hostile\""), "{models}");
    let answer = chat.join().expect("chat thread");
    let status = answer.split_whitespace().nth(1).unwrap_or_default();
    assert!(
        status.starts_with('4') || status.starts_with('5'),
        "the request must fail: {answer}"
    );
    assert!(answer.contains("template limit"), "{answer}");
    // The server is still fine afterwards.
    let models = http(addr, "GET", "/v1/models", "", Duration::from_secs(60));
    assert!(models.starts_with("HTTP/1.1 200"), "{models}");
    let _ = stop_tx.send(());
    server.join().expect("server thread");
}

/// A GGUF whose tensor directory lies (issue 16, item 3): each is refused
/// by `shoal add` (the store) and by the header check with a clear error
/// naming the tensor, never a panic.
#[test]
fn hostile_tensor_directories_are_clear_errors() {
    use shoal::gguf::writer::{TensorSpec, write};
    use shoal::inference::{HeaderCheck, Unservable, check_header};
    let t = |name: &str, dims: Vec<u64>, ty: GgmlType, n: usize| TensorSpec {
        name: name.into(),
        dims,
        ty,
        data: vec![7; n],
    };
    let meta = [("general.architecture", Value::String("llama".into()))];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "absurd dims",
            write(
                &meta,
                &[t("huge", vec![1 << 40, 1 << 40], GgmlType::F32, 4)],
            ),
            "overflows",
        ),
        (
            "past the end",
            write(&meta, &[t("long", vec![1 << 20], GgmlType::F32, 64)]),
            "tensor data",
        ),
        (
            "overlapping",
            write(
                &meta,
                &[
                    t("first", vec![64], GgmlType::F32, 32),
                    t("second", vec![8], GgmlType::F32, 32),
                    t("third", vec![1024], GgmlType::I8, 1024),
                ],
            ),
            "overlap",
        ),
        (
            "an empty opaque span at the end",
            write(
                &meta,
                &[
                    t("a", vec![32], GgmlType::I8, 32),
                    t("opaque", vec![32], GgmlType::Unknown(99), 0),
                ],
            ),
            "no bytes",
        ),
    ];
    let dir = tempfile::tempdir().expect("tmp");
    let store =
        shoal::store::Store::open(&dir.path().join("s"), Default::default()).expect("store");
    for (what, bytes, needle) in cases {
        let p = dir.path().join("bad.gguf");
        std::fs::write(&p, &bytes).expect("write");
        let e = store
            .add_file(&p, &shoal::store::AddOptions::default())
            .expect_err(what);
        let msg = e.to_string();
        assert!(msg.contains(needle), "{what}: {msg}");
        match check_header(&bytes, bytes.len() as u64) {
            HeaderCheck::Unservable(Unservable::Header(e)) => {
                assert!(e.to_string().contains(needle), "{what}: {e}")
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    assert!(store.list().expect("list").is_empty());
}
