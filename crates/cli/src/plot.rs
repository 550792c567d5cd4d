//! `whale plot`: SVG charts from a run's `metrics.jsonl` — loss and MTP loss, learning rate,
//! expert-load MaxVio per MoE layer, and a heatmap of the expert load over the last tenth of the
//! run. Several runs also get a MaxVio comparison chart. The SVG is written by hand (a few lines
//! of markup), so no font or image library is needed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;
use whale_rl::parallel::trainer::read_jsonl;

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run folders (each with metrics.jsonl); charts go into each, a comparison into the first.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
}

const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];

struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

/// `text` as SVG character data (run folder names go into titles and legends).
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A line chart with axes, ticks and a legend.
fn line_chart(title: &str, y_label: &str, series: &[Series], log_y: bool) -> String {
    let title = escape(title);
    let (w, h, l, r, t, b) = (720.0, 400.0, 70.0, 170.0, 40.0, 50.0);
    let tf = |y: f64| if log_y { y.max(1e-12).log10() } else { y };
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|p| p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(tf(y));
        y1 = y1.max(tf(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 == x0 {
        x1 = x0 + 1.0;
    }
    if y1 == y0 {
        y1 = y0 + 1.0;
    }
    let pad = 0.05 * (y1 - y0);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let sx = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - r);
    let sy = |y: f64| h - b - (tf(y) - y0) / (y1 - y0) * (h - t - b);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="24" font-size="15" text-anchor="middle">{title}</text>"#,
        (l + w - r) / 2.0
    );
    let _ = write!(
        s,
        r#"<line x1="{l}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{l}" y1="{t}" x2="{l}" y2="{}" stroke="black"/>"#,
        h - b,
        w - r,
        h - b,
        h - b
    );
    for i in 0..=4 {
        let fx = x0 + (x1 - x0) * i as f64 / 4.0;
        let fy = y0 + (y1 - y0) * i as f64 / 4.0;
        let label = if log_y { format!("{:.2e}", 10f64.powf(fy)) } else { format!("{fy:.3}") };
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{:.0}</text><text x="{}" y="{}" text-anchor="end">{label}</text><line x1="{l}" y1="{y}" x2="{}" y2="{y}" stroke="rgb(221,221,221)"/>"#,
            sx(fx),
            h - b + 16.0,
            fx,
            l - 6.0,
            h - b - (fy - y0) / (y1 - y0) * (h - t - b) + 4.0,
            w - r,
            y = h - b - (fy - y0) / (y1 - y0) * (h - t - b),
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">step</text><text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">{y_label}</text>"#,
        (l + w - r) / 2.0,
        h - 12.0,
        h / 2.0,
        h / 2.0
    );
    for (i, se) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> =
            se.points.iter().filter(|p| p.1.is_finite()).map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        let _ = write!(s, r#"<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{}"/>"#, path.join(" "));
        let ly = t + 14.0 + 18.0 * i as f64;
        let _ = write!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            w - r + 10.0,
            w - r + 30.0,
            w - r + 36.0,
            ly + 4.0,
            escape(&se.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Rows = MoE layers, columns = experts, shade = share of that layer's routed tokens.
fn heatmap(title: &str, loads: &[Vec<f64>]) -> String {
    let title = escape(title);
    let experts = loads.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let (cell, l, t) = (22.0, 90.0, 50.0);
    let (w, h) = (l + cell * experts as f64 + 120.0, t + cell * loads.len() as f64 + 40.0);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="24" font-size="15" text-anchor="middle">{title}</text>"#,
        w / 2.0
    );
    let uniform = 1.0 / experts as f64;
    for (li, row) in loads.iter().enumerate() {
        let total: f64 = row.iter().sum::<f64>().max(1e-12);
        let y = t + cell * li as f64;
        let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="end">MoE layer {li}</text>"#, l - 6.0, y + 15.0);
        for (e, &v) in row.iter().enumerate() {
            // White at the uniform share, red above it, blue below.
            let share = v / total;
            let d = ((share - uniform) / uniform).clamp(-1.0, 1.0);
            let (r, g, b) = if d >= 0.0 {
                (255.0, 255.0 * (1.0 - d), 255.0 * (1.0 - d))
            } else {
                (255.0 * (1.0 + d), 255.0 * (1.0 + d), 255.0)
            };
            let _ = write!(
                s,
                r#"<rect x="{}" y="{y}" width="{cell}" height="{cell}" fill="rgb({:.0},{:.0},{:.0})" stroke="white"><title>expert {e}: {:.1}%</title></rect>"#,
                l + cell * e as f64,
                r,
                g,
                b,
                100.0 * share
            );
        }
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">expert (red: above the uniform share, blue: below)</text></svg>"#,
        l + cell * experts as f64 / 2.0,
        h - 12.0
    );
    s.push('\n');
    s
}

fn read_metrics(run: &Path) -> Result<Vec<Value>> {
    rows(&run.join("metrics.jsonl"))
}

/// The values of a JSON-lines file's lines (whale-parallel's `read_jsonl`: a torn last line is
/// left out, another bad line named).
fn rows(path: &Path) -> Result<Vec<Value>> {
    Ok(read_jsonl(path)?.into_iter().map(|l| l.value).collect())
}

fn field(rows: &[Value], key: &str) -> Vec<(f64, f64)> {
    rows.iter().filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?))).collect()
}

fn mean_max_vio(rows: &[Value]) -> Vec<(f64, f64)> {
    rows.iter()
        .filter_map(|r| {
            let v: Vec<f64> = r["max_vio"].as_array()?.iter().filter_map(Value::as_f64).collect();
            (!v.is_empty()).then(|| (r["step"].as_f64().unwrap_or(0.0), v.iter().sum::<f64>() / v.len() as f64))
        })
        .collect()
}

fn write(path: &Path, svg: String) -> Result<()> {
    crate::pretrain::write_atomically(path, &svg).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

pub fn run(a: PlotArgs) -> Result<()> {
    let mut compare = Vec::new();
    for run in &a.runs {
        let rows = read_metrics(run)?;
        if rows.is_empty() {
            bail!("{} has no metrics yet", run.display());
        }
        let name = run.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let loss = vec![
            Series { name: "loss".into(), points: field(&rows, "loss") },
            Series { name: "main loss".into(), points: field(&rows, "main_loss") },
            Series { name: "MTP loss".into(), points: field(&rows, "mtp_loss") },
        ];
        write(&run.join("loss.svg"), line_chart(&format!("{name}: training loss"), "loss", &loss, false))?;
        write(
            &run.join("lr.svg"),
            line_chart(
                &format!("{name}: learning rate"),
                "lr",
                &[Series { name: "lr".into(), points: field(&rows, "lr") }],
                false,
            ),
        )?;
        let layers = rows.last().and_then(|r| r["max_vio"].as_array()).map_or(0, Vec::len);
        let vio: Vec<Series> = (0..layers)
            .map(|i| Series {
                name: format!("MoE layer {i}"),
                points: rows.iter().filter_map(|r| Some((r["step"].as_f64()?, r["max_vio"][i].as_f64()?))).collect(),
            })
            .collect();
        write(
            &run.join("max_vio.svg"),
            line_chart(&format!("{name}: expert-load MaxVio"), "max load / mean load - 1", &vio, false),
        )?;
        let tail = &rows[rows.len() - (rows.len() / 10).max(1)..];
        let loads: Vec<Vec<f64>> = (0..layers)
            .map(|i| {
                let mut acc: Vec<f64> = Vec::new();
                for r in tail {
                    let row: Vec<f64> = r["expert_load"][i]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_f64).collect())
                        .unwrap_or_default();
                    acc.resize(acc.len().max(row.len()), 0.0);
                    acc.iter_mut().zip(&row).for_each(|(a, b)| *a += b);
                }
                acc
            })
            .collect();
        write(&run.join("expert_load.svg"), heatmap(&format!("{name}: expert load, last tenth of the run"), &loads))?;
        compare.push(Series { name, points: mean_max_vio(&rows) });
    }
    if compare.len() > 1 {
        write(
            &a.runs[0].join("max_vio_compare.svg"),
            line_chart("mean MaxVio over MoE layers", "max load / mean load - 1", &compare, false),
        )?;
    }
    Ok(())
}

/// Rows of a JSON-lines file, or none when it does not exist.
fn rows_if_any(path: &Path) -> Result<Vec<Value>> {
    if path.exists() {
        rows(path)
    } else {
        Ok(Vec::new())
    }
}

/// Reward, mean completion length and validation pass@1 over steps for RL runs (`(name, run
/// folder)` with `metrics.jsonl` and `eval_history.jsonl`), one SVG each, into `dir`.
pub fn rl_charts(dir: &Path, runs: &[(String, PathBuf)]) -> Result<()> {
    let mut reward = Vec::new();
    let mut length = Vec::new();
    let mut pass1 = Vec::new();
    for (name, run) in runs {
        let rows = rows_if_any(&run.join("metrics.jsonl"))?;
        reward.push(Series { name: name.clone(), points: field(&rows, "reward") });
        length.push(Series { name: name.clone(), points: field(&rows, "completions/mean_length") });
        let history = rows_if_any(&run.join("eval_history.jsonl"))?;
        pass1.push(Series { name: name.clone(), points: field(&history, "pass@1") });
    }
    write(&dir.join("rl_reward.svg"), line_chart("Reward per step", "mean reward", &reward, false))?;
    write(&dir.join("rl_length.svg"), line_chart("Completion length", "tokens", &length, false))?;
    pass1.retain(|s| !s.points.is_empty());
    write(&dir.join("rl_pass1.svg"), line_chart("Validation pass@1 (4 samples)", "pass@1", &pass1, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_and_bad_lines_named_by_their_number() {
        let series = [Series { name: "runs/a&b<1>".into(), points: vec![(0.0, 1.0), (1.0, 2.0)] }];
        let svg = line_chart("loss of \"a&b\"", "loss", &series, false);
        assert!(svg.contains("runs/a&amp;b&lt;1&gt;") && svg.contains("loss of &quot;a&amp;b&quot;"), "{svg}");
        assert!(!svg.contains("a&b"));
        let dir = whale_rl::parallel::model::tensor::testing::TempDir::new("plot-lines");
        let path = dir.join("eval_history.jsonl");
        std::fs::write(&path, "{\"step\": 0}\n\n{oops\n").unwrap();
        let err = format!("{:#}", rows_if_any(&path).unwrap_err());
        assert!(err.contains("eval_history.jsonl: line 3"), "{err}");
        // A last line cut mid-write (no newline) is a killed run's: left out. One inside is not.
        std::fs::write(&path, "{\"step\": 0}\n{\"step\": 1, \"pass").unwrap();
        assert_eq!(rows_if_any(&path).unwrap(), vec![serde_json::json!({"step": 0})]);
        std::fs::write(&path, "{\"step\": 0}\n{\"step\": 1, \"pass\n{\"step\": 2}").unwrap();
        let err = format!("{:#}", rows_if_any(&path).unwrap_err());
        assert!(err.contains("eval_history.jsonl: line 2"), "{err}");
    }
}
