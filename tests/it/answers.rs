//! wsgate's own answers (docs/ARCHITECTURE.md, "Backend attempts"): one attempt loop for HTTP and for
//! upgrades, so the same failure gets the same answer on both, and a backend's own answer is relayed
//! rather than replaced.

use http::{Response, StatusCode};

use crate::common::*;

/// `backends` with the ones in `draining` marked `drain = true`.
fn with_draining(backends: &[std::net::SocketAddr], draining: &[std::net::SocketAddr]) -> String {
    let mut text = config_text(backends, "");
    for addr in draining {
        text = text.replace(
            &format!("{{ addr = \"{addr}\" }}"),
            &format!("{{ addr = \"{addr}\", drain = true }}"),
        );
    }
    text
}

fn get(addr: std::net::SocketAddr) -> String {
    format!("GET /x HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
}

#[tokio::test]
async fn when_the_backends_tried_run_out_http_and_upgrades_both_answer_502() {
    let draining = TestBackend::start("draining").await;
    // The one backend taking connections refuses them; the other one drains.
    let dead = dead_addr();
    let (_gateway, addr) = gateway(&with_draining(&[dead, draining.addr], &[draining.addr])).await;
    let plain = raw_exchange(addr, get(addr).as_bytes()).await;
    assert_eq!(plain.status, 502, "{}", plain.body_text());
    assert_eq!(plain.body_text(), "backend unreachable\n");
    let upgrade = raw_exchange(addr, upgrade_request(addr, "/ws", "").as_bytes()).await;
    assert_eq!(upgrade.status, 502, "{}", upgrade.body_text());
    assert_eq!(upgrade.body_text(), "backend unreachable\n");
    assert!(
        draining.seen().is_empty(),
        "a draining backend got a request"
    );
}

#[tokio::test]
async fn with_no_backend_to_try_http_and_upgrades_both_answer_503() {
    let draining = TestBackend::start("draining").await;
    let (_gateway, addr) = gateway(&with_draining(&[draining.addr], &[draining.addr])).await;
    let plain = raw_exchange(addr, get(addr).as_bytes()).await;
    assert_eq!(plain.status, 503, "{}", plain.body_text());
    assert_eq!(plain.body_text(), "no backend available\n");
    let upgrade = raw_exchange(addr, upgrade_request(addr, "/ws", "").as_bytes()).await;
    assert_eq!(upgrade.status, 503, "{}", upgrade.body_text());
    assert_eq!(upgrade.body_text(), "no backend available\n");
}

/// A 5xx to an upgrade sends it on to the next backend while attempts remain; when no other backend can
/// take it after all, the client gets the backend's own answer, not one of wsgate's.
#[tokio::test]
async fn a_server_error_to_an_upgrade_is_relayed_when_no_other_backend_can_take_it() {
    let failing = http_backend(|_req| async {
        let mut response = Response::new(backend_body("down for maintenance\n"));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        response
    })
    .await;
    let draining = TestBackend::start("draining").await;
    let text = with_draining(&[failing.addr, draining.addr], &[draining.addr]);
    let (_gateway, addr) = gateway(&text).await;
    let response = raw_exchange(addr, upgrade_request(addr, "/ws", "").as_bytes()).await;
    assert_eq!(response.status, 503, "{}", response.body_text());
    assert_eq!(response.body_text(), "down for maintenance\n");
    assert_eq!(failing.accepts(), 1);
}
