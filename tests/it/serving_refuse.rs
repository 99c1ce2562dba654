//! Issue 16, parts 3 and 4, between real nodes on 127.0.0.1 (mDNS off):
//! any GGUF llama.cpp parses (IQ types, a type id nobody knows) is stored
//! and pulled verified, and refused by inference; a model this build cannot
//! serve is refused from its header, after fetching the header chunks
//! alone; `/v1/models` says which held models are servable.

use crate::util::http::{error_code, http, post};
use crate::util::serving::{connected, p2p_addr, ram_only, start_node};
use crate::util::synth::{bytes, tiny_llama};
use serde_json::{Value, json};
use shoal::gguf::writer::{TensorSpec, write};
use shoal::gguf::{GgmlType, Gguf};
use shoal::inference::{InferenceError, Model};
use shoal::node::Node;
use shoal::store::{AddOptions, ArtifactId};
use std::net::SocketAddr;
use std::path::Path;

/// `src` (a GGUF) with the tensors `pick` names retyped: a known type gets
/// pseudo-random bytes of its size; an unknown one keeps the old bytes (an
/// opaque span).
fn retype(src: &[u8], pick: impl Fn(&str) -> Option<GgmlType>) -> Vec<u8> {
    let g = Gguf::parse(src).expect("parse");
    let meta: Vec<(&str, shoal::gguf::Value)> = g
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.alignment")
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let tensors: Vec<TensorSpec> = g
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let r = g.tensor_range(t);
            let old = src[r.start as usize..r.end as usize].to_vec();
            let (ty, data) = match pick(&t.name) {
                None => (t.ty, old),
                Some(ty) => match ty.layout() {
                    Some((blk, n)) => (ty, bytes(i as u64, (t.elements() / blk * n) as usize)),
                    None => (ty, old),
                },
            };
            TensorSpec {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty,
                data,
            }
        })
        .collect();
    write(&meta, &tensors)
}

/// Adds `data` as a file to `node`'s store.
async fn add(node: &Node, dir: &Path, name: &str, data: &[u8]) -> ArtifactId {
    let p = dir.join(name);
    std::fs::write(&p, data).expect("write");
    let store = node.store().clone();
    tokio::task::spawn_blocking(move || store.add_file(&p, &AddOptions::default()))
        .await
        .expect("join")
        .expect("add")
}

/// Pulls `id` on `node` and returns the stored bytes.
async fn pull(node: &Node, id: ArtifactId) -> Vec<u8> {
    let (_, mut rx) = node.pull(&id.to_hex()).await.expect("pull");
    let p = rx
        .wait_for(|p| p.phase.is_final())
        .await
        .expect("progress")
        .clone();
    assert_eq!(
        p.phase,
        shoal::mesh::download::Phase::Done,
        "pull failed: {:?}",
        p.error
    );
    std::fs::read(node.store().artifact_path(&id).expect("path")).expect("read")
}

fn peer_bytes(node: &Node) -> f64 {
    let t = node.metrics().render();
    t.lines()
        .find_map(|l| {
            l.strip_prefix("shoal_chunk_fetch_bytes_total{source=\"peer\"}")?
                .strip_prefix(' ')?
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

async fn models(addr: SocketAddr) -> Vec<Value> {
    let r = http(addr, "GET", "/v1/models", &[], b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["data"].as_array().expect("data").clone()
}

fn entry<'a>(list: &'a [Value], id: &ArtifactId) -> &'a Value {
    list.iter()
        .find(|m| m["shoal_model_id"] == id.to_hex())
        .unwrap_or_else(|| panic!("{id} not listed in {list:?}"))
}

async fn two_nodes(dir: &Path) -> (Node, SocketAddr, Node, SocketAddr) {
    let (a, a_http) = start_node(&dir.join("a"), Vec::new(), ram_only()).await;
    let (b, b_http) = start_node(&dir.join("b"), vec![p2p_addr(&a).await], ram_only()).await;
    connected(&b, &a).await;
    (a, a_http, b, b_http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iq4_xs_and_unknown_types_are_stored_pulled_verified_and_refused_by_inference() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, _, b, b_http) = two_nodes(tmp.path()).await;
    let base = tiny_llama(GgmlType::Q8_0, "llama");
    let iq = retype(&base, |n| n.contains("attn_q").then_some(GgmlType::IQ4_XS));
    let unknown = retype(&base, |n| {
        (n == "blk.1.ffn_up.weight").then_some(GgmlType::Unknown(250))
    });
    for (name, file, ty) in [
        ("iq.gguf", &iq, "iq4_xs"),
        ("unknown.gguf", &unknown, "unknown type 250"),
    ] {
        let id = add(&a, tmp.path(), name, file).await;
        let m = a.store().manifest(&id).expect("m").expect("manifest");
        assert!(m.tensors.len() > 10, "{name}: tensors in the manifest");
        let got = pull(&b, id).await;
        assert_eq!(&got, file, "{name}: pulled bytes");
        assert!(b.store().verify(&id).expect("verify").ok(), "{name}");
        // Inference refuses the tensor, by name.
        let path = b.store().artifact_path(&id).expect("path");
        match Model::load(&path) {
            Err(InferenceError::UnsupportedTensorType { .. }) => {}
            other => panic!("{name}: expected UnsupportedTensorType, got {other:?}"),
        }
        // Held but not servable: 422 naming the type, and /v1/models says so.
        let r = post(
            b_http,
            "/v1/completions",
            &json!({"model": id.to_hex(), "prompt": "hi", "max_tokens": 1}),
        )
        .await;
        assert_eq!(r.status, 422, "{name}: {}", r.text());
        assert_eq!(error_code(&r), "model_not_supported");
        assert!(r.text().contains(ty), "{name}: {}", r.text());
        let list = models(b_http).await;
        let e = entry(&list, &id);
        assert_eq!(e["servable"], false, "{e}");
        assert_eq!(e["unservable_kind"], "tensor_type", "{e}");
        assert!(
            e["unservable_reason"]
                .as_str()
                .is_some_and(|r| r.contains(ty)),
            "{e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unservable_model_is_refused_from_its_header_chunks_alone() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, a_http, b, b_http) = two_nodes(tmp.path()).await;
    let grok = add(
        &a,
        tmp.path(),
        "grok.gguf",
        &tiny_llama(GgmlType::Q8_0, "grok"),
    )
    .await;
    let m = a.store().manifest(&grok).expect("m").expect("manifest");
    assert!(m.chunks.len() > 5, "{} chunks", m.chunks.len());
    let header =
        Gguf::parse(&std::fs::read(a.store().artifact_path(&grok).expect("p")).expect("r"))
            .expect("parse")
            .data_offset;
    let header_chunks: u64 = m
        .chunks
        .iter()
        .take_while(|c| c.offset < header)
        .map(|c| u64::from(c.len))
        .sum();

    let before = peer_bytes(&b);
    for round in 0..2 {
        let r = post(
            b_http,
            "/v1/completions",
            &json!({"model": grok.to_hex(), "prompt": "hi", "max_tokens": 1}),
        )
        .await;
        assert_eq!(r.status, 422, "round {round}: {}", r.text());
        assert_eq!(error_code(&r), "model_not_supported");
        let msg = r.json()["error"]["message"]
            .as_str()
            .expect("msg")
            .to_owned();
        assert!(
            msg.contains("architecture") && msg.contains("\"grok\""),
            "{msg}"
        );
    }
    // Only the header's chunks crossed the network (once: the verdict is kept).
    let moved = peer_bytes(&b) - before;
    assert_eq!(moved as u64, header_chunks, "bytes moved for the header");
    assert!(header_chunks * 4 < m.size, "{header_chunks} of {}", m.size);
    // Nothing of it was written to B's store.
    assert_eq!(b.store().status(&grok).expect("status"), None);
    // A holds it and says it cannot serve it.
    let list = models(a_http).await;
    let e = entry(&list, &grok);
    assert_eq!(
        (e["servable"].clone(), e["loaded"].clone()),
        (json!(false), json!(false))
    );
    assert_eq!(e["unservable_kind"], "architecture", "{e}");
    assert_eq!(e["object"], "model");

    // A servable model goes through the same check, and its header chunks
    // are kept for the pull: every byte crosses once.
    let ok = add(
        &a,
        tmp.path(),
        "ok.gguf",
        &tiny_llama(GgmlType::Q8_0, "llama"),
    )
    .await;
    let size = a.store().manifest(&ok).expect("m").expect("manifest").size;
    let before = peer_bytes(&b);
    let r = post(
        b_http,
        "/v1/completions",
        &json!({"model": ok.to_hex(), "prompt": "hi", "max_tokens": 2, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        (peer_bytes(&b) - before) as u64,
        size,
        "bytes moved for a servable model"
    );
    let list = models(b_http).await;
    let e = entry(&list, &ok);
    assert_eq!(
        (e["servable"].clone(), e["loaded"].clone()),
        (json!(true), json!(true))
    );
}
