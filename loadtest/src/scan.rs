//! The receive path: find the few fields the generator needs in a server message
//! without parsing the JSON (memchr's SIMD substring search plus digit loops).
//!
//! It relies only on what any native-dialect broker must do: forward the publisher's
//! payload byte for byte, so `"t_us":<digits>,"n":<digits>` (written by the generator
//! in that order) arrive as sent.

use memchr::memmem::Finder;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Location,
    Alert,
    Trip,
    Subscribed,
    Error,
    Ack,
    Other,
}

pub struct Scanner {
    typ: Finder<'static>,
    t_us: Finder<'static>,
    n: Finder<'static>,
    vehicle: Finder<'static>,
    severity: Finder<'static>,
    code: Finder<'static>,
    duplicate: Finder<'static>,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            typ: Finder::new(b"\"type\":\""),
            t_us: Finder::new(b"\"t_us\":"),
            n: Finder::new(b"\"n\":"),
            vehicle: Finder::new(b"\"vehicle_id\":\""),
            severity: Finder::new(b"\"severity\":\""),
            code: Finder::new(b"\"code\":"),
            duplicate: Finder::new(b"\"status\":\"duplicate\""),
        }
    }
}

/// The unsigned integer at `pos` and the position after it.
pub fn parse_u64(b: &[u8], mut pos: usize) -> Option<(u64, usize)> {
    let start = pos;
    let mut v: u64 = 0;
    while pos < b.len() && b[pos].is_ascii_digit() {
        v = v.checked_mul(10)?.checked_add((b[pos] - b'0') as u64)?;
        pos += 1;
    }
    (pos > start).then_some((v, pos))
}

impl Scanner {
    /// The message's `type`. Fast when it comes first (`{"type":"...`), as brokers of
    /// this dialect write it.
    pub fn kind(&self, msg: &[u8]) -> Kind {
        let at = if msg.starts_with(b"{\"type\":\"") {
            9
        } else {
            match self.typ.find(msg) {
                Some(i) => i + 8,
                None => return Kind::Other,
            }
        };
        let rest = &msg[at..];
        let is = |t: &[u8]| rest.len() > t.len() && rest.starts_with(t) && rest[t.len()] == b'"';
        if is(b"location_update") {
            Kind::Location
        } else if is(b"safety_alert") {
            Kind::Alert
        } else if is(b"trip_event") {
            Kind::Trip
        } else if is(b"subscribed") {
            Kind::Subscribed
        } else if is(b"error") {
            Kind::Error
        } else if is(b"ack") {
            Kind::Ack
        } else {
            Kind::Other
        }
    }

    /// `t_us` and the position after its digits.
    pub fn t_us(&self, msg: &[u8]) -> Option<(u64, usize)> {
        let i = self.t_us.find(msg)?;
        parse_u64(msg, i + 7)
    }

    /// `n`, looked for first right after `t_us` (where the generator writes it).
    pub fn n_after(&self, msg: &[u8], pos: usize) -> Option<u64> {
        if msg.get(pos..pos + 5) == Some(b",\"n\":") {
            return parse_u64(msg, pos + 5).map(|x| x.0);
        }
        let i = self.n.find(msg)?;
        parse_u64(msg, i + 4).map(|x| x.0)
    }

    /// The index of a generator vehicle id (`"vehicle_id":"v<index>"`).
    pub fn vehicle_index(&self, msg: &[u8]) -> Option<u32> {
        let i = self.vehicle.find(msg)? + 14;
        if msg.get(i) != Some(&b'v') {
            return None;
        }
        let (v, end) = parse_u64(msg, i + 1)?;
        (msg.get(end) == Some(&b'"') && v <= u32::MAX as u64).then_some(v as u32)
    }

    /// The alert's severity as an index into `schedule::SEVERITIES`.
    pub fn severity(&self, msg: &[u8]) -> Option<usize> {
        let i = self.severity.find(msg)? + 12;
        let rest = &msg[i..];
        crate::schedule::SEVERITIES
            .iter()
            .position(|s| rest.starts_with(s.as_bytes()) && rest.get(s.len()) == Some(&b'"'))
    }

    /// An `ack` saying the publish was a duplicate (not delivered).
    pub fn is_duplicate_ack(&self, msg: &[u8]) -> bool {
        self.duplicate.find(msg).is_some()
    }

    /// An error message's `payload.code`.
    pub fn error_code(&self, msg: &[u8]) -> Option<u16> {
        let i = self.code.find(msg)?;
        parse_u64(msg, i + 7).and_then(|(c, _)| u16::try_from(c).ok())
    }
}

/// What a rejected publish was, from the `id` the generator gave it
/// (`<kind><index>.<n>.<run tag>`; the tag is ignored here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubId {
    /// `L<vehicle>.<n>`
    Location { vehicle: u32, n: u64 },
    /// `A<service>.<n>`
    Alert { service: u32, n: u64 },
    /// `T<service>.<n>`
    Trip { service: u32, n: u64 },
}

/// The `id` of an error message (rare: parsed as JSON).
/// The first `"seq":N` and `"epoch":E` of a message (an event's envelope, or a
/// `subscribed` reply's position): `(seq, epoch)`. Rare messages only (alerts,
/// replies): two substring searches.
pub fn seq_epoch(msg: &[u8]) -> Option<(u64, u64)> {
    let num = |key: &[u8]| {
        let at = memchr::memmem::find(msg, key)? + key.len();
        parse_u64(msg, at).map(|(v, _)| v)
    };
    Some((num(b"\"seq\":")?, num(b"\"epoch\":")?))
}

pub fn error_id(msg: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(msg).ok()?;
    v.get("id")?.as_str().map(str::to_string)
}

pub fn parse_pub_id(id: &str) -> Option<PubId> {
    let (tag, rest) = id.split_at_checked(1)?;
    let mut parts = rest.split('.');
    let (a, n) = (parts.next()?, parts.next()?);
    let a: u32 = a.parse().ok()?;
    let n: u64 = n.parse().ok()?;
    match tag {
        "L" => Some(PubId::Location { vehicle: a, n }),
        "A" => Some(PubId::Alert { service: a, n }),
        "T" => Some(PubId::Trip { service: a, n }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn seq_and_epoch() {
        let ev = br#"{"type":"safety_alert","id":"A0.1","timestamp":"t","channel":"alerts","seq":41,"epoch":1795450000000,"payload":{"t_us":5}}"#;
        assert_eq!(super::seq_epoch(ev), Some((41, 1795450000000)));
        let sub = br#"{"type":"subscribed","id":"sa","timestamp":"t","payload":{"channel":"alerts","filters":{},"epoch":7,"seq":0}}"#;
        assert_eq!(super::seq_epoch(sub), Some((0, 7)));
        assert_eq!(super::seq_epoch(br#"{"type":"subscribed"}"#), None);
    }

    use super::*;

    const LOC: &[u8] = br#"{"type":"location_update","id":"L12.5","timestamp":"2026-11-23T17:00:00.000Z","channel":"vehicle_locations","payload":{"vehicle_id":"v12","t_us":1795453200123456,"n":5,"location":{"latitude":40.7,"longitude":-74.0,"speed":30.0,"heading":90.0}}}"#;

    #[test]
    fn location_fields() {
        let s = Scanner::default();
        assert_eq!(s.kind(LOC), Kind::Location);
        let (t, end) = s.t_us(LOC).unwrap();
        assert_eq!(t, 1_795_453_200_123_456);
        assert_eq!(s.n_after(LOC, end), Some(5));
        assert_eq!(s.vehicle_index(LOC), Some(12));
    }

    #[test]
    fn fields_in_another_order_and_place() {
        let s = Scanner::default();
        let m = br#"{"channel":"vehicle_locations","payload":{"n":7,"location":{},"t_us":99,"vehicle_id":"v3"},"type":"location_update"}"#;
        assert_eq!(s.kind(m), Kind::Location);
        let (t, end) = s.t_us(m).unwrap();
        assert_eq!(t, 99);
        assert_eq!(s.n_after(m, end), Some(7));
        assert_eq!(s.vehicle_index(m), Some(3));
        let foreign = br#"{"type":"location_update","payload":{"vehicle_id":"truck-9"}}"#;
        assert_eq!(s.vehicle_index(foreign), None);
        assert_eq!(s.t_us(foreign), None);
    }

    #[test]
    fn kinds() {
        let s = Scanner::default();
        for (m, k) in [
            (&br#"{"type":"safety_alert","payload":{}}"#[..], Kind::Alert),
            (br#"{"type":"trip_event","payload":{}}"#, Kind::Trip),
            (br#"{"type":"subscribed","id":"sl"}"#, Kind::Subscribed),
            (br#"{"type":"error","payload":{"code":429}}"#, Kind::Error),
            (br#"{"type":"errors"}"#, Kind::Other),
            (br#"{"type":"pong"}"#, Kind::Other),
            (br#"{"type":"ack","id":"L1.2.3"}"#, Kind::Ack),
            (br#"{"id":1,"type":"trip_event"}"#, Kind::Trip),
            (br#"{"type":"location_update"#, Kind::Other),
            (b"[]", Kind::Other),
        ] {
            assert_eq!(s.kind(m), k, "{}", String::from_utf8_lossy(m));
        }
    }

    #[test]
    fn severities_and_error_codes() {
        let s = Scanner::default();
        let a = br#"{"type":"safety_alert","payload":{"alert_id":"a1.2","severity":"critical","category":"speeding"}}"#;
        assert_eq!(s.severity(a), Some(3));
        assert_eq!(s.severity(br#"{"severity":"crit"}"#), None);
        let e = br#"{"type":"error","id":"L4.17.99","timestamp":"x","payload":{"code":429,"message":"slow down"}}"#;
        assert_eq!(s.error_code(e), Some(429));
        assert_eq!(error_id(e).as_deref(), Some("L4.17.99"));
        let dup = br#"{"type":"ack","id":"A0.3.99","timestamp":"x","payload":{"status":"duplicate","channel":"alerts"}}"#;
        assert!(s.is_duplicate_ack(dup));
        assert!(!s.is_duplicate_ack(br#"{"type":"ack","payload":{"status":"accepted"}}"#));
        assert_eq!(
            parse_pub_id("L4.17.99"),
            Some(PubId::Location { vehicle: 4, n: 17 })
        );
        assert_eq!(
            parse_pub_id("A0.3"),
            Some(PubId::Alert { service: 0, n: 3 })
        );
        assert_eq!(parse_pub_id("T2.1"), Some(PubId::Trip { service: 2, n: 1 }));
        assert_eq!(parse_pub_id("sl"), None);
        assert_eq!(parse_pub_id("X1.2"), None);
        assert_eq!(parse_pub_id(""), None);
    }

    #[test]
    fn digits() {
        assert_eq!(parse_u64(b"123,", 0), Some((123, 3)));
        assert_eq!(parse_u64(b"x", 0), None);
        assert_eq!(parse_u64(b"99999999999999999999999", 0), None);
    }
}
