//! The timeline of a simulated schedule as a standalone SVG, drawn like the DualPipe README's
//! figures: one row per rank, time to the right, boxes coloured by op kind (forward orange,
//! backward green, input-only backward light green, weight backward blue, an overlapped pair
//! half orange half green inside one border) and labelled with the micro-batch. Chunk 1 (DualPipe's
//! reverse direction, DualPipeV's returning stages) is drawn in darker shades.

use std::fmt::Write;

use super::{fmt_time, Cost, Op, OpKind, Schedule, Timeline};

const LEFT: f64 = 70.0;
const TOP: f64 = 56.0;
const ROW: f64 = 26.0;
const GAP: f64 = 4.0;
const WIDTH: f64 = 1400.0;

/// Fill colour of `kind` on chunk 0 and on chunk 1.
fn colour(kind: OpKind, chunk: u8) -> &'static str {
    let [near, far] = match kind {
        OpKind::Forward | OpKind::ForwardBackward => ["#f6b042", "#d98a1c"],
        OpKind::Backward => ["#7fd36b", "#4fa83c"],
        OpKind::BackwardInput => ["#bfeab0", "#94cf80"],
        OpKind::BackwardWeight => ["#86c5ff", "#4f95dd"],
    };
    if chunk == 0 {
        near
    } else {
        far
    }
}

/// The SVG document for `timeline`, the result of simulating `schedule` under `cost`.
pub fn timeline_svg(schedule: &Schedule, timeline: &Timeline, cost: &Cost) -> String {
    let ranks = timeline.ranks.len();
    let scale = if timeline.total > 0.0 { WIDTH / timeline.total } else { 1.0 };
    let height = TOP + ranks as f64 * (ROW + GAP) + 52.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" viewBox="0 0 {w} {height}" font-family="sans-serif">"#,
        w = LEFT + WIDTH + 20.0
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let formula = schedule.method.table_bubble(schedule.stages, cost);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="20" font-size="15" font-weight="bold">{} · PP={} on {ranks} ranks · {} micro-batches · total time {}</text>"#,
        schedule.method,
        schedule.stages,
        schedule.micro,
        fmt_time(timeline.total)
    );
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="38" font-size="12">F={} B={} W={} F&amp;B={} comm={} · max bubble {} (table {} = {}) · peak activations {} (table {})</text>"#,
        fmt_time(cost.f),
        fmt_time(cost.b),
        fmt_time(cost.w),
        fmt_time(cost.fb),
        fmt_time(cost.comm),
        fmt_time(timeline.max_bubble()),
        schedule.method.bubble_formula().replace('&', "&amp;"),
        fmt_time(formula),
        timeline.peak_activations(),
        schedule.method.table_activations(schedule.stages)
    );
    for (r, rank) in timeline.ranks.iter().enumerate() {
        let y = TOP + r as f64 * (ROW + GAP);
        let _ = writeln!(s, r#"<text x="8" y="{}" font-size="13">Rank {r}</text>"#, y + ROW * 0.65);
        let _ =
            writeln!(s, r##"<rect x="{LEFT}" y="{y}" width="{WIDTH}" height="{ROW}" fill="#f4f4f4" stroke="#ddd"/>"##);
        for span in &rank.spans {
            let (x, w) = (LEFT + span.start * scale, (span.end - span.start) * scale);
            match span.op {
                Op::FB { f, b } => {
                    cell(&mut s, x, y, w / 2.0, colour(OpKind::Forward, f.chunk), f.micro, false);
                    cell(&mut s, x + w / 2.0, y, w / 2.0, colour(OpKind::Backward, b.chunk), b.micro, false);
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.2}" y="{y}" width="{w:.2}" height="{ROW}" fill="none" stroke="black" stroke-width="1.6"/>"#
                    );
                }
                Op::F(work) | Op::B(work) | Op::BInput(work) | Op::W(work) => {
                    cell(&mut s, x, y, w, colour(span.op.kind(), work.chunk), work.micro, true);
                }
            }
        }
    }
    axis(&mut s, TOP + ranks as f64 * (ROW + GAP), timeline.total, scale);
    legend(&mut s, height - 20.0, schedule.paths.iter().any(|p| p.stages.iter().any(|pl| pl.chunk == 1)));
    s.push_str("</svg>\n");
    s
}

/// A box with the micro-batch number in it (when there is room).
fn cell(s: &mut String, x: f64, y: f64, w: f64, fill: &str, micro: usize, border: bool) {
    let stroke = if border { r##" stroke="#555" stroke-width="0.5""## } else { "" };
    let _ = writeln!(s, r#"<rect x="{x:.2}" y="{y}" width="{w:.2}" height="{ROW}" fill="{fill}"{stroke}/>"#);
    let label = micro.to_string();
    let size = (w / (0.62 * label.len() as f64)).min(12.0);
    if size >= 6.0 {
        let _ = writeln!(
            s,
            r#"<text x="{:.2}" y="{:.2}" font-size="{size:.1}" text-anchor="middle">{label}</text>"#,
            x + w / 2.0,
            y + ROW / 2.0 + size * 0.35
        );
    }
}

/// A time axis under the rows, ticks at 1, 2 or 5 times a power of ten.
fn axis(s: &mut String, y: f64, total: f64, scale: f64) {
    let _ = writeln!(s, r#"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="black"/>"#, LEFT + total * scale);
    if total <= 0.0 {
        return;
    }
    let raw = total / 15.0;
    let pow = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * pow).find(|&st| st >= raw).unwrap_or(10.0 * pow);
    let mut t = 0.0;
    while t <= total + 1e-9 {
        let x = LEFT + t * scale;
        let _ = writeln!(s, r#"<line x1="{x:.2}" y1="{y}" x2="{x:.2}" y2="{}" stroke="black"/>"#, y + 4.0);
        let _ = writeln!(
            s,
            r#"<text x="{x:.2}" y="{}" font-size="10" text-anchor="middle">{}</text>"#,
            y + 15.0,
            fmt_time(t)
        );
        t += step;
    }
}

fn legend(s: &mut String, y: f64, two_chunks: bool) {
    let items = [
        (OpKind::Forward, "forward (F)"),
        (OpKind::Backward, "backward (B)"),
        (OpKind::BackwardInput, "input-grad backward (b)"),
        (OpKind::BackwardWeight, "weight-grad backward (W)"),
    ];
    let mut x = LEFT;
    for (kind, name) in items {
        let _ =
            writeln!(s, r##"<rect x="{x}" y="{y}" width="14" height="14" fill="{}" stroke="#555"/>"##, colour(kind, 0));
        let _ = writeln!(s, r#"<text x="{}" y="{}" font-size="12">{name}</text>"#, x + 18.0, y + 11.5);
        x += 30.0 + 7.0 * name.len() as f64;
    }
    let _ = writeln!(s, r#"<rect x="{x}" y="{y}" width="7" height="14" fill="{}"/>"#, colour(OpKind::Forward, 0));
    let _ =
        writeln!(s, r#"<rect x="{}" y="{y}" width="7" height="14" fill="{}"/>"#, x + 7.0, colour(OpKind::Backward, 0));
    let _ =
        writeln!(s, r#"<rect x="{x}" y="{y}" width="14" height="14" fill="none" stroke="black" stroke-width="1.6"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="{}" font-size="12">overlapped F&amp;B</text>"#, x + 18.0, y + 11.5);
    if two_chunks {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-size="12">darker: chunk 1 (reverse direction / returning stages)</text>"#,
            x + 150.0,
            y + 11.5
        );
    }
}
