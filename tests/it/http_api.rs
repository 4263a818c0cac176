//! The HTTP API: `POST /v1/publish` and the polling fallbacks (SPEC §4, issue 5).

use crate::support::*;
use fleetcast::model::Role;
use serde_json::{Value, json};

fn post(b: &Broker, key: Option<&str>, body: &str) -> (u16, Value) {
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let (status, text) = b.http(&format!(
        "POST /v1/publish HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn get(b: &Broker, key: &str, path: &str) -> (u16, Value) {
    let (status, text) = b.http(&format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n"
    ));
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn publish_one_wrapped_and_ndjson_with_a_result_per_message() {
    let b = Broker::with_shards(2);
    let mut dash = b.connect_key(&key("fleet_a", Role::Viewer));
    dash.subscribe("alerts", json!({}));
    let svc = key("fleet_a", Role::Service);
    let one = alert("h1", "v1", "high").to_string();
    let (status, r) = post(&b, Some(&svc), &one);
    assert_eq!(status, 202, "{r}");
    assert_eq!(r["results"][0]["status"], "accepted");
    assert_eq!(r["results"][0]["channel"], "alerts");
    assert_eq!(dash.expect("safety_alert")["payload"]["alert_id"], "h1");

    let mut bad = alert("h3", "v1", "meh");
    bad["id"] = json!("bad-1");
    let wrapped =
        json!({"messages":[alert("h2","v1","low"), bad, location("v9", 91.0)]}).to_string();
    let (status, r) = post(&b, Some(&svc), &wrapped);
    assert_eq!(status, 202, "{r}");
    let res = r["results"].as_array().unwrap();
    assert_eq!(res.len(), 3);
    assert_eq!(res[0]["status"], "accepted");
    assert_eq!(
        (res[1]["status"].as_str(), res[1]["id"].as_str()),
        (Some("rejected"), Some("bad-1"))
    );
    assert_eq!(
        (
            res[1]["error"]["code"].as_u64(),
            res[1]["error"]["field"].as_str()
        ),
        (Some(400), Some("severity"))
    );
    assert_eq!(res[2]["error"]["field"], "latitude");
    assert_eq!(dash.expect("safety_alert")["payload"]["alert_id"], "h2");

    let nd = format!(
        "{}\n{}\n",
        alert("h4", "v1", "low"),
        alert("h5", "v1", "low")
    );
    let (status, r) = post(&b, Some(&svc), &nd);
    assert_eq!(status, 202, "{r}");
    assert_eq!(r["results"].as_array().unwrap().len(), 2);
    assert_eq!(dash.expect("safety_alert")["payload"]["alert_id"], "h4");
    assert_eq!(dash.expect("safety_alert")["payload"]["alert_id"], "h5");

    // A retried id is a duplicate, over HTTP as over WebSocket.
    let mut dup = alert("h6", "v1", "low");
    dup["id"] = json!("same-id");
    assert_eq!(
        post(&b, Some(&svc), &dup.to_string()).1["results"][0]["status"],
        "accepted"
    );
    assert_eq!(
        post(&b, Some(&svc), &dup.to_string()).1["results"][0]["status"],
        "duplicate"
    );
    assert_eq!(dash.expect("safety_alert")["payload"]["alert_id"], "h6");
    dash.expect_silence(std::time::Duration::from_millis(150));
}

#[test]
fn publish_refusals_are_json_errors_with_codes() {
    let mut cfg = config(1);
    cfg.limits.max_http_body_bytes = 2048;
    let b = Broker::start(cfg);
    let body = alert("x", "v1", "high").to_string();
    let (status, r) = post(&b, None, &body);
    assert_eq!((status, r["error"]["code"].as_u64()), (401, Some(401)));
    assert_eq!(post(&b, Some("not-a-key-0123456789"), &body).0, 401);
    assert_eq!(post(&b, Some(&key("fleet_a", Role::Viewer)), &body).0, 403);
    let too_big = format!("{{\"messages\":[{}]}}", vec![body.clone(); 20].join(","));
    assert_eq!(
        post(&b, Some(&key("fleet_a", Role::Service)), &too_big).0,
        413
    );
    assert_eq!(
        post(&b, Some(&key("fleet_a", Role::Service)), "[1,2]").0,
        400
    );
    let (status, _) = b.http(&format!(
        "POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        key("fleet_a", Role::Service)
    ));
    assert_eq!(status, 411);
    assert_eq!(b.get("/v1/publish").0, 405);
    // A device publishes for its own vehicle only.
    let dev = "key-fleet_a-device-v1-0123456789";
    let r = post(&b, Some(dev), &location("v2", 1.0).to_string()).1;
    assert_eq!(r["results"][0]["error"]["code"], 403, "{r}");
    let r = post(&b, Some(dev), &location("v1", 1.0).to_string()).1;
    assert_eq!(
        r["results"][0]["error"]["code"], 403,
        "trip_1 is not its trip: {r}"
    );
    let mut own = location("v1", 1.0);
    own["payload"].as_object_mut().unwrap().remove("trip_id");
    let r = post(&b, Some(dev), &own.to_string()).1;
    assert_eq!(r["results"][0]["status"], "accepted", "{r}");
}

#[test]
fn polling_fallbacks_serve_last_state_and_history() {
    let b = Broker::with_shards(2);
    let svc = key("fleet_a", Role::Service);
    for v in ["v1", "v2", "v3"] {
        post(&b, Some(&svc), &location(v, 40.0).to_string());
    }
    post(&b, Some(&svc), &location("v1", 41.0).to_string());
    let viewer = key("fleet_a", Role::Viewer);
    let (status, r) = get(&b, &viewer, "/v1/fleets/fleet_a/vehicles");
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["count"], 3);
    let v1 = r["vehicles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["payload"]["vehicle_id"] == "v1")
        .unwrap();
    assert_eq!(v1["payload"]["location"]["latitude"], 41.0);
    assert_eq!(get(&b, &viewer, "/v1/fleets/fleet_b/vehicles").0, 403);
    assert_eq!(
        get(
            &b,
            "key-fleet_a-device-v1-0123456789",
            "/v1/fleets/fleet_a/vehicles"
        )
        .0,
        403
    );

    for n in 0..5 {
        post(
            &b,
            Some(&svc),
            &alert(&format!("a{n}"), "v1", "high").to_string(),
        );
    }
    let (status, r) = get(
        &b,
        &viewer,
        "/v1/fleets/fleet_a/events?channel=alerts&since=2",
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["recovered"], true);
    let seqs: Vec<u64> = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![3, 4, 5]);
    assert_eq!(r["seq"], 5);
    let epoch = r["epoch"].as_u64().unwrap();
    let (_, r) = get(
        &b,
        &viewer,
        &format!("/v1/fleets/fleet_a/events?channel=alerts&since=5&epoch={epoch}"),
    );
    assert_eq!(
        (
            r["recovered"].as_bool(),
            r["events"].as_array().unwrap().len()
        ),
        (Some(true), 0)
    );
    let (_, r) = get(
        &b,
        &viewer,
        &format!(
            "/v1/fleets/fleet_a/events?channel=alerts&since=2&epoch={}",
            epoch + 1
        ),
    );
    assert_eq!(r["recovered"], false);
    assert_eq!(
        get(
            &b,
            &viewer,
            "/v1/fleets/fleet_a/events?channel=vehicle_locations"
        )
        .0,
        400
    );
    assert_eq!(get(&b, &viewer, "/v1/fleets/fleet_a/events").0, 400);
}

#[test]
fn http_publishes_are_rate_limited_per_user() {
    let mut cfg = config(1);
    cfg.limits.roles.service.messages_per_second = Some(5);
    let b = Broker::start(cfg);
    let svc = key("fleet_a", Role::Service);
    let items: Vec<Value> = (0..8)
        .map(|i| alert(&format!("r{i}"), "v1", "low"))
        .collect();
    let (status, r) = post(&b, Some(&svc), &json!({ "messages": items }).to_string());
    assert_eq!(status, 202, "{r}");
    let statuses: Vec<&str> = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [vec!["accepted"; 5], vec!["rejected"; 3]].concat()
    );
    assert_eq!(r["results"][7]["error"]["code"], 429);
    // The bucket is per user across requests: the next one right away is refused too.
    let (_, r) = post(&b, Some(&svc), &alert("r9", "v1", "low").to_string());
    assert_eq!(r["results"][0]["error"]["code"], 429, "{r}");
    assert_eq!(
        b.metric("fleetcast_limit_breaches_total", "kind=\"publish_rate\""),
        4
    );
}
