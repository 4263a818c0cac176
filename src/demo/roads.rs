//! The demo's city: a small road graph on a local plane (metres east and north of a
//! centre), embedded in the binary. Streets form an irregular grid with a faster ring
//! road and a diagonal avenue; routes are shortest paths by travel time.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// The city centre the plane is projected around (Berlin, as in the seeds' examples).
pub const CENTRE_LAT: f64 = 52.5200;
pub const CENTRE_LON: f64 = 13.4050;
const METRES_PER_DEGREE_LAT: f64 = 111_320.0;

const COLS: usize = 8;
const ROWS: usize = 7;
const SPACING_M: f64 = 520.0;

/// A point on the plane, metres east (`x`) and north (`y`) of the centre.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub x: f64,
    pub y: f64,
}

impl Point {
    pub fn distance(self, o: Point) -> f64 {
        (self.x - o.x).hypot(self.y - o.y)
    }

    /// Compass bearing from `self` to `o`: 0 north, 90 east, in [0, 360).
    pub fn bearing(self, o: Point) -> f64 {
        let deg = (o.x - self.x).atan2(o.y - self.y).to_degrees();
        (deg + 360.0) % 360.0
    }

    /// Latitude and longitude (equirectangular around the centre; exact enough for a
    /// few kilometres).
    pub fn lat_lon(self) -> (f64, f64) {
        let lat = CENTRE_LAT + self.y / METRES_PER_DEGREE_LAT;
        let lon = CENTRE_LON + self.x / (METRES_PER_DEGREE_LAT * CENTRE_LAT.to_radians().cos());
        (lat, lon)
    }
}

/// A one-way view of a street between two intersections.
#[derive(Debug, Clone, Copy)]
pub struct Edge {
    pub to: usize,
    pub length_m: f64,
    /// The speed limit in km/h.
    pub limit_kmh: f64,
}

#[derive(Debug)]
pub struct Roads {
    pub nodes: Vec<Point>,
    /// Outgoing edges per node (every street is two-way).
    pub adj: Vec<Vec<Edge>>,
}

/// Streets left out, so that the grid is not a perfect lattice (pairs of node indexes).
const MISSING: [(usize, usize); 5] = [(10, 11), (19, 27), (29, 30), (36, 37), (44, 45)];

fn index(col: usize, row: usize) -> usize {
    row * COLS + col
}

impl Roads {
    /// The embedded city (the same every run).
    pub fn city() -> Roads {
        let mut nodes = Vec::with_capacity(COLS * ROWS);
        for row in 0..ROWS {
            for col in 0..COLS {
                // A fixed, irregular offset per intersection (no randomness: the map is
                // part of the binary).
                let jx = ((col * 7 + row * 13) % 5) as f64 * 28.0 - 56.0;
                let jy = ((col * 11 + row * 5) % 7) as f64 * 20.0 - 60.0;
                nodes.push(Point {
                    x: (col as f64 - (COLS - 1) as f64 / 2.0) * SPACING_M + jx,
                    y: (row as f64 - (ROWS - 1) as f64 / 2.0) * SPACING_M + jy,
                });
            }
        }
        let mut roads = Roads {
            adj: vec![Vec::new(); nodes.len()],
            nodes,
        };
        let ring = |c: usize, r: usize| c == 0 || r == 0 || c == COLS - 1 || r == ROWS - 1;
        for row in 0..ROWS {
            for col in 0..COLS {
                let a = index(col, row);
                if col + 1 < COLS {
                    let limit = if ring(col, row) && (row == 0 || row == ROWS - 1) {
                        70.0
                    } else if row == ROWS / 2 {
                        60.0
                    } else if (col + row) % 4 == 1 {
                        30.0
                    } else {
                        50.0
                    };
                    roads.street(a, index(col + 1, row), limit);
                }
                if row + 1 < ROWS {
                    let limit = if col == 0 || col == COLS - 1 {
                        70.0
                    } else if col == COLS / 2 {
                        60.0
                    } else if (col * 3 + row) % 5 == 2 {
                        30.0
                    } else {
                        50.0
                    };
                    roads.street(a, index(col, row + 1), limit);
                }
            }
        }
        // A diagonal avenue from the south-west to the north-east.
        for k in 0..(ROWS - 1).min(COLS - 1) {
            roads.street(index(k + 1, k), index(k + 2, k + 1), 60.0);
        }
        roads
    }

    fn street(&mut self, a: usize, b: usize, limit_kmh: f64) {
        if MISSING.contains(&(a.min(b), a.max(b))) {
            return;
        }
        let length_m = self.nodes[a].distance(self.nodes[b]);
        self.adj[a].push(Edge {
            to: b,
            length_m,
            limit_kmh,
        });
        self.adj[b].push(Edge {
            to: a,
            length_m,
            limit_kmh,
        });
    }

    pub fn edge(&self, from: usize, to: usize) -> Option<&Edge> {
        self.adj[from].iter().find(|e| e.to == to)
    }

    /// The fastest path from `from` to `to` (at the speed limits): the nodes after
    /// `from`, ending with `to`; empty when `to` is `from` or unreachable.
    pub fn route(&self, from: usize, to: usize) -> Vec<usize> {
        #[derive(PartialEq)]
        struct Item(f64, usize);
        impl Eq for Item {}
        impl Ord for Item {
            fn cmp(&self, o: &Self) -> Ordering {
                o.0.total_cmp(&self.0).then(o.1.cmp(&self.1))
            }
        }
        impl PartialOrd for Item {
            fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
                Some(self.cmp(o))
            }
        }
        let n = self.nodes.len();
        let mut best = vec![f64::INFINITY; n];
        let mut prev = vec![usize::MAX; n];
        let mut heap = BinaryHeap::new();
        best[from] = 0.0;
        heap.push(Item(0.0, from));
        while let Some(Item(cost, at)) = heap.pop() {
            if at == to {
                break;
            }
            if cost > best[at] {
                continue;
            }
            for e in &self.adj[at] {
                let c = cost + e.length_m / (e.limit_kmh / 3.6);
                if c < best[e.to] {
                    best[e.to] = c;
                    prev[e.to] = at;
                    heap.push(Item(c, e.to));
                }
            }
        }
        let mut path = Vec::new();
        let mut at = to;
        while at != from {
            if prev[at] == usize::MAX {
                return Vec::new();
            }
            path.push(at);
            at = prev[at];
        }
        path.reverse();
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_intersection_reaches_every_other() {
        let r = Roads::city();
        for to in 1..r.nodes.len() {
            let path = r.route(0, to);
            assert_eq!(path.last(), Some(&to), "no route from 0 to {to}");
            let mut at = 0;
            for &n in &path {
                assert!(r.edge(at, n).is_some(), "{at} -> {n} is not a street");
                at = n;
            }
        }
    }

    #[test]
    fn projection_is_metric_around_the_centre() {
        let (lat, lon) = Point { x: 0.0, y: 0.0 }.lat_lon();
        assert_eq!((lat, lon), (CENTRE_LAT, CENTRE_LON));
        let (lat, _) = Point { x: 0.0, y: 1113.2 }.lat_lon();
        assert!((lat - CENTRE_LAT - 0.01).abs() < 1e-9);
        assert_eq!(
            Point { x: 0.0, y: 0.0 }.bearing(Point { x: 1.0, y: 0.0 }),
            90.0
        );
        assert_eq!(
            Point { x: 0.0, y: 0.0 }.bearing(Point { x: 0.0, y: -1.0 }),
            180.0
        );
    }
}
