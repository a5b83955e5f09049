//! `--report DIR`: each run leaves `DIR/<run>/` with its summary (`run.json`, timeline included)
//! and two SVG charts — throughput and latency percentiles per second — and `DIR/index.html` is
//! rebuilt to show every run in `DIR` side by side: a table of the figures, then the charts.
//! Runs of different brokers written into one directory (as `perf/compare` does) compare there.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde_json::Value;

use crate::report::Sample;

const WIDTH: u32 = 900;
const HEIGHT: u32 = 420;

/// Writes one run's directory under `dir` and rebuilds `dir/index.html`; returns the run's
/// directory. `name` picks the directory; a name already taken gets a `-2`, `-3`… suffix.
pub fn write_run(dir: &Path, name: &str, summary: &Value) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let base = sanitize(name);
    let mut run = dir.join(&base);
    let mut n = 1;
    while run.exists() {
        n += 1;
        run = dir.join(format!("{base}-{n}"));
    }
    std::fs::create_dir_all(&run).with_context(|| format!("cannot create {}", run.display()))?;
    let timeline: Vec<Sample> =
        serde_json::from_value(summary.get("timeline").cloned().unwrap_or(Value::Null))
            .unwrap_or_default();
    std::fs::write(
        run.join("run.json"),
        serde_json::to_string_pretty(summary)? + "\n",
    )?;
    throughput_chart(&run.join("throughput.svg"), &timeline)?;
    latency_chart(&run.join("latency.svg"), &timeline)?;
    write_index(dir)?;
    Ok(run)
}

/// A run name as a directory name: letters, digits, `-`, `_` and `.`; anything else `_`.
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    match s.trim_start_matches('.') {
        "" => "run".into(),
        t => t.to_string(),
    }
}

fn chart_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("cannot draw chart: {e:?}")
}

/// The measured part of a run starts where warm-up ends; the chart shades warm-up grey.
fn warmup_end(timeline: &[Sample]) -> f64 {
    timeline
        .iter()
        .filter(|s| s.warmup)
        .map(|s| s.t)
        .fold(0.0, f64::max)
}

/// One line of a chart: its label, colour and (x, y) points.
type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

fn throughput_chart(path: &Path, timeline: &[Sample]) -> Result<()> {
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let t_max = timeline.last().map(|s| s.t).unwrap_or(1.0).max(1.0);
    let series: [Series; 2] = [
        (
            "produce MB/s",
            BLUE,
            timeline
                .iter()
                .filter_map(|s| s.produce.as_ref().map(|r| (s.t, r.mb_per_sec)))
                .collect(),
        ),
        (
            "consume MB/s",
            RGBColor(0, 140, 0),
            timeline
                .iter()
                .filter_map(|s| s.consume.as_ref().map(|r| (s.t, r.mb_per_sec)))
                .collect(),
        ),
    ];
    let y_max = series
        .iter()
        .flat_map(|(_, _, v)| v.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption("throughput per second", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(chart_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("MB/s (10^6 bytes)")
        .draw()
        .map_err(chart_err)?;
    shade_warmup(&mut chart, warmup_end(timeline), 0.0, y_max)?;
    for (label, color, points) in series {
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(chart_err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(chart_err)?;
    root.present().map_err(chart_err)
}

fn shade_warmup<DB: DrawingBackend, Y>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    end: f64,
    y_low: Y::ValueType,
    y_high: Y::ValueType,
) -> Result<()>
where
    Y: Ranged,
    Y::ValueType: Clone + 'static,
{
    if end > 0.0 {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, y_high), (end, y_low)],
                RGBColor(200, 200, 200).mix(0.4).filled(),
            )))
            .map_err(chart_err)?;
    }
    Ok(())
}

fn latency_chart(path: &Path, timeline: &[Sample]) -> Result<()> {
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let t_max = timeline.last().map(|s| s.t).unwrap_or(1.0).max(1.0);
    type Pick = fn(&crate::report::Percentiles) -> f64;
    let picks: [(&str, Pick); 4] = [
        ("p50", |p| p.p50),
        ("p99", |p| p.p99),
        ("p99.9", |p| p.p999),
        ("max", |p| p.max),
    ];
    let colors = [BLUE, RGBColor(0, 140, 0), RGBColor(230, 120, 0), RED];
    let mut series = Vec::new();
    for (stream, dashed) in [("ack", false), ("e2e", true)] {
        for (i, (name, pick)) in picks.iter().enumerate() {
            let points: Vec<(f64, f64)> = timeline
                .iter()
                .filter_map(|s| {
                    let p = if stream == "ack" {
                        s.publish_latency.as_ref()
                    } else {
                        s.end_to_end_latency.as_ref()
                    };
                    p.map(|p| (s.t, pick(p).max(0.001)))
                })
                .collect();
            if !points.is_empty() {
                series.push((format!("{stream} {name}"), colors[i], dashed, points));
            }
        }
    }
    let (lo, hi) = series
        .iter()
        .flat_map(|(_, _, _, v)| v.iter().map(|p| p.1))
        .fold((f64::MAX, 0.0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (lo, hi) = if hi <= 0.0 {
        (0.01, 10.0)
    } else {
        (lo * 0.8, (hi * 1.25).max(lo * 10.0))
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "latency percentiles per second (ack solid, end-to-end dashed)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, (lo..hi).log_scale())
        .map_err(chart_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("ms (log scale)")
        .draw()
        .map_err(chart_err)?;
    shade_warmup(&mut chart, warmup_end(timeline), lo, hi)?;
    for (label, color, dashed, points) in series {
        let style = color.stroke_width(if dashed { 1 } else { 2 });
        if dashed {
            chart
                .draw_series(DashedLineSeries::new(points, 6, 4, style))
                .map_err(chart_err)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        } else {
            chart
                .draw_series(LineSeries::new(points, style))
                .map_err(chart_err)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(chart_err)?;
    root.present().map_err(chart_err)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn num(v: &Value, key: &str, digits: usize) -> String {
    v.get(key)
        .and_then(Value::as_f64)
        .map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

/// One line describing a run's workload, from its summary's `config`.
fn describe(cfg: &Value) -> String {
    let mut parts = vec![];
    if let Some(b) = cfg.get("brokers").and_then(Value::as_str) {
        parts.push(b.to_string());
    }
    if let Some(p) = cfg.get("partitions") {
        parts.push(format!("{p} partitions"));
    }
    if let Some(p) = cfg.get("produce").filter(|p| !p.is_null()) {
        parts.push(format!(
            "produce {}×{} B acks={} {}{}",
            p["producers"],
            p["recordBytes"],
            p["acks"].as_str().unwrap_or("?"),
            p["compression"].as_str().unwrap_or(""),
            p["rate"]
                .as_str()
                .map(|r| format!(" rate {r}"))
                .unwrap_or_default()
        ));
    }
    if let Some(c) = cfg.get("consume").filter(|c| !c.is_null()) {
        parts.push(format!("consume ×{}", c["consumers"]));
    }
    parts.join(", ")
}

/// Rebuilds `dir/index.html` from every `dir/*/run.json`, runs in name order.
pub fn write_index(dir: &Path) -> Result<()> {
    let mut runs: Vec<(String, Value)> = Vec::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let p = e.path().join("run.json");
        if let Ok(text) = std::fs::read_to_string(&p) {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                runs.push((e.file_name().to_string_lossy().into_owned(), v));
            }
        }
    }
    runs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = String::new();
    h.push_str(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>sluice-bench runs</title>\n\
         <style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,\
         td:nth-child(2){text-align:left}.runs{display:flex;flex-wrap:wrap;gap:1em}\
         .run{flex:1 1 460px;max-width:920px}.run img{width:100%}</style></head><body>\n\
         <h1>sluice-bench runs</h1>\n<p>MB = 10<sup>6</sup> bytes; latencies in ms over the \
         measured time (warm-up excluded; shaded in the charts).</p>\n<table>\n<tr><th>run</th>\
         <th>workload</th><th>produce MB/s</th><th>records/s</th><th>ack p50</th><th>ack p99</th>\
         <th>ack p99.9</th><th>ack max</th><th>consume MB/s</th><th>e2e p50</th><th>e2e p99</th>\
         <th>e2e p99.9</th><th>errors</th></tr>\n",
    );
    for (name, v) in &runs {
        let errors = v.get("publishErrors").and_then(Value::as_u64).unwrap_or(0)
            + v.get("consumeErrors").and_then(Value::as_u64).unwrap_or(0);
        let _ = writeln!(
            h,
            "<tr><td><a href=\"#{n}\">{n}</a></td><td>{w}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{errors}</td></tr>",
            num(v, "publishThroughputMBps", 1),
            num(v, "publishRate", 0),
            num(v, "publishLatency50pct", 3),
            num(v, "publishLatency99pct", 3),
            num(v, "publishLatency999pct", 3),
            num(v, "publishLatencyMax", 3),
            num(v, "consumeThroughputMBps", 1),
            num(v, "endToEndLatency50pct", 3),
            num(v, "endToEndLatency99pct", 3),
            num(v, "endToEndLatency999pct", 3),
            n = escape(name),
            w = escape(&describe(&v["config"])),
        );
    }
    h.push_str("</table>\n<div class=\"runs\">\n");
    for (name, _) in &runs {
        let n = escape(name);
        let _ = writeln!(
            h,
            "<div class=\"run\" id=\"{n}\"><h2>{n}</h2><img src=\"{n}/throughput.svg\" \
             alt=\"throughput of {n}\"><img src=\"{n}/latency.svg\" alt=\"latency of {n}\">\
             <p><a href=\"{n}/run.json\">run.json</a></p></div>"
        );
    }
    h.push_str("</div>\n</body></html>\n");
    let tmp = dir.join("index.html.tmp");
    std::fs::write(&tmp, h)?;
    std::fs::rename(&tmp, dir.join("index.html"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Percentiles, Rates};
    use serde_json::json;

    fn sample(t: f64, warmup: bool, mb: f64, p99: f64) -> Sample {
        Sample {
            t,
            warmup,
            produce: Some(Rates {
                records_per_sec: mb * 1000.0,
                mb_per_sec: mb,
                errors: 0,
            }),
            consume: None,
            publish_latency: Some(Percentiles {
                p50: p99 / 4.0,
                p99,
                p999: p99 * 2.0,
                max: p99 * 3.0,
                count: 10,
            }),
            end_to_end_latency: None,
        }
    }

    #[test]
    fn a_report_holds_each_run_with_charts_and_an_index_of_all() {
        let dir = tempfile::tempdir().unwrap();
        let timeline: Vec<Sample> = (1..=5)
            .map(|i| sample(i as f64, i == 1, 100.0 + i as f64, 2.0 * i as f64))
            .collect();
        let summary = json!({
            "publishThroughputMBps": 103.5, "publishRate": 103500.0,
            "publishLatency99pct": 8.25, "publishErrors": 0,
            "config": {"brokers": "127.0.0.1:9092", "partitions": 8,
                       "produce": {"producers": 1, "recordBytes": 1024, "acks": "All",
                                   "compression": "None", "rate": null},
                       "consume": null},
            "timeline": timeline,
        });
        let a = write_run(dir.path(), "sluice s1/step 1", &summary).unwrap();
        let b = write_run(dir.path(), "sluice s1/step 1", &summary).unwrap();
        assert_eq!(a.file_name().unwrap(), "sluice_s1_step_1");
        assert_eq!(b.file_name().unwrap(), "sluice_s1_step_1-2");
        for run in [&a, &b] {
            let svg = std::fs::read_to_string(run.join("throughput.svg")).unwrap();
            assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
            assert!(svg.contains("produce MB/s"));
            assert!(svg.contains("<polyline"), "no line drawn");
            let lat = std::fs::read_to_string(run.join("latency.svg")).unwrap();
            assert!(lat.contains("ack p99"));
            let back: Value =
                serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap())
                    .unwrap();
            assert_eq!(back["timeline"].as_array().unwrap().len(), 5);
        }
        let index = std::fs::read_to_string(dir.path().join("index.html")).unwrap();
        assert!(index.contains("sluice_s1_step_1-2/latency.svg"));
        assert!(index.contains("<td>103.5</td>"), "{index}");
        assert!(index.contains("<td>8.250</td>"), "{index}");
        assert!(index.contains("acks=All"), "{index}");
        assert_eq!(index.matches("<div class=\"run\"").count(), 2);
    }

    #[test]
    fn empty_timelines_and_hostile_names_still_make_a_valid_page() {
        let dir = tempfile::tempdir().unwrap();
        let run = write_run(dir.path(), "../<b>", &json!({"config": {}})).unwrap();
        assert!(run.starts_with(dir.path()), "{}", run.display());
        assert!(run.join("latency.svg").exists());
        let index = std::fs::read_to_string(dir.path().join("index.html")).unwrap();
        assert!(!index.contains("<b>"), "{index}");
    }
}
