//! Nothing lost across reconnects (SPEC §7): event history with `since`, and publish-id
//! deduplication.

use crate::support::*;
use fleetcast::model::Role;
use serde_json::json;
use std::time::Duration;

fn alert_n(n: u64) -> serde_json::Value {
    json!({"type":"safety_alert","payload":{"alert_id":format!("a{n}"),"severity":"high",
        "category":"harsh_braking","vehicle_id":"v1","n":n}})
}

fn subscribe_since(c: &mut Client, epoch: u64, seq: u64) -> serde_json::Value {
    c.send(
        json!({"type":"subscribe","id":"resume","payload":{"action":"subscribe",
        "channel":"alerts","since":{"epoch":epoch,"seq":seq}}}),
    );
    c.expect("subscribed")
}

#[test]
fn abrupt_disconnect_then_since_recovers_the_exact_sequence() {
    const TOTAL: u64 = 300;
    let b = Broker::with_shards(2);
    let mut dash = b.connect_key(&key("fleet_a", Role::Viewer));
    let reply = dash.subscribe("alerts", json!({}));
    let epoch = reply["payload"]["epoch"].as_u64().unwrap();
    assert_eq!(reply["payload"]["seq"], 0);
    let addr = b.addr;
    let publisher = std::thread::spawn(move || {
        let url = format!(
            "ws://{addr}/v1/streaming/websocket?api_key={}",
            key("fleet_a", Role::Service)
        );
        let mut svc = Client::connect(&url);
        for n in 1..=TOTAL {
            svc.send(alert_n(n));
            if n % 20 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        svc.send(json!({"type":"ping","id":"done"}));
        svc.expect("pong");
    });
    // Read some, then vanish without a close handshake while alerts keep coming.
    let mut seen = Vec::new();
    while seen.len() < 40 {
        let m = dash.expect("safety_alert");
        assert_eq!(m["epoch"], epoch);
        seen.push((
            m["seq"].as_u64().unwrap(),
            m["payload"]["n"].as_u64().unwrap(),
        ));
    }
    let _ = dash.ws.get_ref().shutdown(std::net::Shutdown::Both);
    drop(dash);
    std::thread::sleep(Duration::from_millis(30));
    let mut again = b.connect_key(&key("fleet_a", Role::Viewer));
    let last = seen.last().unwrap().0;
    let reply = subscribe_since(&mut again, epoch, last);
    assert_eq!(reply["payload"]["recovered"], true, "{reply}");
    assert_eq!(reply["id"], "resume");
    while (seen.len() as u64) < TOTAL {
        let m = again.expect("safety_alert");
        seen.push((
            m["seq"].as_u64().unwrap(),
            m["payload"]["n"].as_u64().unwrap(),
        ));
    }
    publisher.join().unwrap();
    again.expect_silence(Duration::from_millis(200));
    let expected: Vec<(u64, u64)> = (1..=TOTAL).map(|n| (n, n)).collect();
    assert_eq!(seen, expected, "no hole, no duplicate, in order");
}

#[test]
fn a_gap_older_than_the_history_is_not_recovered() {
    let mut cfg = config(1);
    cfg.history.max_events = 10;
    let b = Broker::start(cfg);
    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    for n in 1..=30 {
        svc.send(alert_n(n));
    }
    svc.send(json!({"type":"ping","id":"done"}));
    svc.expect("pong");
    let mut dash = b.connect_key(&key("fleet_a", Role::Viewer));
    let epoch = dash.subscribe("alerts", json!({}))["payload"]["epoch"]
        .as_u64()
        .unwrap();
    // seq 5 is long gone (history keeps 21..=30): not recovered, nothing replayed.
    let mut late = b.connect_key(&key("fleet_a", Role::Viewer));
    let reply = subscribe_since(&mut late, epoch, 5);
    assert_eq!(reply["payload"]["recovered"], false, "{reply}");
    assert_eq!(reply["payload"]["seq"], 30);
    late.expect_silence(Duration::from_millis(150));
    // seq 25 is held: 26..=30 are replayed.
    let mut recent = b.connect_key(&key("fleet_a", Role::Viewer));
    assert_eq!(
        subscribe_since(&mut recent, epoch, 25)["payload"]["recovered"],
        true
    );
    for seq in 26..=30 {
        assert_eq!(recent.expect("safety_alert")["seq"], seq);
    }
    // Another epoch (a restarted broker) is not recovered.
    let mut other = b.connect_key(&key("fleet_a", Role::Viewer));
    assert_eq!(
        subscribe_since(&mut other, epoch + 1, 25)["payload"]["recovered"],
        false
    );
    // Live continues for all of them.
    svc.send(alert_n(31));
    for c in [&mut dash, &mut late, &mut recent, &mut other] {
        assert_eq!(c.expect("safety_alert")["seq"], 31);
    }
}

#[test]
fn a_retried_publish_id_is_acknowledged_as_duplicate_and_delivered_once() {
    let b = Broker::with_shards(2);
    let mut dash_a = b.connect_key(&key("fleet_a", Role::Viewer));
    dash_a.subscribe("alerts", json!({}));
    let mut dash_b = b.connect_key(&key("fleet_b", Role::Viewer));
    dash_b.subscribe("alerts", json!({}));
    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    let mut msg = alert_n(1);
    msg["id"] = json!("pub-1");
    msg["ack"] = json!(true);
    svc.send(msg.clone());
    let ack = svc.expect("ack");
    assert_eq!(
        (ack["id"].as_str(), ack["payload"]["status"].as_str()),
        (Some("pub-1"), Some("accepted"))
    );
    // The publisher reconnects and retries.
    drop(svc);
    let mut svc = b.connect_key(&key("fleet_a", Role::Service));
    svc.send(msg.clone());
    let ack = svc.expect("ack");
    assert_eq!(ack["payload"]["status"], "duplicate", "{ack}");
    // Without asking for an ack, a duplicate still gets one, saying so.
    msg["ack"] = json!(false);
    svc.send(msg.clone());
    assert_eq!(svc.expect("ack")["payload"]["status"], "duplicate");
    // Another tenant may use the same id.
    let mut svc_b = b.connect_key(&key("fleet_b", Role::Service));
    svc_b.send(msg.clone());
    assert_eq!(dash_b.expect("safety_alert")["id"], "pub-1");
    // The subscriber got it once: the next event is the marker.
    svc.send(alert_n(2));
    assert_eq!(dash_a.expect("safety_alert")["id"], "pub-1");
    assert_eq!(dash_a.expect("safety_alert")["payload"]["n"], 2);
    assert_eq!(b.metric("fleetcast_drops_total", "reason=\"duplicate\""), 2);
}
