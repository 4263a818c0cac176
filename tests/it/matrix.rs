//! One position published through each publishing surface (native WebSocket,
//! `POST /v1/publish`, a Valtronics device, a Tracking driver) reaches a subscriber of every
//! dialect (native, Valtronics, Telematics, Tracking) in that dialect's shape and units,
//! and never a subscriber of another tenant, whichever dialect either side speaks.

use crate::support::*;
use fleetcast::model::Role;
use serde_json::{Value, json};
use std::time::Duration;

/// The speed every surface publishes: 36 km/h, which Telematics shows as 10 m/s.
const KMH: f64 = 36.0;

struct Subscribers {
    native: Client,
    valtronics: Client,
    telematics: Client,
    tracking: Client,
}

impl Subscribers {
    fn join(b: &Broker, tenant: &str) -> Subscribers {
        let viewer = key(tenant, Role::Viewer);
        let mut native = b.connect_key(&viewer);
        native.subscribe("vehicle_locations", json!({}));

        let mut valtronics = Client::connect(&b.url("/ws"));
        valtronics.send(json!({"type":"auth","token":viewer}));
        assert_eq!(valtronics.expect("auth_response")["success"], true);
        valtronics.send(json!({"type":"subscribe","channel":"telemetry"}));
        valtronics.expect("subscribed");

        let mut telematics = Client::connect(&b.url("/realtime/api/v1/ws/realtime"));
        telematics.send(json!({"type":"authenticate","access_token":viewer,
            "instance_id":tenant,"units":"metric","timezone":"UTC","date_format":"unix"}));
        telematics.expect("authenticated");
        telematics.expect("welcome");
        telematics.expect("subscribed");

        let mut tracking = Client::connect(&b.url("/v1/track"));
        tracking.send(json!({"action":"authenticate","payload":{
            "user_id":format!("{tenant}-viewer"),"role":"office","token":viewer}}));
        tracking.expect("authenticated");
        tracking.send(json!({"action":"subscribe_all"}));
        tracking.expect("subscribed");
        Subscribers {
            native,
            valtronics,
            telematics,
            tracking,
        }
    }

    /// Each subscriber's next position is `vehicle`'s, in its dialect's shape and units.
    fn receive(&mut self, vehicle: &str, lat: f64, surface: &str) {
        let n = self.native.expect("location_update");
        let p = &n["payload"];
        assert_eq!(p["vehicle_id"], vehicle, "native, from {surface}: {n}");
        assert_eq!(p["location"]["latitude"].as_f64(), Some(lat), "{n}");
        assert_eq!(
            p["location"]["speed"].as_f64(),
            Some(KMH),
            "native km/h: {n}"
        );

        let v = self.valtronics.expect("telemetry_update");
        let want_id: Value = vehicle.parse::<u64>().map_or(json!(vehicle), |n| json!(n));
        assert_eq!(v["device_id"], want_id, "valtronics, from {surface}: {v}");
        assert_eq!(
            v["telemetry"]["latitude"]["value"].as_f64(),
            Some(lat),
            "{v}"
        );
        assert_eq!(
            (
                v["telemetry"]["speed"]["value"].as_f64(),
                v["telemetry"]["speed"]["unit"].as_str()
            ),
            (Some(KMH), Some("km/h")),
            "valtronics speed: {v}"
        );

        let t = self.telematics.expect("device_update");
        assert_eq!(
            t["device_token"], vehicle,
            "telematics, from {surface}: {t}"
        );
        assert_eq!(t["position"]["Latitude"].as_f64(), Some(lat), "{t}");
        let speed = t["position"]["Speed"].as_f64().unwrap();
        assert!((speed - KMH / 3.6).abs() < 1e-9, "telematics m/s: {t}");
        assert!(t["position"]["Timestamp"].is_u64(), "unix seconds: {t}");

        let r = self.tracking.expect("location_update");
        let p = &r["payload"];
        assert_eq!(p["driver_id"], vehicle, "tracking, from {surface}: {r}");
        assert_eq!(p["lat"].as_f64(), Some(lat), "{r}");
        assert_eq!(p["speed"].as_f64(), Some(KMH), "tracking km/h: {r}");
    }

    fn nothing_more(&mut self, who: &str) {
        self.native.expect_nothing_more(&format!("{who} native"));
        self.valtronics.expect_silence(Duration::from_millis(100));
        self.telematics.expect_silence(Duration::from_millis(100));
        self.tracking.expect_silence(Duration::from_millis(100));
    }
}

fn native_position(vehicle: &str, lat: f64) -> Value {
    json!({"type":"location_update","payload":{"vehicle_id":vehicle,
        "location":{"latitude":lat,"longitude":-74.0,"speed":KMH,"heading":90}}})
}

fn http_publish(b: &Broker, key: &str, body: &Value) {
    let body = body.to_string();
    let (status, reply) = b.http(&format!(
        "POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    assert_eq!(status, 202, "{reply}");
}

/// Publishes one position for `vehicle` of `tenant` through `surface`.
fn publish(b: &Broker, tenant: &str, surface: &str, vehicle: &str, lat: f64) {
    let device = key(tenant, Role::Device);
    match surface {
        "native" => {
            let mut c = b.connect_key(&device);
            let mut m = native_position(vehicle, lat);
            m["id"] = json!(format!("n-{vehicle}"));
            m["ack"] = json!(true);
            c.send(m);
            c.expect("ack");
        }
        "http" => http_publish(
            b,
            &key(tenant, Role::Service),
            &native_position(vehicle, lat),
        ),
        "valtronics" => {
            let mut c = Client::connect(&b.url("/ws"));
            c.send(json!({"type":"auth","token":device}));
            assert_eq!(c.expect("auth_response")["success"], true);
            c.send(json!({"type":"telemetry_update","id":"v1","ack":true,
                "device_id":vehicle.parse::<u64>().unwrap(),
                "telemetry":{"latitude":lat,"longitude":-74.0,"speed":KMH,"heading":90}}));
            c.expect("ack");
        }
        "tracking" => {
            let mut c = Client::connect(&b.url("/v1/track"));
            c.send(json!({"action":"authenticate","payload":{
                "user_id":vehicle,"role":"driver","token":device}}));
            c.expect("authenticated");
            c.send(json!({"action":"location_update","payload":{
                "lat":lat,"lng":-74.0,"speed":KMH,"bearing":90}}));
            // A Tracking driver gets no acknowledgement: wait for the position to land.
            std::thread::sleep(Duration::from_millis(100));
        }
        other => panic!("unknown surface {other}"),
    }
}

#[test]
fn a_position_from_every_surface_reaches_every_dialect_in_its_units() {
    let b = Broker::with_shards(2);
    let mut a = Subscribers::join(&b, "fleet_a");
    let mut other = Subscribers::join(&b, "fleet_b");
    for (i, surface) in ["native", "http", "valtronics", "tracking"]
        .iter()
        .enumerate()
    {
        let vehicle = format!("{}", 11 + i);
        let lat = 40.5 + i as f64 / 10.0;
        publish(&b, "fleet_a", surface, &vehicle, lat);
        a.receive(&vehicle, lat, surface);
        a.nothing_more(surface);
    }
    // Tenant isolation both ways: fleet_b saw none of it, and its drivers stay its own.
    other.nothing_more("fleet_b");
    publish(&b, "fleet_b", "tracking", "21", 10.0);
    other.receive("21", 10.0, "fleet_b tracking");
    publish(&b, "fleet_b", "valtronics", "22", 11.0);
    other.receive("22", 11.0, "fleet_b valtronics");
    a.nothing_more("fleet_a after fleet_b published");
}
