//! Capacity mode: run the scenario again and again with one knob stepped up until the
//! service-level objective breaks; report the last step that held.

use crate::report::{self, Report, Verdict, group, ms3};
use crate::scenario::{Overrides, SloConfig};
use crate::svg::{self, COLORS, Chart, Series};
use serde::{Deserialize, Serialize};
use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Ramp {
    /// Total dashboards.
    Dashboards,
    /// Total vehicles.
    Vehicles,
    /// Rate multiplier on every publisher.
    Rate,
}

impl Ramp {
    pub fn name(self) -> &'static str {
        match self {
            Ramp::Dashboards => "dashboards",
            Ramp::Vehicles => "vehicles",
            Ramp::Rate => "rate",
        }
    }

    /// The overrides of a step: `base` with this knob set to `value`.
    pub fn apply(self, base: &Overrides, value: f64) -> Overrides {
        let mut o = base.clone();
        match self {
            Ramp::Dashboards => o.dashboards = Some(value.round() as u32),
            Ramp::Vehicles => o.vehicles = Some(value.round() as u32),
            Ramp::Rate => o.rate_multiplier = Some(value),
        }
        o
    }
}

/// At most this many steps per capacity run.
pub const MAX_STEPS: usize = 100;

/// start, start + step, ... up to max (inclusive, within rounding).
pub fn steps(start: f64, step: f64, max: f64) -> anyhow::Result<Vec<f64>> {
    anyhow::ensure!(
        start > 0.0 && step > 0.0 && max >= start,
        "need start > 0, step > 0 and max >= start"
    );
    let n = ((max - start) / step + 1e-9).floor() as usize + 1;
    anyhow::ensure!(
        n <= MAX_STEPS,
        "{n} steps: at most {MAX_STEPS} (raise --step or lower --max)"
    );
    Ok((0..n)
        .map(|i| ((start + step * i as f64) * 1e6).round() / 1e6)
        .collect())
}

/// Whether a run held the objective, and why not.
pub fn evaluate(r: &Report, slo: &SloConfig) -> Verdict {
    let mut reasons = Vec::new();
    let latency = r.headline_latency();
    if latency.count == 0 {
        reasons.push("nothing was delivered".to_string());
    } else if latency.p99 > slo.p99_ms {
        reasons.push(format!("p99 {} ms > {} ms", ms3(latency.p99), slo.p99_ms));
    }
    if r.delivery.loss_ratio > slo.loss {
        reasons.push(format!(
            "loss {} of {} ({:.4}%) > {}%",
            r.delivery.lost,
            r.delivery.expected,
            r.delivery.loss_ratio * 100.0,
            slo.loss * 100.0
        ));
    }
    if r.error_total > slo.max_errors {
        let top: Vec<String> = r
            .errors
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .take(4)
            .collect();
        reasons.push(format!(
            "{} errors > {} ({})",
            r.error_total,
            slo.max_errors,
            top.join(", ")
        ));
    }
    Verdict {
        held: reasons.is_empty(),
        slo_p99_ms: slo.p99_ms,
        slo_loss: slo.loss,
        slo_max_errors: slo.max_errors,
        reasons,
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub value: f64,
    pub held: bool,
    pub reasons: Vec<String>,
    pub dashboards: usize,
    pub vehicles: u64,
    pub offered_deliveries_per_s: f64,
    pub delivered_per_s: f64,
    pub loss_ratio: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub errors: u64,
    pub generator_cpu_pct: f64,
    pub broker_cpu_pct: Option<f64>,
    pub broker_rss_mib: Option<f64>,
    /// Directory of this step's full report.
    pub report_dir: String,
    pub warnings: Vec<String>,
}

impl Step {
    pub fn from_report(value: f64, r: &Report, dir: &str) -> Step {
        let v = r.verdict.clone().unwrap_or_default();
        Step {
            value,
            held: v.held,
            reasons: v.reasons,
            dashboards: r.setup.dashboards,
            vehicles: r.setup.vehicles,
            offered_deliveries_per_s: r.setup.offered_deliveries_per_s,
            delivered_per_s: r.delivery.per_second,
            loss_ratio: r.delivery.loss_ratio,
            p50_ms: r.headline_latency().p50,
            p99_ms: r.headline_latency().p99,
            p999_ms: r.headline_latency().p999,
            max_ms: r.headline_latency().max,
            errors: r.error_total,
            generator_cpu_pct: r.generator.cpu_avg_pct,
            broker_cpu_pct: r.broker.as_ref().map(|b| b.cpu_avg_pct),
            broker_rss_mib: r.broker.as_ref().map(|b| b.rss_mib_peak),
            report_dir: dir.into(),
            warnings: r.warnings.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CapacityReport {
    pub tool: String,
    pub scenario: String,
    pub started_at: String,
    pub url: String,
    pub ramp: String,
    pub slo: SloConfig,
    pub steps: Vec<Step>,
    /// The highest step value that held (None: not even the first).
    pub last_held: Option<f64>,
    /// The step that broke (None: every step up to --max held).
    pub first_broken: Option<f64>,
    pub conclusion: String,
}

impl CapacityReport {
    /// Fills `last_held`, `first_broken` and the conclusion from the steps.
    pub fn conclude(&mut self) {
        self.last_held = self
            .steps
            .iter()
            .take_while(|s| s.held)
            .last()
            .map(|s| s.value);
        let broken = self.steps.iter().find(|s| !s.held);
        self.first_broken = broken.map(|s| s.value);
        let ramp = &self.ramp;
        self.conclusion = match (self.last_held, broken) {
            (Some(v), Some(b)) => {
                let held = self.steps.iter().find(|s| s.value == v).expect("held step");
                format!(
                    "last step that held: {ramp} = {} ({:.0} deliveries/s, p99 {} ms); \
                     {ramp} = {} broke: {}",
                    fmt_value(v),
                    held.delivered_per_s,
                    ms3(held.p99_ms),
                    fmt_value(b.value),
                    b.reasons.join("; ")
                )
            }
            (None, Some(b)) => format!(
                "the first step ({ramp} = {}) already broke: {}",
                fmt_value(b.value),
                b.reasons.join("; ")
            ),
            (Some(v), None) => format!(
                "every step held, up to {ramp} = {} (raise --max to find the limit)",
                fmt_value(v)
            ),
            (None, None) => "no step ran".into(),
        };
    }
}

pub fn fmt_value(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

pub fn summary(c: &CapacityReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "capacity: {} ramping {} (SLO p99 <= {} ms, loss <= {}, errors <= {})",
        c.scenario, c.ramp, c.slo.p99_ms, c.slo.loss, c.slo.max_errors
    );
    let _ = writeln!(
        o,
        "  {:>9} {:>7} {:>12} {:>12} {:>9} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6}  result",
        c.ramp,
        "dashb.",
        "offered/s",
        "delivered/s",
        "loss %",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errs",
        "gen%",
        "brk%"
    );
    for s in &c.steps {
        let _ = writeln!(
            o,
            "  {:>9} {:>7} {:>12.0} {:>12.0} {:>9.4} {:>8} {:>8} {:>8} {:>6} {:>6.0} {:>6}  {}",
            fmt_value(s.value),
            s.dashboards,
            s.offered_deliveries_per_s,
            s.delivered_per_s,
            s.loss_ratio * 100.0,
            ms3(s.p50_ms),
            ms3(s.p99_ms),
            ms3(s.max_ms),
            s.errors,
            s.generator_cpu_pct,
            s.broker_cpu_pct
                .map(|b| format!("{b:.0}"))
                .unwrap_or_else(|| "-".into()),
            if s.held {
                "held".to_string()
            } else {
                format!("BROKE: {}", s.reasons.join("; "))
            }
        );
    }
    let _ = writeln!(o, "  {}", c.conclusion);
    o
}

pub fn html(c: &CapacityReport) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<h1>fleetcast-load capacity: {} · ramp {}</h1><p><small>{} · {}</small></p><p class={}>{}</p>",
        svg::escape(&c.scenario),
        svg::escape(&c.ramp),
        svg::escape(&c.started_at),
        svg::escape(&c.url),
        if c.first_broken.is_some() && c.last_held.is_none() {
            "bad"
        } else {
            "ok"
        },
        svg::escape(&c.conclusion)
    );
    let _ = write!(
        o,
        "<p>SLO: p99 &le; {} ms, loss &le; {}, errors &le; {}</p>",
        c.slo.p99_ms, c.slo.loss, c.slo.max_errors
    );
    let xs = |f: &dyn Fn(&Step) -> f64| -> Vec<(f64, f64)> {
        c.steps.iter().map(|s| (s.value, f(s))).collect()
    };
    let charts = [
        Chart {
            title: "Latency by step".into(),
            x_label: c.ramp.clone(),
            y_label: "latency (ms)".into(),
            series: vec![
                Series::new("p50", COLORS[0], xs(&|s| s.p50_ms)),
                Series::new("p99", COLORS[1], xs(&|s| s.p99_ms)),
                Series::new("p99.9", COLORS[4], xs(&|s| s.p999_ms)),
                Series::new("SLO p99", "#999", xs(&|_| c.slo.p99_ms)).dashed(),
            ],
            log_y: true,
            ..Default::default()
        },
        Chart {
            title: "Deliveries per second by step".into(),
            x_label: c.ramp.clone(),
            y_label: "deliveries/s".into(),
            series: vec![
                Series::new("delivered", COLORS[2], xs(&|s| s.delivered_per_s)),
                Series::new("offered", "#999", xs(&|s| s.offered_deliveries_per_s)).dashed(),
            ],
            ..Default::default()
        },
        Chart {
            title: "CPU by step (100% = one core)".into(),
            x_label: c.ramp.clone(),
            y_label: "CPU %".into(),
            series: vec![
                Series::new("generator", COLORS[3], xs(&|s| s.generator_cpu_pct)),
                Series::new(
                    "broker",
                    COLORS[1],
                    xs(&|s| s.broker_cpu_pct.unwrap_or(0.0)),
                ),
            ],
            ..Default::default()
        },
    ];
    for ch in &charts {
        let _ = write!(o, "<figure>{}</figure>", svg::render(ch));
    }
    o.push_str("<h2>Steps</h2><table><tr><th class=l>");
    o.push_str(&svg::escape(&c.ramp));
    o.push_str("</th><th>dashboards</th><th>offered/s</th><th>delivered/s</th><th>loss</th><th>p50 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>max ms</th><th>errors</th><th>gen CPU</th><th>broker CPU</th><th class=l>result</th><th class=l>report</th></tr>");
    for s in &c.steps {
        let _ = write!(
            o,
            "<tr><td class=l>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.4}%</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}%</td><td>{}</td><td class=l>{}</td><td class=l><a href=\"{}/report.html\">{}</a></td></tr>",
            fmt_value(s.value),
            s.dashboards,
            group(s.offered_deliveries_per_s as u64),
            group(s.delivered_per_s as u64),
            s.loss_ratio * 100.0,
            ms3(s.p50_ms),
            ms3(s.p99_ms),
            ms3(s.p999_ms),
            ms3(s.max_ms),
            s.errors,
            s.generator_cpu_pct,
            s.broker_cpu_pct
                .map(|b| format!("{b:.0}%"))
                .unwrap_or_else(|| "-".into()),
            if s.held {
                "<span class=ok>held</span>".to_string()
            } else {
                format!(
                    "<span class=bad>broke</span>: {}",
                    svg::escape(&s.reasons.join("; "))
                )
            },
            svg::escape(&s.report_dir),
            svg::escape(&s.report_dir)
        );
    }
    o.push_str("</table>");
    report::page(&format!("fleetcast-load capacity {}", c.scenario), &o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{build, tests::sample_data};

    #[test]
    fn step_lists() {
        assert_eq!(
            steps(100.0, 100.0, 300.0).unwrap(),
            vec![100.0, 200.0, 300.0]
        );
        assert_eq!(steps(1.0, 0.5, 2.2).unwrap(), vec![1.0, 1.5, 2.0]);
        assert_eq!(steps(0.1, 0.1, 0.3).unwrap(), vec![0.1, 0.2, 0.3]);
        assert_eq!(steps(5.0, 1.0, 5.0).unwrap(), vec![5.0]);
        assert!(steps(1.0, 0.0, 5.0).is_err());
        assert!(steps(5.0, 1.0, 4.0).is_err());
        assert!(steps(1.0, 1.0, 1000.0).is_err(), "too many steps");
    }

    #[test]
    fn ramps_set_one_knob() {
        let base = Overrides {
            duration_s: Some(5.0),
            ..Default::default()
        };
        let o = Ramp::Dashboards.apply(&base, 2000.0);
        assert_eq!(o.dashboards, Some(2000));
        assert_eq!(o.duration_s, Some(5.0));
        assert_eq!(Ramp::Rate.apply(&base, 1.5).rate_multiplier, Some(1.5));
        assert_eq!(Ramp::Vehicles.apply(&base, 10.0).vehicles, Some(10));
    }

    #[test]
    fn slo_evaluation() {
        let r = build(sample_data());
        // p99 9.9 ms, loss 5 of 101, one error.
        let v = evaluate(
            &r,
            &SloConfig {
                p99_ms: 10.0,
                loss: 0.05,
                max_errors: 1,
            },
        );
        assert!(v.held, "{:?}", v.reasons);
        let v = evaluate(&r, &SloConfig::default());
        assert!(!v.held);
        assert_eq!(v.reasons.len(), 2, "{:?}", v.reasons);
        assert!(v.reasons[0].starts_with("loss 5 of 101"));
        assert!(v.reasons[1].contains("error 429: 1"));
        let v = evaluate(
            &r,
            &SloConfig {
                p99_ms: 5.0,
                loss: 1.0,
                max_errors: 10,
            },
        );
        assert_eq!(v.reasons, vec!["p99 9.90 ms > 5 ms".to_string()]);
        // With kernel receive times, the objective is judged on them (the generator's
        // read may lag behind).
        let mut at_socket = r.clone();
        at_socket.socket_latency_ms.p99 = 3.0;
        at_socket.socket_latency_ms.count = at_socket.latency_ms.count;
        let v = evaluate(
            &at_socket,
            &SloConfig {
                p99_ms: 5.0,
                loss: 1.0,
                max_errors: 10,
            },
        );
        assert!(v.held, "{:?}", v.reasons);
        let mut empty = r.clone();
        empty.latency_ms = Default::default();
        empty.socket_latency_ms = Default::default();
        let v = evaluate(
            &empty,
            &SloConfig {
                p99_ms: 5.0,
                loss: 1.0,
                max_errors: 10,
            },
        );
        assert_eq!(v.reasons, vec!["nothing was delivered".to_string()]);
    }

    fn step(value: f64, held: bool) -> Step {
        Step {
            value,
            held,
            reasons: if held {
                vec![]
            } else {
                vec!["p99 30 ms > 10 ms".into()]
            },
            delivered_per_s: value * 1000.0,
            p99_ms: if held { 2.0 } else { 30.0 },
            ..Default::default()
        }
    }

    #[test]
    fn conclusions() {
        let mut c = CapacityReport {
            ramp: "dashboards".into(),
            steps: vec![step(1000.0, true), step(1500.0, true), step(2000.0, false)],
            ..Default::default()
        };
        c.conclude();
        assert_eq!(c.last_held, Some(1500.0));
        assert_eq!(c.first_broken, Some(2000.0));
        assert!(
            c.conclusion
                .starts_with("last step that held: dashboards = 1500")
        );
        assert!(summary(&c).contains("BROKE: p99 30 ms > 10 ms"));
        let h = html(&c);
        assert!(h.contains("<svg") && h.contains("step") || h.contains("Steps"));
        c.steps = vec![step(1000.0, false)];
        c.conclude();
        assert_eq!(c.last_held, None);
        assert!(c.conclusion.contains("already broke"));
        c.steps = vec![step(1.0, true), step(2.0, true)];
        c.conclude();
        assert_eq!((c.last_held, c.first_broken), (Some(2.0), None));
        assert!(c.conclusion.contains("raise --max"));
    }
}
