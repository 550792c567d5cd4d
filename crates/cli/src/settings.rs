//! Run settings from a config file (JSON or TOML) with command-line flags overriding them.
//! Unknown keys are an error that names the key and the file.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use whale_rl::parallel::model::tokenizer::Tokenizer;
use whale_rl::rollout::PromptTemplate;
use whale_rl::tasks::{jsonl_side, load_jsonl_split, Problem, Split, TaskSet};

/// A command's run settings: every key has a default, and a file may set any subset of them.
pub trait Settings: Serialize + DeserializeOwned + Default {
    /// Keys (dotted paths into nested tables) that [`Settings::derive`] sets from other keys, with
    /// where their value comes from. A file may hold one (a run's own `settings.json` does) only
    /// with the value it derives to; any other value is refused rather than overridden.
    const DERIVED: &'static [(&'static str, &'static str)] = &[];

    /// Sets the derived keys from the keys they follow.
    fn derive(&mut self) {}
}

/// What the main job's later stages (R1-Zero, R1, distillation) take from its pretraining
/// settings, so every row of its table trains on the same tasks and is evaluated on the same
/// held-out problems with the same number of samples, and one seed draws every stage's data.
#[derive(Debug, Clone, PartialEq)]
pub struct Shared {
    pub tasks: String,
    pub letters: f64,
    /// Pretraining's seed: every later stage's training streams (R1's and distillation's
    /// top-level `seed`, R1-Zero's `grpo.seed`).
    pub seed: u64,
    /// The held-out set's seed: pretraining's seed, whose problems it reported.
    pub eval_seed: u64,
    pub eval_problems: usize,
    pub k: usize,
    /// Problems of each validation, in the stages that validate (R1's RL stages).
    pub validation_problems: usize,
}

impl Shared {
    /// `s` with these values in its top-level keys of the same names (R1's and distillation's
    /// settings hold the first six; `validation_problems` goes where there is one, R1's), and its
    /// derived keys set from them again.
    pub fn lay_over<T: Settings>(&self, s: T) -> Result<T> {
        let mut value = serde_json::to_value(s).context("the settings")?;
        let mut shared = serde_json::json!({
            "tasks": self.tasks, "letters": self.letters, "seed": self.seed, "eval_seed": self.eval_seed,
            "eval_problems": self.eval_problems, "k": self.k,
        });
        if value.get("validation_problems").is_some() {
            shared["validation_problems"] = self.validation_problems.into();
        }
        overlay(&mut value, shared);
        let mut s: T = serde_json::from_value(value).context("the main job's shared settings")?;
        s.derive();
        Ok(s)
    }
}

/// The settings.json of the run in `out`, for --resume; a folder without one is no run to
/// continue.
pub fn run_settings<T: Settings>(out: &Path) -> Result<T> {
    let path = out.join("settings.json");
    if !path.exists() {
        bail!("--resume: {} has no settings.json; no run to continue there", out.display());
    }
    read_value(&path)
        .and_then(|file| from_value(file, Derived::AsRecorded))
        .with_context(|| format!("resuming: the run's settings {}", path.display()))
}

/// Reads `path` as JSON (`.json`) or TOML (anything else) onto `T`'s defaults. A nested table
/// overrides only the keys it holds: `[all_rl] steps = 40` keeps the stage's other defaults, not
/// those of the table's type. Unknown and derived keys are errors naming the key and the file.
pub fn load<T: Settings>(path: &Path) -> Result<T> {
    let file = read_value(path)?;
    from_value(file, Derived::Checked).with_context(|| format!("config file {}", path.display()))
}

/// What a file's derived keys do: a config file's are checked against the derivation, a run's
/// own settings.json keeps what it recorded (a run started by an earlier version, whose
/// derivation differed, resumes with its own values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Derived {
    Checked,
    AsRecorded,
}

/// A run's settings: with `resume` its own settings.json in `out` (a `config` file is refused:
/// a resumed run keeps what it started with), else `config`'s or the defaults.
pub fn for_run<T: Settings>(out: &Path, config: Option<&Path>, resume: bool) -> Result<T> {
    if resume {
        if config.is_some() {
            bail!("--resume continues with the run's own settings.json; drop --config");
        }
        return run_settings(out);
    }
    config.map_or_else(|| Ok(T::default()), load)
}

/// Checks the inputs a run is given against those it started with, recorded in `run_file`
/// (`run.json`): with `resume` each of `flags` must be the same (paths compared resolved:
/// `./runs/a` and `runs/a/` are the run's `runs/a`); a flag the record lacks (written before it
/// was recorded) is not compared. Returns whether to record `inputs` now: on a new run, or on a
/// resumed one stopped between its settings and its record.
pub fn check_run_inputs(run_file: &Path, inputs: &Value, flags: &[&str], resume: bool) -> Result<bool> {
    if !resume {
        return Ok(true);
    }
    let text = match std::fs::read_to_string(run_file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => bail!("{}: {e}", run_file.display()),
    };
    let recorded: Value = serde_json::from_str(&text).with_context(|| run_file.display().to_string())?;
    // Anything but an object would hold no flag, and every comparison would pass.
    if !recorded.is_object() {
        bail!("{}: not a JSON object of the run's inputs", run_file.display());
    }
    let same = |a: &Value, b: &Value| match (a.as_str(), b.as_str()) {
        (Some(a), Some(b)) => same_path(Path::new(a), Path::new(b)),
        _ => a == b,
    };
    for &flag in flags {
        if let Some(was) = recorded.get(flag).filter(|was| !same(was, &inputs[flag])) {
            bail!("--resume: --{flag} {} differs from the run's ({was}, in {})", inputs[flag], run_file.display());
        }
    }
    Ok(false)
}

/// A JSON file a run wrote (a stage's or an arm's record), errors naming it.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    serde_json::from_str(&text).with_context(|| path.display().to_string())
}

/// `path` as JSON (`.json`) or TOML (anything else).
fn read_value(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    let is_json = path.extension().is_some_and(|e| e == "json");
    let file: Result<Value> = if is_json {
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{e}"))
    } else {
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{e}"))
    };
    file.with_context(|| format!("config file {}", path.display()))
}

/// `file` laid over `T::default()` and read into `T`, with its derived keys set and checked
/// against any the file holds (or, `AsRecorded`, set back to them).
fn from_value<T: Settings>(file: Value, derived_keys: Derived) -> Result<T> {
    let mut merged = serde_json::to_value(T::default()).context("the default settings")?;
    overlay(&mut merged, file.clone());
    let mut settings: T = serde_path_to_error::deserialize(merged).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            anyhow::anyhow!("{inner}")
        } else {
            anyhow::anyhow!("`{path}`: {inner}")
        }
    })?;
    settings.derive();
    let mut derived = serde_json::to_value(&settings)?;
    let mut kept = false;
    for (key, from) in T::DERIVED {
        let (given, value) = (at(&file, key), at(&derived, key).cloned().unwrap_or(Value::Null));
        let Some(given) = given.filter(|&g| !same(g, &value)) else { continue };
        if derived_keys == Derived::Checked {
            bail!("`{key}` = {given}: {from}; this run's value is {value}");
        }
        println!("note: the run records `{key}` = {given} (derived as {value} now); it keeps its own");
        overlay(&mut derived, key.split('.').rev().fold(given.clone(), |v, part| serde_json::json!({ part: v })));
        kept = true;
    }
    if kept {
        settings = serde_json::from_value(derived).context("the run's settings")?;
    }
    Ok(settings)
}

/// The value at a dotted `key`.
fn at<'v>(v: &'v Value, key: &str) -> Option<&'v Value> {
    key.split('.').try_fold(v, |v, part| v.get(part))
}

/// Equal values, numbers by value (TOML's `0` and `0.0` alike).
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Sets every key of `over` in `base`, descending into tables both have.
fn overlay(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => overlay(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// What a `--resume` command line changes of the run's own settings (`was`): each key of `now`
/// with another value, outside `may_change` (dotted keys), as `--flag new (the run's: old)`.
/// Nested tables are compared key by key and named by their last key (`grpo.lr` is `--lr`).
pub fn changed_flags(was: &Value, now: &Value, may_change: &[&str]) -> Vec<String> {
    fn walk(was: &Value, now: &Value, prefix: &str, may_change: &[&str], out: &mut Vec<String>) {
        let Some(now) = now.as_object() else { return };
        for (k, v) in now {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            let old = was.get(k).unwrap_or(&Value::Null);
            if may_change.contains(&key.as_str()) {
                continue;
            } else if v.is_object() && old.is_object() {
                walk(old, v, &key, may_change, out);
            } else if !same(old, v) {
                out.push(format!("--{} {v} (the run's: {old})", k.replace('_', "-")));
            }
        }
    }
    let mut out = Vec::new();
    walk(was, now, "", may_change, &mut out);
    out
}

/// Whether two paths name the same file or folder (compared resolved where both exist:
/// `./runs/a`, `runs/a/` and an absolute path are one).
pub fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// `eval_problems` and `k` (samples per problem) as a run's held-out evaluation takes them:
/// zero of either would report 0.000 for a model that was never asked (`key_problems` and
/// `key_k` name them as the command does: a flag or a settings key).
pub fn check_evaluation(eval_problems: usize, k: usize, key_problems: &str, key_k: &str) -> Result<()> {
    if eval_problems == 0 {
        bail!("{key_problems} 0: the held-out evaluation would score no problem");
    }
    if k == 0 {
        bail!("{key_k} 0: pass@k and cons@k need at least one sample per problem");
    }
    // Each problem's samples are rows of one generation.
    if let Err(why) = whale_rl::parallel::trainer::check_batch_tokens(k, 1) {
        bail!("{key_k} {k}: {why}");
    }
    Ok(())
}

/// A run's validation, `problems` problems every `every` steps: none with validation on would
/// log 0.000 for a model never asked (`every` 0 turns it off).
pub fn check_validation(problems: usize, every: u64, key_problems: &str, key_every: &str) -> Result<()> {
    if problems == 0 && every > 0 {
        bail!("{key_problems} 0 with {key_every} {every}: the validation would score no problem (0 steps between validations turns it off)");
    }
    Ok(())
}

/// Refuses an RL stage's prompt template other than `plain` where the pipeline's other stages
/// (its SFT, its evaluations) read the prompts as they are: only `r1-zero` writes them in one.
pub fn plain_prompts_only(rl: &whale_rl::grpo::GrpoConfig, what: &str) -> Result<()> {
    if rl.template != PromptTemplate::Plain {
        bail!("{what}: `template` = {}: only r1-zero writes its prompts in a template", rl.template);
    }
    Ok(())
}

/// Every prompt of `problems` (from `source`, which errors name: `--data FILE`), written in
/// `template`, in `tok`'s ids, with room left for a completion in the model's `max_positions`:
/// checked when a run starts, not when a step first draws the prompt (or the evaluation after a
/// stage has trained).
pub fn check_prompts(
    tok: &dyn Tokenizer,
    max_positions: usize,
    problems: &[Problem],
    template: PromptTemplate,
    source: &str,
) -> Result<()> {
    let prompts = whale_rl::rollout::templated_prompts(tok, problems, template).with_context(|| source.to_string())?;
    check_prompt_room(&prompts, problems, max_positions, source)
}

/// Each of `prompts` (the ids of `problems`, from `source`) is shorter than the model's
/// positions, so a completion has room.
pub fn check_prompt_room(prompts: &[Vec<u32>], problems: &[Problem], max_positions: usize, source: &str) -> Result<()> {
    for (p, ids) in problems.iter().zip(prompts) {
        if ids.len() >= max_positions {
            bail!(
                "{source}: the prompt {:?} is {} tokens, and the model holds {max_positions} positions: no room for a \
                 completion",
                p.prompt,
                ids.len()
            );
        }
    }
    Ok(())
}

/// The prompts of a `--data` JSONL file to train on, saying on stderr how many of them are left
/// out for belonging to the held-out split the run evaluates on.
pub fn training_pool(path: &Path) -> Result<Vec<Problem>> {
    let (pool, held_out) = load_jsonl_split(path, Split::Train)?;
    if held_out > 0 {
        eprintln!(
            "note: {}: {held_out} of {} prompts are in the held-out split evaluation draws from; training leaves them out",
            path.display(),
            pool.len() + held_out
        );
    }
    Ok(pool)
}

/// The held-out problems a run scores.
#[derive(Debug)]
pub struct HeldOut {
    /// What the final evaluation scores: with a `--data` file, up to `n` of its prompts in the
    /// held-out split (those `training_pool` leaves out: the numbers then describe the user's
    /// data); otherwise, or when the file has none, `n` held-out problems of the tasks.
    pub test: Vec<Problem>,
    /// With such a file, what the validations score: up to `count` of its held-out prompts past
    /// `test` (none where `test` takes them all: validation off, with a note where it was asked
    /// for). `None`: the run validates on the tasks' held-out problems.
    pub data_validation: Option<Vec<Problem>>,
}

/// The held-out problems of a run ([`HeldOut`]): `n` for the final evaluation (the tasks' from
/// `seed` without a `--data` file), and a file's next `count` for the validations every `every`
/// steps, all read from the file once.
pub fn held_out_problems(
    data: Option<&Path>,
    tasks: &TaskSet,
    n: usize,
    seed: u64,
    (count, every): (usize, u64),
) -> Result<HeldOut> {
    if let Some(path) = data {
        let (held, _) = jsonl_side(path, Split::HeldOut)?;
        if !held.is_empty() {
            let mut held = held.into_iter();
            let test: Vec<Problem> = held.by_ref().take(n).collect();
            println!("held-out: {} prompts of {}", test.len(), path.display());
            let validation: Vec<Problem> = held.take(count).collect();
            if !validation.is_empty() {
                println!("validation: {} held-out prompts of {}", validation.len(), path.display());
            } else if count > 0 && every > 0 {
                eprintln!(
                    "note: no validation during training: the final evaluation's {} prompts take every held-out prompt of {}",
                    test.len(),
                    path.display()
                );
            }
            return Ok(HeldOut { test, data_validation: Some(validation) });
        }
        eprintln!("note: {} has no held-out prompts; the held-out problems are the tasks'", path.display());
    }
    Ok(HeldOut { test: tasks.held_out(n, seed), data_validation: None })
}

/// The prompt template an RL run wrote its prompts in, when `checkpoint` is `<run>/checkpoint`
/// of a `whale r1-zero` run (whose `<run>/settings.json` records `grpo.template`); `None` for
/// any other folder.
pub fn run_template(checkpoint: &Path) -> Option<PromptTemplate> {
    serde_json::from_value(settings_of_run(checkpoint)?.get("grpo")?.get("template")?.clone()).ok()
}

/// The settings.json of the run whose `<run>/checkpoint` is `checkpoint`; `None` for a folder of
/// another name, or without a readable one.
fn settings_of_run(checkpoint: &Path) -> Option<serde_json::Value> {
    if checkpoint.file_name()? != "checkpoint" {
        return None;
    }
    let text = std::fs::read_to_string(checkpoint.parent()?.join("settings.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// The `letters` share a base was pretrained with, when the base is `<run>/checkpoint` of a
/// `whale pretrain` run (whose `<run>/settings.json` records it); `None` for any other folder.
pub fn pretrained_letters(base: &Path) -> Option<f64> {
    settings_of_run(base)?.get("letters")?.as_f64()
}

/// A note on stderr when a run poses a `letters` share of its problems in letter numerals that
/// differs from the share its base was pretrained with: a digits-only base (`letters` 0) asked
/// letter-numeral problems is scored on text it never read, which is easy to miss.
pub fn note_letters_mismatch(base: &Path, letters: f64) {
    if let Some(pretrained) = pretrained_letters(base).filter(|&p| p != letters) {
        eprintln!(
            "note: {} was pretrained with letters = {pretrained}, but this run poses a share of {letters} of its \
             problems in letter numerals; set letters to {pretrained} to match",
            base.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::r1::R1Settings;

    fn r1(toml: &str) -> Result<R1Settings> {
        from_value(toml::from_str(toml).unwrap(), Derived::Checked)
    }

    #[test]
    fn only_r1_zero_writes_its_prompts_in_a_template() {
        let plain = whale_rl::grpo::GrpoConfig::default();
        assert!(plain_prompts_only(&plain, "x").is_ok());
        let templated = whale_rl::grpo::GrpoConfig { template: PromptTemplate::R1, ..plain };
        let err = plain_prompts_only(&templated, "the r1 settings' [all_rl]").unwrap_err().to_string();
        assert!(err.contains("[all_rl]") && err.contains("only r1-zero"), "{err}");
    }

    #[test]
    fn a_partial_table_keeps_the_commands_defaults_for_its_other_keys() {
        let s = r1("tasks = \"add:3\"\n[all_rl]\nsteps = 7\n[cold_start.sft]\nsteps = 3\n").unwrap();
        let d = R1Settings::default();
        assert_eq!(s.all_rl.steps, 7);
        // R1's stage-4 learning rate, not GrpoConfig's default (1e-4).
        assert_eq!((s.all_rl.lr, s.all_rl.prompts_per_step), (d.all_rl.lr, d.all_rl.prompts_per_step));
        assert_eq!(s.reasoning_rl.rewards, "accuracy,format:0.1,language");
        assert_eq!((s.cold_start.sft.steps, s.cold_start.sft.lr, s.cold_start.problems), (3, 1e-3, 384));
        // The RL stages follow the top-level tasks.
        assert_eq!((s.reasoning_rl.tasks.as_str(), s.all_rl.tasks.as_str()), ("add:3", "add:3,reverse:3-5"));
    }

    #[test]
    fn derived_keys_are_refused_unless_they_hold_the_derived_value() {
        let err = r1("[all_rl]\ntasks = \"add:1\"\n").unwrap_err().to_string();
        assert!(err.contains("`all_rl.tasks`") && err.contains("non_reasoning"), "{err}");
        let err = r1("letters = 0.5\n[reasoning_rl]\nletters = 0\n").unwrap_err().to_string();
        assert!(err.contains("`reasoning_rl.letters`"), "{err}");
        // A run's own settings.json holds them with their derived values: it loads back unchanged.
        let s = r1("tasks = \"add:4\"\nletters = 0\n").unwrap();
        let again: R1Settings = from_value(serde_json::to_value(&s).unwrap(), Derived::Checked).unwrap();
        assert_eq!(serde_json::to_value(&again).unwrap(), serde_json::to_value(&s).unwrap());
        assert_eq!(r1("letters = 0\n[all_rl]\nletters = 0.0\n").unwrap().all_rl.letters, 0.0);
    }

    #[test]
    fn the_main_jobs_shared_keys_reach_every_stage_and_what_derives_from_them() {
        let shared = Shared {
            tasks: "add:3".into(),
            letters: 0.5,
            seed: 5,
            eval_seed: 9,
            eval_problems: 12,
            k: 4,
            validation_problems: 6,
        };
        let s = shared.lay_over(r1("[all_rl]\nsteps = 7\n").unwrap()).unwrap();
        assert_eq!((s.tasks.as_str(), s.letters, s.eval_seed, s.eval_problems, s.k), ("add:3", 0.5, 9, 12, 4));
        assert_eq!(s.validation_problems, 6);
        assert_eq!((s.reasoning_rl.tasks.as_str(), s.all_rl.tasks.as_str()), ("add:3", "add:3,reverse:3-5"));
        assert_eq!((s.reasoning_rl.letters, s.all_rl.letters, s.all_rl.steps), (0.5, 0.5, 7));
        assert_eq!((s.seed, s.cold_start.sft.seed, s.all_rl.seed), (5, 5, 5 ^ crate::r1::SECOND_PASS_SALT));
        let d = crate::distill::DistillSettings::default();
        let s = shared.lay_over(d).unwrap();
        assert_eq!((s.tasks.as_str(), s.letters, s.eval_seed, s.eval_problems, s.k), ("add:3", 0.5, 9, 12, 4));
        assert_eq!((s.rl.tasks.as_str(), s.rl.letters), ("add:3", 0.5));
        // Distillation's streams (the student's pretraining, its SFT, the RL-only arm) too.
        assert_eq!([s.seed, s.student_pretrain.seed, s.sft.seed, s.rl.seed], [5; 4]);
    }

    /// R1's top-level seed is every stage's: the cold-start and rejection SFT batches and both RL
    /// stages' rollouts draw from it (they had kept seed 0 whatever `seed` said), stages 3 and 4
    /// salted (they would replay stages 1 and 2's streams), and a stage seed of its own is
    /// refused, naming the key.
    #[test]
    fn r1s_seed_reaches_every_stage() {
        use crate::r1::SECOND_PASS_SALT;
        let s = r1("seed = 7\n").unwrap();
        let seeds = [s.cold_start.sft.seed, s.reasoning_rl.seed, s.rejection.sft.seed, s.all_rl.seed];
        assert_eq!(seeds, [7, 7, 7 ^ SECOND_PASS_SALT, 7 ^ SECOND_PASS_SALT]);
        let err = r1("seed = 7\n[reasoning_rl]\nseed = 3\n").unwrap_err().to_string();
        assert!(err.contains("`reasoning_rl.seed`") && err.contains("top-level `seed`"), "{err}");
        let err = r1("seed = 7\n[all_rl]\nseed = 7\n").unwrap_err().to_string();
        assert!(err.contains("`all_rl.") && err.contains("this run's value is"), "{err}");
        let derived = format!("seed = 7\n[all_rl]\nseed = {}\n", 7 ^ SECOND_PASS_SALT);
        assert_eq!(r1(&derived).unwrap().all_rl.seed, 7 ^ SECOND_PASS_SALT, "the derived value loads back");
    }

    #[test]
    fn unknown_and_mistyped_keys_are_named_with_their_table() {
        let err = r1("[reasoning_rl]\nlearning_rate = 0.1\n").unwrap_err().to_string();
        assert!(err.contains("reasoning_rl") && err.contains("learning_rate"), "{err}");
        let err = r1("[cold_start.sft]\nsteps = \"ten\"\n").unwrap_err().to_string();
        assert!(err.contains("cold_start.sft.steps"), "{err}");
    }

    #[test]
    fn a_pretrain_runs_letters_are_read_next_to_its_checkpoint() {
        let run = std::env::temp_dir().join(format!("whale-letters-{}", std::process::id()));
        std::fs::create_dir_all(run.join("checkpoint")).unwrap();
        let ckpt = run.join("checkpoint");
        assert_eq!(pretrained_letters(&ckpt), None, "no settings.json yet");
        std::fs::write(run.join("settings.json"), r#"{"tasks": "add", "letters": 0.0}"#).unwrap();
        assert_eq!(pretrained_letters(&ckpt), Some(0.0));
        assert_eq!(pretrained_letters(&run), None, "only a folder named checkpoint is a run's base");
        std::fs::write(run.join("settings.json"), r#"{"grpo": {"letters": 0.5}}"#).unwrap();
        assert_eq!(pretrained_letters(&ckpt), None, "not a pretrain run's settings");
        std::fs::write(run.join("settings.json"), "{ not json").unwrap();
        assert_eq!(pretrained_letters(&ckpt), None);
        std::fs::remove_dir_all(&run).unwrap();
    }

    /// A run started by an earlier version recorded derived keys this one derives otherwise (R1
    /// stage 4's seed was the top-level one, its language weight 0.5): it resumes with its own,
    /// where a config file with them is refused.
    #[test]
    fn a_runs_own_settings_keep_the_derived_values_it_recorded() {
        let run = whale_rl::parallel::model::tensor::testing::TempDir::new("old-r1-run");
        let old = r#"{"seed": 7, "all_rl": {"seed": 7, "rewards": "accuracy,format:0.1,language:0.5"}}"#;
        std::fs::write(run.join("settings.json"), old).unwrap();
        let s: R1Settings = run_settings(&run).unwrap();
        assert_eq!((s.all_rl.seed, s.all_rl.rewards.as_str()), (7, "accuracy,format:0.1,language:0.5"));
        assert_eq!(s.rejection.sft.seed, 7 ^ crate::r1::SECOND_PASS_SALT, "what it did not record is derived");
        let err = format!("{:#}", load::<R1Settings>(&run.join("settings.json")).unwrap_err());
        assert!(err.contains("`all_rl.") && err.contains("this run's value is"), "{err}");
    }

    #[test]
    fn a_run_record_is_compared_flag_by_flag_and_must_be_an_object() {
        let run = whale_rl::parallel::model::tensor::testing::TempDir::new("run-record");
        let file = run.join("run.json");
        let inputs = serde_json::json!({"from": run.to_str().unwrap(), "data": null});
        assert!(check_run_inputs(&file, &inputs, &["from"], true).unwrap(), "no record: record now");
        let spelled_otherwise = serde_json::json!({"from": format!("{}/./", run.display())});
        std::fs::write(&file, spelled_otherwise.to_string()).unwrap();
        assert!(!check_run_inputs(&file, &inputs, &["from", "data"], true).unwrap(), "the same path");
        std::fs::write(&file, r#"{"from": "runs/b"}"#).unwrap();
        let err = check_run_inputs(&file, &inputs, &["from"], true).unwrap_err().to_string();
        assert!(err.contains("--from") && err.contains("runs/b"), "{err}");
        for bad in ["[]", "\"runs/a\"", "null"] {
            std::fs::write(&file, bad).unwrap();
            let err = check_run_inputs(&file, &inputs, &["from"], true).unwrap_err().to_string();
            assert!(err.contains("run.json") && err.contains("not a JSON object"), "{bad}: {err}");
        }
    }

    #[test]
    fn an_evaluation_is_checked_for_problems_and_samples() {
        assert!(check_evaluation(4, 2, "--eval-problems", "--k").is_ok());
        for (n, k, words) in [(0, 2, "--eval-problems 0"), (4, 0, "--k 0"), (4, usize::MAX / 2, "positions")] {
            let err = check_evaluation(n, k, "--eval-problems", "--k").unwrap_err().to_string();
            assert!(err.contains(words), "{err}");
        }
        // A validation of no problems is refused while it is on, and is no validation when off.
        assert!(check_validation(4, 20, "--validation-problems", "--eval-every").is_ok());
        assert!(check_validation(0, 0, "--validation-problems", "--eval-every").is_ok());
        let err = check_validation(0, 20, "--validation-problems", "--eval-every").unwrap_err().to_string();
        assert!(err.contains("--validation-problems 0 with --eval-every 20"), "{err}");
    }

    /// A --data run validates on the file's held-out prompts that follow the final evaluation's:
    /// none of them scored twice, none trained on.
    #[test]
    fn a_data_run_validates_on_held_out_prompts_the_final_evaluation_leaves() {
        let dir = whale_rl::parallel::model::tensor::testing::TempDir::new("data-validation");
        let path = dir.join("data.jsonl");
        let lines: Vec<String> =
            (0..400).map(|i| format!(r#"{{"prompt": "{i}+{}=", "answer": "{}"}}"#, i % 7, i + i % 7)).collect();
        std::fs::write(&path, lines.join("\n")).unwrap();
        let tasks = TaskSet::parse("add:1").unwrap();
        let (held, _) = jsonl_side(&path, Split::HeldOut).unwrap();
        assert!(held.len() > 12, "the split holds some of 400 prompts out: {}", held.len());
        let held_out = held_out_problems(Some(&path), &tasks, 8, 1, (4, 10)).unwrap();
        let (test, validation) = (held_out.test, held_out.data_validation.unwrap());
        let prompts = |p: &[Problem]| p.iter().map(|q| q.prompt.clone()).collect::<Vec<_>>();
        assert_eq!(prompts(&test), prompts(&held[..8]));
        assert_eq!(prompts(&validation), prompts(&held[8..12]), "the next held-out prompts");
        let train = prompts(&training_pool(&path).unwrap());
        assert!(validation.iter().all(|p| !train.contains(&p.prompt)), "none is trained on");
        // The final evaluation takes every held-out prompt: no validation, and not the tasks'.
        let all = held_out_problems(Some(&path), &tasks, held.len(), 1, (4, 10)).unwrap();
        assert_eq!(all.data_validation.map(|v| v.len()), Some(0));
        // Without --data, or a file with no held-out prompt, the tasks' validation.
        let no_file = held_out_problems(None, &tasks, 8, 1, (4, 10)).unwrap();
        assert!(no_file.data_validation.is_none());
        let one = dir.join("one.jsonl");
        let train_only = lines.iter().find(|l| {
            std::fs::write(&one, l.as_str()).unwrap();
            jsonl_side(&one, Split::HeldOut).unwrap().0.is_empty()
        });
        std::fs::write(&one, train_only.unwrap().as_str()).unwrap();
        assert!(held_out_problems(Some(&one), &tasks, 8, 1, (4, 10)).unwrap().data_validation.is_none());
    }
}
