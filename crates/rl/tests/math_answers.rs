//! whale_rl's MATH answer grader against the reference's own code (lm-evaluation-harness's
//! `hendrycks_math` `strip_string` and `is_equiv`, run by scripts/make_math_answer_reference.py):
//! the normal form of each case, or that the reference raised, the verdict on every pair of the
//! hand-written cases, and which characters around an integer Python's `int()` reads.

use whale_rl::tasks::math_answer::{equivalent, normalize};

fn fixture() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/math_answers/expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn normal_forms_match_the_reference() {
    let f = fixture();
    let cases = f["strip_string"].as_array().unwrap();
    assert!(cases.len() > 2000);
    let mut raised = 0;
    for case in cases {
        let (answer, want) = (case[0].as_str().unwrap(), case[1].as_str());
        raised += usize::from(want.is_none());
        assert_eq!(normalize(answer).as_deref(), want, "normal form of {answer:?}");
    }
    assert!(raised > 100 && raised < cases.len() / 2, "both outcomes covered: {raised} raise");
}

#[test]
fn verdicts_on_every_pair_match_the_reference() {
    let f = fixture();
    let hand: Vec<&str> = f["hand"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    let rows = f["is_equiv"].as_array().unwrap();
    assert_eq!(rows.len(), hand.len());
    let mut same = 0;
    for (a, row) in hand.iter().zip(rows) {
        let row = row.as_str().unwrap().as_bytes();
        for (b, &verdict) in hand.iter().zip(row) {
            same += usize::from(verdict == b'1');
            assert_eq!(equivalent(a, b), verdict == b'1', "is_equiv({a:?}, {b:?})");
        }
    }
    assert!(same > 2 * hand.len(), "pairs beyond the diagonal are equivalent: {same}");
}

#[test]
fn characters_around_an_integer_are_read_as_the_reference_python_reads_them() {
    // Python's `int()` reads the decimal digits of every script and strips Unicode's whitespace;
    // a side of `a/b` it refuses makes the grader compare as written. Every character, in front
    // of and behind the `5` of `5/1`.
    let f = fixture();
    let listed = |key: &str| -> std::collections::HashSet<u32> {
        f[key].as_array().unwrap().iter().map(|c| c.as_u64().unwrap() as u32).collect()
    };
    let before: fn(char) -> String = |c| format!("{c}5/1");
    let behind: fn(char) -> String = |c| format!("5{c}/1");
    for (key, place) in [("reads_before_5", before), ("reads_behind_5", behind)] {
        let read = listed(key);
        assert!(read.len() > 600, "{key}: the digits of every script and the spaces");
        for c in (0..=char::MAX as u32).filter_map(char::from_u32) {
            assert_eq!(normalize(&place(c)).is_some(), read.contains(&(c as u32)), "{key}: U+{:04X}", c as u32);
        }
    }
}
