//! Answers compared as the MATH benchmark grades them (Hendrycks et al. 2021, `is_equiv`, as
//! lm-evaluation-harness's `hendrycks_math` task runs it): both answers rewritten to one normal
//! form (`\dfrac12`, `0.5` and `1/2` all become `\frac{1}{2}`; `k = 5` becomes `5`; units,
//! degrees, percent and dollar signs go), then compared as text. Where the reference's rewriting
//! raises (a `\sqrt` or `\frac` with nothing after it, two `\text{ ` units, an `a/b` whose side
//! Python's `int()` cannot read), the answers compare as written.
//!
//! Bit for bit with the reference: crates/rl/tests/math_answers.rs checks the normal form of
//! some 2,700 answers, every pair of a hundred, and which `a/b` every character before a digit
//! turns into a fallback, against the reference's own code under Python 3.11
//! (scripts/make_math_answer_reference.py).

/// The grader's normal form of `answer`, rule by rule in the reference's order; `None` where the
/// reference raises.
pub fn normalize(answer: &str) -> Option<String> {
    let mut s = answer.replace('\n', "");
    // Negative thin spaces, doubled backslashes, text- and display-style fractions, delimiter
    // sizing, degrees, dollars.
    for (from, to) in [
        ("\\!", ""),
        ("\\\\", "\\"),
        ("tfrac", "frac"),
        ("dfrac", "frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\$", ""),
    ] {
        s = s.replace(from, to);
    }
    s = without_units(s)?;
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.");
    if s.is_empty() {
        return Some(s);
    }
    if s.starts_with('.') {
        s.insert(0, '0');
    }
    // `k = 5` and `x=5` are `5`: one `=` with at most two characters (not bytes) before it.
    if let Some((name, value)) = s.split_once('=') {
        if !value.contains('=') && name.chars().count() <= 2 {
            s = value.to_string();
        }
    }
    s = braced_sqrt(&s)?.replace(' ', "");
    s = braced_fracs(s)?;
    if s == "0.5" {
        s = "\\frac{1}{2}".to_string();
    }
    slash_as_frac(s)
}

/// Whether two answers are the same: their normal forms ([`normalize`]) are equal, or, where
/// either has none, their texts are.
pub fn equivalent(a: &str, b: &str) -> bool {
    match (normalize(a), normalize(b)) {
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    }
}

/// Everything before a unit written `\text{ unit}` (the reference assumes MATH writes a unit with
/// that leading space and nothing else does); more than one such unit raises.
fn without_units(s: String) -> Option<String> {
    let mut parts = s.split("\\text{ ");
    let before = parts.next().unwrap_or_default();
    match (parts.next(), parts.next()) {
        (None, _) => Some(s),
        (Some(_), None) => Some(before.to_string()),
        (Some(_), Some(_)) => None,
    }
}

/// `\sqrt3` as `\sqrt{3}`: a `\sqrt` whose argument is one character gets braces. A `\sqrt` at
/// the end raises.
fn braced_sqrt(s: &str) -> Option<String> {
    let mut parts = s.split("\\sqrt");
    let mut out = parts.next().unwrap_or_default().to_string();
    for part in parts {
        let mut chars = part.chars();
        match chars.next()? {
            '{' => out.push_str("\\sqrt{"),
            c => out.push_str(&format!("\\sqrt{{{c}}}")),
        }
        out.push_str(chars.as_str());
    }
    Some(out)
}

/// `\frac12` as `\frac{1}{2}` and `\frac1{72}` as `\frac{1}{72}`: a `\frac` not followed by a
/// brace gets braces around its next character, and around the one after unless that opens a
/// brace. A `\frac` at the end raises; one followed by a single character leaves the whole
/// string as it was.
fn braced_fracs(s: String) -> Option<String> {
    let mut parts = s.split("\\frac");
    let mut out = parts.next().unwrap_or_default().to_string();
    for part in parts {
        out.push_str("\\frac");
        let mut chars = part.chars();
        let a = chars.next()?;
        if a == '{' {
            out.push_str(part);
            continue;
        }
        let Some(b) = chars.next() else { return Some(s) };
        if b == '{' {
            out.push_str(&format!("{{{a}}}{{"));
        } else {
            out.push_str(&format!("{{{a}}}{{{b}}}"));
        }
        out.push_str(chars.as_str());
    }
    Some(out)
}

/// `3/4` as `\frac{3}{4}`: a string with one `/` between two integers written canonically
/// (no sign but a leading `-`, no leading zeros, no `-0`). A side that Python's `int()` refuses
/// raises; one it reads but that is not canonical (`03`, `+3`, `1_0`, `٣`) leaves the string.
fn slash_as_frac(s: String) -> Option<String> {
    let Some((a, b)) = s.split_once('/') else { return Some(s) };
    if b.contains('/') {
        return Some(s);
    }
    if !python_int_reads(a) || !python_int_reads(b) {
        return None;
    }
    Some(if canonical_integer(a) && canonical_integer(b) { format!("\\frac{{{a}}}{{{b}}}") } else { s })
}

/// Whether `s` is how Python writes an integer: `-` or nothing, then `0` or ASCII digits not
/// starting with `0`; not `-0`.
fn canonical_integer(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let ascii = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    ascii && (s == "0" || !digits.starts_with('0'))
}

/// Whether Python's `int(s)` (base 10) reads `s`: whitespace around, an optional sign, then
/// decimal digits of any script, single underscores allowed between them, and at most 4,300
/// digits (Python's `sys.get_int_max_str_digits()` since 3.11, underscores not counted).
fn python_int_reads(s: &str) -> bool {
    // `int()` strips Unicode's White_Space, which is Rust's: not all of `str.isspace`, whose
    // ASCII separators U+001C..U+001F it refuses.
    let s = s.trim_matches(char::is_whitespace);
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    let runs = || digits.split('_');
    !digits.is_empty()
        && runs().all(|run| !run.is_empty() && run.chars().all(decimal_digit))
        && runs().map(|run| run.chars().count()).sum::<usize>() <= PYTHON_INT_MAX_STR_DIGITS
}

const PYTHON_INT_MAX_STR_DIGITS: usize = 4300;

/// Whether `c` is a decimal digit (Unicode Numeric_Type=Decimal, which Python's `int()` reads):
/// one of the runs of ten from each zero below.
fn decimal_digit(c: char) -> bool {
    let c = c as u32;
    DECIMAL_ZEROS.iter().any(|&zero| (zero..zero + 10).contains(&c))
}

/// The zero of every run of ten decimal digits in Unicode 14.0 (Python 3.11's `unicodedata`).
const DECIMAL_ZEROS: [u32; 66] = [
    0x30, 0x660, 0x6F0, 0x7C0, 0x966, 0x9E6, 0xA66, 0xAE6, 0xB66, 0xBE6, 0xC66, 0xCE6, 0xD66, 0xDE6, 0xE50, 0xED0,
    0xF20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80, 0x1A90, 0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620,
    0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0, 0xFF10, 0x104A0, 0x10D30, 0x11066, 0x110F0, 0x11136, 0x111D0,
    0x112F0, 0x11450, 0x114D0, 0x11650, 0x116C0, 0x11730, 0x118E0, 0x11950, 0x11C50, 0x11D50, 0x11DA0, 0x16A60,
    0x16AC0, 0x16B50, 0x1D7CE, 0x1D7D8, 0x1D7E2, 0x1D7EC, 0x1D7F6, 0x1E140, 0x1E2F0, 0x1E950, 0x1FBF0,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_value_are_equivalent() {
        for (a, b) in [
            ("\\dfrac12", "\\frac{1}{2}"),
            ("0.5", "1/2"),
            ("k = 5", "5"),
            ("90^\\circ", "90"),
            ("\\$10", "10"),
            ("5 \\text{ cm}", "5"),
            ("\\left( 1, 2 \\right)", "(1,2)"),
            ("2\\sqrt3", "2 \\sqrt{3}"),
        ] {
            assert!(equivalent(a, b), "{a} and {b}");
        }
        for (a, b) in [("\\frac{1}{3}", "\\frac{1}{2}"), ("10%", "10"), ("03/4", "3/4"), ("abc=5", "5")] {
            assert!(!equivalent(a, b), "{a} and {b}");
        }
    }

    #[test]
    fn where_the_reference_raises_answers_compare_as_written() {
        for raising in ["\\sqrt", "\\frac", "x/4", "1__0/3", "\\text{ a}\\text{ b}"] {
            assert_eq!(normalize(raising), None, "{raising}");
            assert!(equivalent(raising, raising));
        }
        // `x/4` has no normal form, so it is not `x/4 ` either, though both lose their spaces.
        assert!(!equivalent("x/4", "x/4 "));
        assert!(equivalent("4", "4 "));
    }

    #[test]
    fn python_int_reads_what_python_reads() {
        for yes in ["7", "-7", "+7", "007", "1_000", " 7\t", "\u{663}", "\u{1d7ce}\u{1d7cf}", "\u{3000}5\u{85}"] {
            assert!(python_int_reads(yes), "{yes:?}");
        }
        for no in ["", "-", "_1", "1_", "1__0", "- 1", "1.0", "x", "\u{bd}", "\u{2153}", "\u{1c}5", "5\u{1f}"] {
            assert!(!python_int_reads(no), "{no:?}");
        }
        // Python's limit on digits, leading zeros counted, underscores and the sign not.
        let digits = |n: usize| "1".repeat(n);
        assert!(python_int_reads(&digits(4300)) && python_int_reads(&format!("-{}", digits(4300))));
        assert!(!python_int_reads(&digits(4301)) && !python_int_reads(&format!("0{}", digits(4300))));
        assert!(python_int_reads(&format!("1_{}", digits(4299))));
        assert!(canonical_integer("0") && canonical_integer("-12") && canonical_integer("120"));
        assert!(!canonical_integer("-0") && !canonical_integer("01") && !canonical_integer("+1"));
    }
}
