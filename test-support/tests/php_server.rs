//! Self-tests of `PhpServer`: real PHP sessions counting 1, 2, 3 for a cookie-keeping client,
//! the session cookie name option, strict mode across instances, login id regeneration,
//! stop and restart.

use test_support::http;
use test_support::PhpServer;

async fn counter(client: &reqwest::Client, server: &PhpServer) -> serde_json::Value {
    let response = client
        .get(format!("{}/counter.php", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn session_counter_counts_for_a_cookie_keeping_client() {
    let server = PhpServer::start("php-a");
    let client = http::cookie_client();
    let first = counter(&client, &server).await;
    assert_eq!(first["instance"], "php-a");
    assert_eq!(first["session_name"], "PHPSESSID");
    assert_eq!(first["counter"], 1);
    assert_eq!(counter(&client, &server).await["counter"], 2);
    let third = counter(&client, &server).await;
    assert_eq!(third["counter"], 3);
    assert_eq!(third["session_id"], first["session_id"]);

    // A client without the cookie starts its own session.
    assert_eq!(counter(&http::cookie_client(), &server).await["counter"], 1);

    let health = http::get_blocking(server.addr(), "/index.php").unwrap();
    assert_eq!((health.status, health.text().as_str()), (200, "ok"));
}

#[tokio::test]
async fn session_name_option_sets_the_cookie_name() {
    let server = PhpServer::builder("core-1")
        .session_name("LibreHealthEHR")
        .start();
    assert_eq!(server.session_name(), "LibreHealthEHR");
    let response = http::client()
        .get(format!("{}/counter.php", server.url()))
        .send()
        .await
        .unwrap();
    let set_cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(set_cookie.starts_with("LibreHealthEHR="), "{set_cookie}");
    let json: serde_json::Value = response.json().await.unwrap();
    assert!(set_cookie.contains(json["session_id"].as_str().unwrap()));
}

#[tokio::test]
async fn strict_mode_refuses_a_session_id_from_another_instance() {
    let a = PhpServer::start("a");
    let b = PhpServer::start("b");
    let client = http::client();
    let on_a = counter(&client, &a).await;
    let id = on_a["session_id"].as_str().unwrap().to_string();
    let on_b: serde_json::Value = client
        .get(format!("{}/counter.php", b.url()))
        .header("Cookie", format!("PHPSESSID={id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(on_b["instance"], "b");
    assert_eq!(on_b["counter"], 1);
    assert_ne!(on_b["session_id"], id.as_str());
}

#[tokio::test]
async fn login_regenerates_the_id_and_keeps_the_session() {
    let server = PhpServer::start("core");
    let client = http::cookie_client();
    let before = counter(&client, &server).await;
    let login: serde_json::Value = client
        .get(format!("{}/login.php", server.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(login["old_session_id"], before["session_id"]);
    assert_ne!(login["session_id"], before["session_id"]);
    assert_eq!(login["counter"], 2);
    let after = counter(&client, &server).await;
    assert_eq!(after["session_id"], login["session_id"]);
    assert_eq!(after["counter"], 3);
}

#[tokio::test]
async fn restart_keeps_port_and_sessions_stop_refuses() {
    let mut server = PhpServer::start("restartable");
    let addr = server.addr();
    let client = http::cookie_client();
    assert_eq!(counter(&client, &server).await["counter"], 1);

    server.stop();
    assert!(!server.is_running());
    assert!(!test_support::ports::is_listening(addr));

    server.restart();
    assert_eq!(server.addr(), addr);
    assert_eq!(counter(&client, &server).await["counter"], 2);

    server.clear_sessions();
    assert_eq!(counter(&client, &server).await["counter"], 1);
    assert!(server.logs().contains("/counter.php"));
}
