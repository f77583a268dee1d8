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

/// The harness's config with the database and the socket moved into folders the daemon makes.
fn in_folders(harness: &Harness, daemon_keys: &str) -> std::path::PathBuf {
    harness.write_config_with_daemon(&harness.server.url(), BOTH_PROJECTIONS, "", daemon_keys);
    let config = harness.config_path();
    let text = std::fs::read_to_string(&config)
        .unwrap_or_default()
        .replace(
            "database = \"projector.db\"",
            "database = \"data/projector.db\"",
        )
        .replace(
            "control_socket = \"projector.sock\"",
            "control_socket = \"run/projector.sock\"",
        );
    std::fs::write(&config, text).unwrap_or_else(|e| panic!("{e}"));
    config
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .map(|meta| meta.mode() & 0o777)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `projector run` under `umask 000`, as a shell started by a careless script would run it.
fn run_with_open_umask(config: &std::path::Path, dir: &std::path::Path) -> Daemon {
    let script = format!(
        "umask 000 && exec '{}' run --config '{}'",
        env!("CARGO_BIN_EXE_projector"),
        config.display()
    );
    Daemon::spawn_command(dir, std::process::Command::new("sh").args(["-c", &script]))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_files_the_daemon_makes_are_owner_only_whatever_the_umask() {
    let events = bank::generate(107, 200);
    let harness = Harness::new(events.clone()).await;
    let config = in_folders(&harness, "");
    let mut daemon = run_with_open_umask(&config, harness.dir.path());
    let database = harness.dir.path().join("data/projector.db");
    common::wait_for(&mut daemon, "the read models", || {
        common::checkpoints(&database).get("account_ledger") == Some(&200)
    })
    .await;
    let dir = harness.dir.path();
    for (file, expected) in [
        ("data", 0o700),
        ("data/projector.db", 0o600),
        ("data/projector.db-wal", 0o600),
        ("data/projector.db-shm", 0o600),
        ("data/projector.db.lock", 0o600),
        ("run", 0o700),
        ("run/projector.sock", 0o600),
    ] {
        assert_eq!(mode(&dir.join(file)), expected, "{file}");
    }
    assert!(daemon.terminate().await.0.success());

    // A team that wants its group to read the read models says so.
    std::fs::remove_dir_all(dir.join("data")).unwrap_or_else(|e| panic!("{e}"));
    let config = in_folders(&harness, "database_mode = \"0640\"");
    let mut daemon = run_with_open_umask(&config, dir);
    common::wait_for(&mut daemon, "the read models", || {
        common::checkpoints(&database).get("account_ledger") == Some(&200)
    })
    .await;
    assert_eq!(mode(&dir.join("data/projector.db")), 0o640);
    assert_eq!(mode(&dir.join("data/projector.db-wal")), 0o640);
    assert!(daemon.terminate().await.0.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_planted_link_and_a_folder_others_can_write_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let harness = Harness::new(bank::generate(108, 50)).await;
    let config = in_folders(&harness, "");
    let dir = harness.dir.path();
    // Another user's link where the lock file goes: following it would lock (or create) a file
    // of their choosing.
    std::fs::create_dir(dir.join("data")).unwrap_or_else(|e| panic!("{e}"));
    let theirs = dir.join("theirs");
    std::fs::write(&theirs, "keep").unwrap_or_else(|e| panic!("{e}"));
    std::os::unix::fs::symlink(&theirs, dir.join("data/projector.db.lock"))
        .unwrap_or_else(|e| panic!("{e}"));
    let output = common::projector(&["run", "--config", &config.to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is a symbolic link: refusing to follow it"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&theirs).unwrap_or_default(), "keep");

    // A database folder every user can write to.
    std::fs::remove_file(dir.join("data/projector.db.lock")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(dir.join("data"), std::fs::Permissions::from_mode(0o777))
        .unwrap_or_else(|e| panic!("{e}"));
    let output = common::projector(&["run", "--config", &config.to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the folder of the database")
            && stderr.contains("can be written by other users (mode 0777)"),
        "{stderr}"
    );
    // The same for the control socket's folder.
    std::fs::set_permissions(dir.join("data"), std::fs::Permissions::from_mode(0o700))
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir(dir.join("run")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(dir.join("run"), std::fs::Permissions::from_mode(0o1777))
        .unwrap_or_else(|e| panic!("{e}"));
    let output = common::projector(&["run", "--config", &config.to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the folder of the control socket")
            && stderr.contains("can be written by other users"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ctl_will_not_talk_to_another_users_process_on_the_socket() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let root = rustix::process::geteuid().is_root();
    if !root {
        eprintln!("not root: the peer check is covered by the unit tests only");
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777))
        .unwrap_or_else(|e| panic!("{e}"));
    let socket = dir.path().join("projector.sock");
    // Another user squats the socket's name and answers as the daemon would.
    let impostor = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\ns.listen(1)\nprint('ready',flush=True)\nc,_=s.accept()\ntry:\n  c.recv(100)\n  c.sendall(b'{\"ok\":true,\"message\":\"stopping\"}\\n')\nexcept OSError:\n  pass\n";
    let mut squatter = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--", "python3", "-c", impostor])
        .arg(&socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut ready = String::new();
    let stdout = squatter
        .stdout
        .take()
        .unwrap_or_else(|| panic!("no stdout"));
    std::io::BufReader::new(stdout)
        .read_line(&mut ready)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ready.trim(), "ready");
    let output = common::projector(&["ctl", "--socket", &socket.to_string_lossy(), "stop"]);
    let _ = squatter.kill();
    let _ = squatter.wait();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refusing to talk to it"), "{stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("stopped"));
}
