//! Pipeline schedules: the reference's DualPipe order for PP=4, M=8 (spec section 5.3) literally,
//! DualPipe and DualPipeV against the reference implementation's own `step` for 51 shapes,
//! DualPipeV as half of DualPipe, the simulated bubbles and peak activations of spec section 5.2's
//! table for PP = 4, 8 and 16, and clear errors for impossible shapes, malformed lists and
//! deadlocks.

use whale_parallel::schedule::svg::timeline_svg;
use whale_parallel::schedule::{simulate, Cost, Method, Op, Schedule, ScheduleError, Work};

/// Spec 5.3's golden vector, ranks 0 and 1; ranks 2 and 3 are their mirrors.
const R0: &str = "F0.0 F0.1 F0.2 F1.0 b1.0 W F1.1 [F0.3&B1.1] [F1.2&B0.0] B1.2 [F1.3&B0.1] B1.3 b0.2 W b0.3 W";
const R1: &str = "F0.0 F1.0 F0.1 F1.1 F0.2 B1.0 [F1.2&B0.0] [F0.3&B1.1] [F1.3&B0.1] B1.2 B0.2 b1.3 b0.3 W W";

/// Swaps the direction digit (the one right after F, B or b), leaving micro-batch indices alone.
fn mirror(ops: &str) -> String {
    let mut out = String::new();
    let mut prev = ' ';
    for c in ops.chars() {
        let swapped = match (prev, c) {
            ('F' | 'B' | 'b', '0') => '1',
            ('F' | 'B' | 'b', '1') => '0',
            _ => c,
        };
        out.push(swapped);
        prev = c;
    }
    out
}

#[test]
fn dualpipe_pp4_m8_is_the_reference_order() {
    let s = Schedule::new(Method::DualPipe, 4, 8).unwrap();
    assert_eq!(s.ranks.len(), 4);
    assert_eq!(s.notation(0), R0);
    assert_eq!(s.notation(1), R1);
    assert_eq!(s.notation(2), mirror(R1));
    assert_eq!(s.notation(3), mirror(R0));
}

/// DeepSeek's reference DualPipe and DualPipeV (deepseek-ai/DualPipe's `step`, recorded rank by
/// rank by scripts/make_schedule_reference.py) for 23 and 28 shapes: 1 to 16 ranks, from the
/// fewest micro-batches each allows to four per rank, and a few above the fewest. Every rank's
/// order matches the reference's.
#[test]
fn dualpipe_and_dualpipev_follow_the_reference_step_for_every_shape() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dualpipe/expected.json");
    let e: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (method, key, shapes) in [(Method::DualPipe, "dualpipe", 23), (Method::DualPipeV, "dualpipev", 28)] {
        let cases = e[key].as_array().unwrap();
        assert_eq!(cases.len(), shapes, "{key}: shapes in the fixture");
        for case in cases {
            let (ranks, micro) = (case["ranks"].as_u64().unwrap() as usize, case["micro"].as_u64().unwrap() as usize);
            // DualPipeV's pipeline has two stages on every rank.
            let stages = if method == Method::DualPipeV { 2 * ranks } else { ranks };
            let s = Schedule::new(method, stages, micro).unwrap();
            let want = case["order"].as_array().unwrap();
            assert_eq!(s.ranks.len(), want.len(), "{method} {ranks} ranks, {micro} micro-batches");
            for (rank, want) in want.iter().enumerate() {
                assert_eq!(
                    s.notation(rank),
                    want.as_str().unwrap(),
                    "{method} {ranks} ranks, {micro} micro-batches: rank {rank}"
                );
            }
        }
    }
}

#[test]
fn dualpipev_is_the_first_half_of_dualpipe_with_twice_the_micro_batches() {
    for ranks in 1..=4usize {
        for micro in [2 * ranks, 2 * ranks + 1, 3 * ranks + 2] {
            let v = Schedule::new(Method::DualPipeV, 2 * ranks, micro).unwrap();
            let d = Schedule::new(Method::DualPipe, 2 * ranks, 2 * micro).unwrap();
            assert_eq!(v.ranks[..], d.ranks[..ranks], "ranks {ranks}, micro {micro}");
        }
    }
}

#[test]
fn every_w_pops_the_oldest_deferred_input_grad() {
    for (method, pp, micro) in [(Method::Zb1p, 8, 16), (Method::DualPipe, 8, 20), (Method::DualPipeV, 8, 12)] {
        let s = Schedule::new(method, pp, micro).unwrap();
        for ops in &s.ranks {
            let bs: Vec<Work> =
                ops.iter().filter_map(|op| if let Op::BInput(w) = op { Some(*w) } else { None }).collect();
            let ws: Vec<Work> = ops.iter().filter_map(|op| if let Op::W(w) = op { Some(*w) } else { None }).collect();
            assert_eq!(bs, ws, "{method}");
        }
    }
}

/// Micro-batch counts to try: 1F1B/ZB1P from PP, DualPipe (even, >= 2 PP) and DualPipeV (>= PP).
fn micro_counts(method: Method, pp: usize) -> [usize; 3] {
    match method {
        Method::DualPipe => [2 * pp, 2 * pp + 4, 3 * pp],
        _ => [pp, pp + 3, 2 * pp],
    }
}

/// The costs under which the table's formulas are exact. The table assumes no communication
/// latency (DualPipe hides it under computation) and an input-gradient backward as long as a
/// forward, so a full backward is B = F + W, with W <= F. ZB-H1's paper takes F = b = W; the
/// first cost is that (F&B = F + B: overlapping saves no time), the others vary W, the scale and
/// F&B within [B, F + B]. Outside this, see `formula_is_not_exact_off_its_assumptions`.
const TABLE_COSTS: [Cost; 5] = [
    Cost { f: 1.0, b: 2.0, w: 1.0, fb: 3.0, comm: 0.0 },
    Cost { f: 2.0, b: 3.0, w: 1.0, fb: 5.0, comm: 0.0 },
    Cost { f: 1.0, b: 1.5, w: 0.5, fb: 2.5, comm: 0.0 },
    Cost { f: 1.0, b: 2.0, w: 1.0, fb: 2.5, comm: 0.0 },
    Cost { f: 3.0, b: 5.0, w: 2.0, fb: 5.0, comm: 0.0 },
];

#[test]
fn simulated_bubbles_equal_the_table_for_pp_4_8_16() {
    for method in Method::ALL {
        for pp in [4, 8, 16] {
            for micro in micro_counts(method, pp) {
                let s = Schedule::new(method, pp, micro).unwrap();
                for (i, cost) in TABLE_COSTS.iter().enumerate() {
                    assert!(method.table_assumes(pp, micro, cost));
                    let t = simulate(&s, cost).unwrap();
                    let table = method.table_bubble(pp, cost);
                    let at = format!("{method} PP={pp} M={micro} cost {cost:?}");
                    assert!((t.max_bubble() - table).abs() < 1e-9, "{at}: {} vs table {table}", t.max_bubble());
                    // With F&B = F + B every rank idles exactly the table's bubble; with a cheaper
                    // F&B the ranks nearer the ends of DualPipe idle less than the middle ones.
                    if i < 3 {
                        for (r, rank) in t.ranks.iter().enumerate() {
                            assert!((rank.bubble - table).abs() < 1e-9, "{at}, rank {r}: {}", rank.bubble);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn spec_timing_checks() {
    // Spec 5.3: F = W = 1, B = 2, F&B = 3 idles 2, 6, 14 on every rank for PP = 4, 8, 16, for any M.
    for (pp, bubble) in [(4, 2.0), (8, 6.0), (16, 14.0)] {
        for micro in [2 * pp, 2 * pp + 4, 32] {
            let t = simulate(&Schedule::new(Method::DualPipe, pp, micro).unwrap(), &Cost::default()).unwrap();
            assert!(t.ranks.iter().all(|r| r.bubble == bubble), "PP={pp} M={micro}");
        }
    }
    // F&B = 2.5: the worst rank matches the formula, 4.5 at PP = 8.
    let cost = Cost { fb: 2.5, ..Cost::default() };
    let t = simulate(&Schedule::new(Method::DualPipe, 8, 20).unwrap(), &cost).unwrap();
    assert_eq!(t.max_bubble(), 4.5);
}

#[test]
fn formula_is_not_exact_off_its_assumptions() {
    let dualpipe = Schedule::new(Method::DualPipe, 8, 20).unwrap();
    // W < F with B = 2: every rank idles 9.5, below the formula's 10.5 (spec 5.3).
    let cheap_w = Cost { w: 0.5, ..Cost::default() };
    let t = simulate(&dualpipe, &cheap_w).unwrap();
    assert_eq!((t.max_bubble(), Method::DualPipe.table_bubble(8, &cheap_w)), (9.5, 10.5));
    // W > F: the formula goes to zero, but the Ws cannot fill what the forwards leave.
    let heavy_w = Cost { f: 1.0, b: 3.0, w: 2.0, fb: 3.0, comm: 0.0 };
    assert_eq!(Method::DualPipe.table_bubble(8, &heavy_w), 0.0);
    assert!(simulate(&dualpipe, &heavy_w).unwrap().max_bubble() > 0.0);
    assert!(!Method::DualPipe.table_assumes(8, 20, &cheap_w) && !Method::DualPipe.table_assumes(8, 20, &heavy_w));
    // Overlapping that saves more than a forward (F&B < B) or costs more than F + B: the table
    // says 0 and 18, the schedule idles 2 and 20.
    let cheap_fb = Cost { fb: 1.0, ..Cost::default() };
    let t = simulate(&Schedule::new(Method::DualPipe, 4, 8).unwrap(), &cheap_fb).unwrap();
    assert_eq!((t.max_bubble(), Method::DualPipe.table_bubble(4, &cheap_fb)), (2.0, 0.0));
    let dear_fb = Cost { f: 2.0, b: 3.0, w: 1.0, fb: 6.0, comm: 0.0 };
    let t = simulate(&Schedule::new(Method::DualPipe, 8, 24).unwrap(), &dear_fb).unwrap();
    assert_eq!((t.max_bubble(), Method::DualPipe.table_bubble(8, &dear_fb)), (20.0, 18.0));
    assert!(!Method::DualPipe.table_assumes(4, 8, &cheap_fb) && !Method::DualPipe.table_assumes(8, 24, &dear_fb));
    // ZB1P with fewer micro-batches than stages: 12 against the table's 9.
    let zb = Cost { f: 2.0, b: 3.0, w: 1.0, fb: 5.0, comm: 0.0 };
    let t = simulate(&Schedule::new(Method::Zb1p, 4, 1).unwrap(), &zb).unwrap();
    assert_eq!((t.max_bubble(), Method::Zb1p.table_bubble(4, &zb)), (12.0, 9.0));
    assert!(!Method::Zb1p.table_assumes(4, 1, &zb) && Method::Zb1p.table_assumes(4, 4, &zb));
    // B = F + W holds for costs in microseconds too, though their sum rounds (b - w - f is
    // -7.3e-12 here), and the table is what the simulator finds.
    let us = Cost { f: 44047.1, w: 36245.3, b: 80292.4, fb: 124339.5, comm: 0.0 };
    assert_ne!(us.b - us.w - us.f, 0.0);
    let t = simulate(&Schedule::new(Method::Zb1p, 4, 8).unwrap(), &us).unwrap();
    assert!(Method::Zb1p.table_assumes(4, 8, &us));
    assert!((t.max_bubble() - Method::Zb1p.table_bubble(4, &us)).abs() < 1e-6);
    assert!(!Method::Zb1p.table_assumes(4, 8, &Cost { b: 80292.5, ..us }));
    // 1F1B has no such assumption.
    assert!(Method::OneFOneB.table_assumes(8, 20, &heavy_w) && Method::OneFOneB.table_assumes(8, 2, &heavy_w));
    let t = simulate(&Schedule::new(Method::OneFOneB, 8, 20).unwrap(), &heavy_w).unwrap();
    assert_eq!(t.max_bubble(), Method::OneFOneB.table_bubble(8, &heavy_w));
}

#[test]
fn peak_activations_match_the_table() {
    for pp in [4, 8, 16] {
        for method in Method::ALL {
            let s = Schedule::new(method, pp, micro_counts(method, pp)[1]).unwrap();
            let peaks = s.peak_activations();
            assert_eq!(peaks.iter().max(), Some(&method.table_activations(pp)), "{method} PP={pp}");
            let expected: Vec<usize> = match method {
                // 1F1B: rank r holds PP - r; ZB-H1 tops the later ranks up with deferred Ws.
                Method::OneFOneB => (0..pp).map(|r| pp - r).collect(),
                Method::Zb1p => vec![pp; pp],
                Method::DualPipe => vec![pp + 1; pp],
                Method::DualPipeV => vec![pp + 1; pp / 2],
            };
            assert_eq!(peaks, expected, "{method} PP={pp}");
        }
    }
}

#[test]
fn one_micro_batch_walks_down_and_back_with_latency() {
    let cost = Cost { f: 1.0, b: 2.0, w: 1.0, fb: 3.0, comm: 0.25 };
    let t = simulate(&Schedule::new(Method::OneFOneB, 3, 1).unwrap(), &cost).unwrap();
    // Three forwards, three backwards, four hops.
    assert_eq!(t.total, 3.0 + 6.0 + 4.0 * 0.25);
    assert_eq!(t.ranks[0].spans[1].start, 3.0 + 2.0 * 2.0 + 4.0 * 0.25);
    // DualPipeV on one rank turns locally: latency costs nothing.
    let local = Schedule::new(Method::DualPipeV, 2, 4).unwrap();
    let (a, b) = (simulate(&local, &Cost::default()).unwrap(), simulate(&local, &cost).unwrap());
    assert_eq!(a.total, b.total);
}

#[test]
fn a_cyclic_wait_is_a_deadlock_error() {
    // Rank 0 waits for micro-batch 0's backward before sending micro-batch 1 forward, while rank 1
    // waits for micro-batch 1's forward before sending micro-batch 0 back.
    let mut s = Schedule::new(Method::OneFOneB, 2, 2).unwrap();
    let (f, b) = (|m| Op::F(Work { chunk: 0, micro: m }), |m| Op::B(Work { chunk: 0, micro: m }));
    s.ranks[0] = vec![f(0), b(0), f(1), b(1)];
    s.ranks[1] = vec![f(0), f(1), b(0), b(1)];
    let err = simulate(&s, &Cost::default()).unwrap_err();
    let ScheduleError::Deadlock { done, total, blocked } = &err else { panic!("{err}") };
    assert_eq!((*done, *total, blocked.len()), (2, 8, 2));
    let msg = err.to_string();
    assert!(msg.contains("rank 0 at B0.0 waits for the backward of 0.0 on rank 1"), "{msg}");
    assert!(msg.contains("rank 1 at F0.1 waits for F0.1 on rank 0"), "{msg}");
    assert!(matches!(s.validate(), Err(ScheduleError::Deadlock { .. })));
}

#[test]
fn malformed_op_lists_are_named() {
    let good = Schedule::new(Method::DualPipe, 4, 8).unwrap();
    let malformed = |edit: &dyn Fn(&mut Vec<Op>)| {
        let mut s = good.clone();
        edit(&mut s.ranks[1]);
        match s.validate() {
            Err(ScheduleError::Malformed { rank: 1, reason, .. }) => reason,
            other => panic!("{other:?}"),
        }
    };
    assert!(malformed(&|ops| ops.retain(|op| *op != Op::F(Work { chunk: 1, micro: 1 }))).contains("no forward"));
    assert!(malformed(&|ops| ops.push(ops[0])).contains("twice"));
    assert!(malformed(&|ops| ops.swap(0, 5)).contains("backward before its forward"));
    // Rank 1's last ops are b1.3 b0.3 W W: move a W ahead of the bs.
    assert!(malformed(&|ops| {
        let w = ops.pop().unwrap();
        ops.insert(ops.len() - 3, w);
    })
    .contains("W before its b"));
    assert!(malformed(&|ops| ops.push(Op::F(Work { chunk: 2, micro: 0 }))).contains("not held"));
    assert!(malformed(&|ops| ops.push(Op::F(Work { chunk: 0, micro: 4 }))).contains("only 4 micro-batches"));
}

#[test]
fn impossible_shapes_and_costs_are_errors() {
    let reason = |method, pp, micro| match Schedule::new(method, pp, micro) {
        Err(ScheduleError::Shape { reason, .. }) => reason,
        other => panic!("{method} {pp} {micro}: {other:?}"),
    };
    assert!(reason(Method::DualPipe, 5, 20).contains("even number of stages"));
    assert!(reason(Method::DualPipe, 4, 9).contains("even count"));
    assert!(reason(Method::DualPipe, 8, 14).contains("2*PP"));
    assert!(reason(Method::DualPipeV, 6, 5).contains("at least PP"));
    assert!(reason(Method::DualPipeV, 3, 8).contains("even number of stages"));
    assert!(reason(Method::OneFOneB, 0, 8).contains("at least one stage"));
    assert!(reason(Method::Zb1p, 4, 0).contains("at least one micro-batch"));
    // Fewer micro-batches than stages is fine for 1F1B and ZB1P.
    for method in [Method::OneFOneB, Method::Zb1p] {
        assert!(simulate(&Schedule::new(method, 8, 3).unwrap(), &Cost::default()).is_ok());
    }
    let s = Schedule::new(Method::OneFOneB, 2, 2).unwrap();
    for bad in [
        Cost { f: -1.0, ..Cost::default() },
        Cost { w: 3.0, ..Cost::default() },
        Cost { fb: f64::NAN, ..Cost::default() },
    ] {
        assert!(matches!(simulate(&s, &bad), Err(ScheduleError::Cost(_))), "{bad:?}");
    }
}

#[test]
fn methods_parse_and_print() {
    for method in Method::ALL {
        assert_eq!(method.cli_name().parse::<Method>().unwrap(), method);
        assert_eq!(method.to_string().parse::<Method>().unwrap(), method);
    }
    assert_eq!("ZB-H1".parse::<Method>().unwrap(), Method::Zb1p);
    let err = "gpipe".parse::<Method>().unwrap_err().to_string();
    assert!(err.contains("gpipe") && err.contains("dualpipev"), "{err}");
    assert_eq!(Method::DualPipeV.ranks(16), 8);
}

#[test]
fn svg_draws_a_row_per_rank_with_labelled_boxes() {
    let s = Schedule::new(Method::DualPipe, 8, 20).unwrap();
    let cost = Cost::default();
    let t = simulate(&s, &cost).unwrap();
    let svg = timeline_svg(&s, &t, &cost);
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches(">Rank ").count(), 8);
    let ops: usize = s.ranks.iter().map(Vec::len).sum();
    let pairs = s.ranks.iter().flatten().filter(|op| matches!(op, Op::FB { .. })).count();
    // A background per rank, a box per op (two halves and a border per pair), five legend boxes.
    assert_eq!(svg.matches("<rect").count(), 1 + 8 + ops + 2 * pairs + 7);
    assert!(svg.contains("(PP/2-1)(F&amp;B+B-3W) = 6"));
}
