//! Feeds that need credentials, and feeds not to be trusted, against the real binary: tokens
//! from files go to the feed and nowhere else, a user in the URL is Basic authentication, entry
//! URLs and redirects to another origin are refused, secrets never appear in what is shown, a
//! private CA and client certificates work, and an untrusted certificate says what is wrong.

mod common;

use common::pki::Pki;
use common::{wait_for, Daemon, Harness};
use projector::demo::bank;
use projector::demo::consumer_toml::BOTH_PROJECTIONS;
use projector::demo::faults::{Fault, Target};
use projector::demo::feed_server::FeedServer;

const BOTH: &[&str] = &["account_balances", "account_ledger"];

async fn trap(events: Vec<projector::demo::feed_server::StoredEvent>) -> FeedServer {
    FeedServer::start(([127, 0, 0, 1], 0).into(), events)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn base(server: &FeedServer) -> String {
    format!("http://{}", server.addr())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_from_a_file_goes_to_the_feed_and_never_elsewhere() {
    let events = bank::generate(101, 300);
    let harness = Harness::new(events.clone()).await;
    std::fs::write(
        harness.dir.path().join("token"),
        "Bearer t0k3n-from-a-file\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // The bodies are served by another server, which the config allows.
    let elsewhere = trap(events.clone()).await;
    harness.server.set_body_base(&base(&elsewhere));
    let allowed = format!(
        "headers = {{ Authorization = {{ file = \"token\" }} }}\nbody_origin = [\"{}\"]",
        base(&elsewhere)
    );
    harness.write_config(&harness.server.url(), BOTH_PROJECTIONS, &allowed);
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 300).await;
    harness.assert_exact(&events);
    let feed = harness.server.authorizations();
    assert!(
        !feed.is_empty()
            && feed
                .iter()
                .all(|(_, auth)| auth.as_deref() == Some("Bearer t0k3n-from-a-file")),
        "{feed:?}"
    );
    let bodies = elsewhere.authorizations();
    assert!(!bodies.is_empty(), "the bodies were read elsewhere");
    assert!(bodies.iter().all(|(_, auth)| auth.is_none()), "{bodies:?}");
    assert!(daemon.terminate().await.0.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_entry_url_on_another_origin_is_refused_until_the_feed_names_its_own() {
    let events = bank::generate(102, 200);
    let harness = Harness::new(events.clone()).await;
    // A feed not to be trusted names a service of the network as its bodies' place.
    let internal = trap(events.clone()).await;
    harness.server.set_body_base(&base(&internal));
    let mut daemon = harness.spawn_running().await;
    wait_for(&mut daemon, "the entry URL to be refused", || {
        let feed = harness.feed_status("bank");
        feed["last_error"]["message"].as_str().is_some_and(|m| {
            m.contains("url is refused") && m.contains("is not on the feed's origin")
        })
    })
    .await;
    assert_eq!(harness.checkpoints().get("account_balances"), Some(&0));
    // Nothing was asked of the other service.
    assert!(internal.authorizations().is_empty());
    // The feed mends its pages: reading goes on, exact.
    harness.server.set_body_base(&base(&harness.server));
    harness.wait_for_checkpoints(&mut daemon, BOTH, 200).await;
    harness.assert_exact(&events);
    assert!(internal.authorizations().is_empty());
    assert!(daemon.terminate().await.0.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_to_another_origin_is_refused() {
    let events = bank::generate(103, 200);
    let harness = Harness::new(events.clone()).await;
    let internal = trap(events.clone()).await;
    harness.server.redirect_elsewhere_to(&base(&internal));
    harness
        .server
        .inject(Target::Bodies, Fault::RedirectElsewhere, 5);
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 200).await;
    harness.assert_exact(&events);
    assert!(
        internal.authorizations().is_empty(),
        "followed a redirect elsewhere"
    );
    let (status, log) = daemon.terminate().await;
    assert!(status.success());
    assert!(
        log.contains("refused: a redirect to http://127.0.0.1:"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_in_the_url_and_headers_reach_the_feed_and_nothing_shown() {
    let events = bank::generate(104, 300);
    let harness = Harness::new(events.clone()).await;
    let (password, token, header) = ("pa55-s3cr3t", "qu3ry-t0k3n", "h3ad3r-s3cr3t");
    let url = format!(
        "http://reader:{password}@{}/events?access_token={token}",
        harness.server.addr()
    );
    let keys = format!("headers = {{ X-Api-Key = \"{header}\" }}");
    harness.write_config(&url, BOTH_PROJECTIONS, &keys);
    // Failures, so that errors naming the URLs are logged and shown.
    harness.server.inject(Target::Pages, Fault::Status(500), 3);
    harness.server.inject(Target::Bodies, Fault::Status(503), 3);
    let mut daemon = harness.spawn_running().await;
    harness.wait_for_checkpoints(&mut daemon, BOTH, 300).await;
    harness.assert_exact(&events);
    // The user and password went as Basic authentication: base64("reader:pa55-s3cr3t").
    let seen = harness.server.authorizations();
    assert!(
        seen.iter()
            .filter(|(path, _)| path.starts_with("/events?"))
            .all(|(_, auth)| auth.as_deref() == Some("Basic cmVhZGVyOnBhNTUtczNjcjN0")),
        "{seen:?}"
    );
    let config = harness.config_path().to_string_lossy().to_string();
    let mut shown = vec![
        String::from_utf8_lossy(&harness.ctl(&["status"]).stdout).into_owned(),
        String::from_utf8_lossy(&harness.ctl(&["status", "--json"]).stdout).into_owned(),
    ];
    let probe = common::projector(&["check", "--probe", "--config", &config]);
    shown.push(format!("{probe:?}"));
    let (status, log) = daemon.terminate().await;
    assert!(status.success());
    shown.push(log);
    // A mistake elsewhere in the same config: its error must not quote the secrets either.
    let broken = std::fs::read_to_string(&config)
        .unwrap_or_default()
        .replace("format = \"flux\"", "format = \"atom\"");
    std::fs::write(&config, broken).unwrap_or_else(|e| panic!("{e}"));
    shown.push(format!(
        "{:?}",
        common::projector(&["check", "--config", &config])
    ));
    for text in &shown {
        for secret in [password, token, header] {
            assert!(!text.contains(secret), "{secret} shown in:\n{text}");
        }
    }
    assert!(shown[0].contains("access_token=REDACTED"), "{}", shown[0]);
}

/// The daemon reading `server` over TLS with `extra` feed keys, and the folder's PKI files.
async fn over_tls(
    events: &[projector::demo::feed_server::StoredEvent],
    pki: &Pki,
    require_client: bool,
) -> (Harness, FeedServer) {
    let harness = Harness::new(Vec::new()).await;
    let server = FeedServer::start_tls(
        ([127, 0, 0, 1], 0).into(),
        events.to_vec(),
        pki.server(require_client),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    for (name, text) in [
        ("ca.pem", &pki.ca_pem),
        ("client.pem", &pki.client_cert_pem),
        ("client.key", &pki.client_key_pem),
    ] {
        std::fs::write(harness.dir.path().join(name), text).unwrap_or_else(|e| panic!("{e}"));
    }
    (harness, server)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_ca_is_trusted_with_tls_ca_and_refused_plainly_without() {
    let events = bank::generate(105, 200);
    let pki = Pki::new();
    let (harness, server) = over_tls(&events, &pki, false).await;
    harness.write_config(&server.url(), BOTH_PROJECTIONS, "");
    let mut daemon = harness.spawn_running().await;
    wait_for(
        &mut daemon,
        "the certificate to be refused, plainly",
        || {
            let feed = harness.feed_status("bank");
            let message = feed["last_error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            message.contains("not signed by a certificate authority this daemon trusts")
                && message.contains("set tls_ca")
        },
    )
    .await;
    assert!(daemon.terminate().await.0.success());

    harness.write_config(&server.url(), BOTH_PROJECTIONS, "tls_ca = \"ca.pem\"");
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 200).await;
    harness.assert_exact(&events);
    assert!(daemon.terminate().await.0.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_feed_that_asks_for_a_client_certificate_gets_one() {
    let events = bank::generate(106, 200);
    let pki = Pki::new();
    let (harness, server) = over_tls(&events, &pki, true).await;
    harness.write_config(&server.url(), BOTH_PROJECTIONS, "tls_ca = \"ca.pem\"");
    let mut daemon = harness.spawn_running().await;
    wait_for(
        &mut daemon,
        "the missing client certificate to be said",
        || {
            let feed = harness.feed_status("bank");
            feed["state"] == "backing_off"
                && feed["last_error"]["message"].as_str().is_some_and(|m| {
                    m.contains("the feed asks for a client certificate: set tls_client_cert")
                })
        },
    )
    .await;
    assert!(daemon.terminate().await.0.success());

    let keys =
        "tls_ca = \"ca.pem\"\ntls_client_cert = \"client.pem\"\ntls_client_key = \"client.key\"";
    harness.write_config(&server.url(), BOTH_PROJECTIONS, keys);
    let mut daemon = Daemon::spawn(&harness.config_path(), harness.dir.path(), &[]);
    harness.wait_for_checkpoints(&mut daemon, BOTH, 200).await;
    harness.assert_exact(&events);
    assert!(daemon.terminate().await.0.success());
}
