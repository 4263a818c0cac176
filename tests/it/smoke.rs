use crate::support::*;
use fleetcast::model::Role;
use serde_json::json;

#[test]
fn device_location_reaches_dashboard() {
    let b = Broker::with_shards(2);
    let mut dash = b.connect_auth(&key("fleet_a", Role::Viewer));
    dash.subscribe("vehicle_locations", json!({}));
    let mut dev = b.connect_key(&key("fleet_a", Role::Device));
    dev.send(location("v1", 40.7128));
    let m = dash.expect("location_update");
    assert_eq!(m["channel"], "vehicle_locations");
    assert_eq!(m["payload"]["vehicle_id"], "v1");
    assert_eq!(m["payload"]["location"]["latitude"], 40.7128);
    assert!(m["id"].is_string() && m["timestamp"].is_string());
}
