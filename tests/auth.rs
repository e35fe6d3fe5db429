//! Tokens are checked before the upgrade, and every frame is authorized.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use ultrasync_client::{ClientError, Connection, OpType, ServerMessage};
use ultrasync_shared::ErrorCode;
use ultrasync_shared::auth::{self, Claims, TokenAlgorithm};
use ultrasync_testkit::{Stack, StackOptions, http_request};

const WAIT: Duration = Duration::from_secs(10);

fn good_claims() -> Claims {
    auth::claims("mallory", "acme", &["*"], "read write", 600, "ultrasync")
}

fn sign(secret: &[u8], alg: Algorithm, claims: &Claims) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret))
        .expect("sign")
}

async fn refused(stack: &Stack, token: &str) -> u16 {
    match Connection::connect(&stack.ws_url(), token).await {
        Err(ClientError::Http(status)) => status,
        Ok(_) => panic!("token was accepted"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_401_before_the_upgrade() {
    let stack = Stack::start().await;
    let secret = stack.secret.as_bytes().to_vec();

    let mut expired = good_claims();
    expired.exp = auth::now_secs() - 120;
    assert_eq!(
        refused(&stack, &sign(&secret, Algorithm::HS256, &expired)).await,
        401
    );

    let wrong_key = sign(
        b"some-other-secret-some-other-secret!",
        Algorithm::HS256,
        &good_claims(),
    );
    assert_eq!(refused(&stack, &wrong_key).await, 401);

    let mut audience = good_claims();
    audience.aud = "another-service".into();
    assert_eq!(
        refused(&stack, &sign(&secret, Algorithm::HS256, &audience)).await,
        401
    );

    // alg: none, no signature.
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&good_claims()).expect("claims"));
    assert_eq!(refused(&stack, &format!("{header}.{body}.")).await, 401);

    // Algorithm confusion: same secret, another HMAC algorithm.
    assert_eq!(
        refused(&stack, &sign(&secret, Algorithm::HS512, &good_claims())).await,
        401
    );

    assert_eq!(refused(&stack, "not-a-jwt").await, 401);

    // No token at all, even without upgrade headers: 401 with the SPEC error body.
    let (status, body) = http_request("GET", &format!("http://{}/v1/sync", stack.http), &[], "")
        .await
        .expect("http");
    assert_eq!(status, 401);
    let body: serde_json::Value = serde_json::from_str(&body).expect("json error body");
    assert_eq!(body["error"]["code"], "unauthorized");

    // The good token works, also as ?access_token= for browsers.
    let good = sign(&secret, Algorithm::HS256, &good_claims());
    Connection::connect(&stack.ws_url(), &good)
        .await
        .expect("header token")
        .close()
        .await;
    let url = format!("{}?access_token={good}", stack.ws_url());
    let _ = Connection::connect(&url, "ignored-when-header-is-bad").await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_is_authorized() {
    let stack = Stack::start().await;

    // A read-only token may follow but not write.
    let mut reader = Connection::connect(&stack.ws_url(), &stack.token("rita", "read"))
        .await
        .expect("connect");
    reader
        .hello("acme", "web", "rita-1", BTreeMap::new())
        .await
        .expect("hello");
    reader
        .command("c1", "index", "k", OpType::Set, json!(1))
        .await
        .expect("send");
    match reader.recv_timeout(WAIT).await.expect("answer") {
        ServerMessage::Reject {
            code, command_id, ..
        } => {
            assert_eq!(code, ErrorCode::Forbidden);
            assert_eq!(command_id, "c1");
        }
        other => panic!("expected a reject, got {other:?}"),
    }

    // The org comes from the token: another org in hello is refused and closed (1008).
    let mut intruder = Connection::connect(&stack.ws_url(), &stack.token("ivan", "read write"))
        .await
        .expect("connect");
    let err = intruder
        .hello("globex", "web", "ivan-1", BTreeMap::new())
        .await;
    assert!(err.is_err(), "hello to another org was accepted");
    match intruder.recv_timeout(WAIT).await {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, 1008),
        other => panic!("expected close 1008, got {other:?}"),
    }

    // A namespace allow-list in the token is enforced per frame.
    let mut claims = auth::claims("nina", "acme", &["web"], "read write", 600, "ultrasync");
    claims.ns = Some(vec!["index".into()]);
    let token = auth::mint_hs256(stack.secret.as_bytes(), &claims).expect("mint");
    let mut limited = Connection::connect(&stack.ws_url(), &token)
        .await
        .expect("connect");
    limited
        .hello("acme", "web", "nina-1", BTreeMap::new())
        .await
        .expect("hello");
    limited
        .command("c2", "settings", "k", OpType::Set, json!(1))
        .await
        .expect("send");
    assert!(matches!(
        limited.recv_timeout(WAIT).await.expect("answer"),
        ServerMessage::Reject {
            code: ErrorCode::Forbidden,
            ..
        }
    ));
    // ...and a project outside the token's list is refused at hello.
    let mut other_project = Connection::connect(&stack.ws_url(), &token)
        .await
        .expect("connect");
    assert!(
        other_project
            .hello("acme", "mobile", "nina-2", BTreeMap::new())
            .await
            .is_err()
    );

    // Ids that would end up in a subject are validated.
    let mut writer = stack.client("wes", "web", "wes-1", &[]).await;
    writer
        .command("c3", "bad.ns", "k", OpType::Set, json!(1))
        .await
        .expect("send");
    assert!(matches!(
        writer.recv_timeout(WAIT).await.expect("answer"),
        ServerMessage::Reject {
            code: ErrorCode::InvalidId,
            ..
        }
    ));
    writer
        .command("c4", "index", "bad\u{1}key", OpType::Set, json!(1))
        .await
        .expect("send");
    assert!(matches!(
        writer.recv_timeout(WAIT).await.expect("answer"),
        ServerMessage::Reject {
            code: ErrorCode::InvalidKey,
            ..
        }
    ));
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_is_closed_when_its_token_expires() {
    let stack = Stack::start().await;
    let claims = auth::claims("eve", "acme", &["*"], "read", 1, "ultrasync");
    let token = auth::mint_hs256(stack.secret.as_bytes(), &claims).expect("mint");
    let mut conn = Connection::connect(&stack.ws_url(), &token)
        .await
        .expect("connect");
    loop {
        match conn.recv_timeout(Duration::from_secs(10)).await {
            Err(ClientError::Closed { code, reason }) => {
                assert_eq!(code, 1008, "{reason}");
                break;
            }
            Ok(_) => continue,
            Err(e) => panic!("expected a 1008 close, got {e}"),
        }
    }
    stack.shutdown().await;
}

/// The public key file of the EdDSA stack (`StackOptions::configure` takes a plain fn).
static ED25519_PUBLIC_KEY: OnceLock<PathBuf> = OnceLock::new();

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_key_gateway_accepts_its_issuers_tokens_only() {
    // The issuer's key pair; the gateway gets the public half only.
    let issuer = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519 key");
    let dir = tempfile::tempdir().expect("dir");
    let public_pem = issuer.public_key_pem();
    let path = dir.path().join("jwt-ed25519.pub");
    std::fs::write(&path, &public_pem).expect("write key");
    ED25519_PUBLIC_KEY.set(path).expect("set once");
    let stack = Stack::start_with(StackOptions {
        configure: |c| {
            c.auth.algorithm = TokenAlgorithm::EdDsa;
            c.auth.public_key_file = ED25519_PUBLIC_KEY.get().cloned();
        },
        ..StackOptions::default()
    })
    .await;
    let signing = EncodingKey::from_ed_der(&issuer.serialize_der());

    // The issuer's token connects and writes.
    let good = auth::mint(Algorithm::EdDSA, &signing, None, &good_claims()).expect("mint");
    let mut conn = Connection::connect(&stack.ws_url(), &good)
        .await
        .expect("an EdDSA token is accepted");
    conn.hello("acme", "web", "mallory-1", BTreeMap::new())
        .await
        .expect("hello");
    conn.command("c1", "index", "k", OpType::Set, json!(1))
        .await
        .expect("send");
    loop {
        match conn.recv_timeout(WAIT).await.expect("answer") {
            ServerMessage::Ack { command_id, .. } => {
                assert_eq!(command_id, "c1");
                break;
            }
            ServerMessage::Reject { code, reason, .. } => panic!("rejected: {code:?} {reason}"),
            _ => continue,
        }
    }
    conn.close().await;

    // HS256 is refused, even with the secret the stack still has configured...
    let hs256 = sign(stack.secret.as_bytes(), Algorithm::HS256, &good_claims());
    assert_eq!(refused(&stack, &hs256).await, 401);
    // ...and signed with the public key (algorithm confusion).
    let confused = sign(public_pem.as_bytes(), Algorithm::HS256, &good_claims());
    assert_eq!(refused(&stack, &confused).await, 401);
    // Another Ed25519 key, alg none, an expired token of the right key.
    let stranger = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
    let forged = auth::mint(
        Algorithm::EdDSA,
        &EncodingKey::from_ed_der(&stranger.serialize_der()),
        None,
        &good_claims(),
    )
    .expect("mint");
    assert_eq!(refused(&stack, &forged).await, 401);
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&good_claims()).expect("claims"));
    assert_eq!(refused(&stack, &format!("{header}.{body}.")).await, 401);
    let mut expired = good_claims();
    expired.exp = auth::now_secs() - 120;
    let expired = auth::mint(Algorithm::EdDSA, &signing, None, &expired).expect("mint");
    assert_eq!(refused(&stack, &expired).await, 401);

    // The client learns only that the token was refused, not why.
    let url = format!("http://{}/v1/sync", stack.http);
    let bearer = format!("Bearer {confused}");
    let (status, body) = http_request("GET", &url, &[("Authorization", bearer.as_str())], "")
        .await
        .expect("http");
    assert_eq!(status, 401);
    let body: serde_json::Value = serde_json::from_str(&body).expect("json error body");
    assert_eq!(body["error"]["code"], "unauthorized");
    assert_eq!(body["error"]["message"], auth::GENERIC_REFUSAL, "{body}");
    stack.shutdown().await;
}
