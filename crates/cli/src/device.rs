//! `--device`: where a command's models live and compute.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use whale_rl::parallel::model::tensor::{DType, Device};
use whale_rl::parallel::model::tokenizer::{tokenizer_for, Tokenizer};
use whale_rl::parallel::model::{load_pretrained, moved_to, CausalLm};
use whale_rl::parallel::trainer::Precision;

/// `--device`: cpu, cuda or cuda:N, opened (an error that names the flag and says why when the
/// GPU cannot be used).
pub fn open(flag: &str) -> Result<Device> {
    let ordinal = match flag {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => n,
            None => bail!("--device {other}: expected cpu, cuda or cuda:N"),
        },
    };
    Device::cuda(ordinal).with_context(|| format!("--device {flag}"))
}

/// An optional `--device` (absent: the CPU), opened as [`open`] does.
pub fn open_or_cpu(flag: Option<&str>) -> Result<Device> {
    open(flag.unwrap_or("cpu"))
}

/// `--precision` of the commands that run a model they do not pretrain (absent: fp32): the
/// dtype it computes in, the weights (and any optimizer state) staying f32, as pretraining's
/// `--precision bf16`. fp8 is an error saying where FP8 GEMMs are (`fp8_is`).
pub fn compute_dtype(flag: Option<&str>, fp8_is: &str) -> Result<DType> {
    let flag = flag.unwrap_or("fp32");
    match Precision::parse(flag) {
        Ok(Precision::Fp32) => Ok(DType::F32),
        Ok(Precision::Bf16) => Ok(DType::BF16),
        Ok(Precision::Fp8) => bail!("--precision fp8: this command computes in fp32 or bf16 ({fp8_is})"),
        Err(_) => bail!("--precision {flag}: expected fp32 or bf16"),
    }
}

/// [`compute_dtype`] of the post-training commands (r1-zero, r1, distill).
pub fn post_training_dtype(flag: Option<&str>) -> Result<DType> {
    compute_dtype(flag, "FP8 GEMMs are pretraining's recipe")
}

/// The checkpoint at `dir` (`what` it is, for errors), its weights on `device`.
pub fn load(dir: &Path, device: &Device, what: &str) -> Result<Box<dyn CausalLm>> {
    let model = load_pretrained(dir).with_context(|| format!("loading {what} from {}", dir.display()))?;
    moved_to(model, device).with_context(|| format!("moving {what} to {device:?}"))
}

/// The tokenizer of the checkpoint at `dir` (`what` it is, for errors): its `tokenizer.json`
/// (an HF model's), else the character tokenizer of our own runs.
pub fn tokenizer(dir: &Path, what: &str) -> Result<Arc<dyn Tokenizer>> {
    require_checkpoint(dir, what)?;
    Ok(tokenizer_for(dir).with_context(|| format!("the tokenizer of {what} ({})", dir.display()))?.into())
}

/// Refuses a folder without config.json (`what` it should be), before any work: it would read
/// as the character tokenizer, and a mistyped path would fail only when its model is loaded,
/// perhaps after a stage's sampling.
pub fn require_checkpoint(dir: &Path, what: &str) -> Result<()> {
    if !dir.join("config.json").is_file() {
        bail!("{what} ({}): no config.json there, so not a model checkpoint", dir.display());
    }
    Ok(())
}

/// The positions the checkpoint at `dir` (`what` it is) holds, as its model will read them
/// (its config's `max_position_embeddings` or its family's default), without loading its weights.
pub fn max_positions(dir: &Path, what: &str) -> Result<usize> {
    whale_rl::parallel::model::lm::checkpoint_max_positions(dir)
        .with_context(|| format!("reading {what} at {}", dir.display()))
}

/// Refuses a tokenizer with ids `model` (from `dir`, `what` it is) has no embedding for.
pub fn check_fits(tok: &dyn Tokenizer, model: &dyn CausalLm, dir: &Path, what: &str) -> Result<()> {
    if tok.vocab_size() > model.vocab_size() {
        bail!(
            "{what} ({}): the tokenizer has {} ids but the model only {} embeddings",
            dir.display(),
            tok.vocab_size(),
            model.vocab_size()
        );
    }
    Ok(())
}

/// The checkpoint at `dir` on `device` ([`load`]) and its [`tokenizer`], which must fit it.
pub fn load_with_tokenizer(dir: &Path, device: &Device, what: &str) -> Result<(Box<dyn CausalLm>, Arc<dyn Tokenizer>)> {
    let model = load(dir, device, what)?;
    let tok = tokenizer(dir, what)?;
    check_fits(&*tok, &*model, dir, what)?;
    Ok((model, tok))
}

/// Whether two tokenizers read text alike: the same vocabulary size, stop tokens and ids for a
/// probe of the tasks' template.
pub fn same_tokenizer(a: &dyn Tokenizer, b: &dyn Tokenizer) -> bool {
    let probe = "12+7=<think>2+7=9</think><answer>19</answer>";
    a.vocab_size() == b.vocab_size() && a.stop_ids() == b.stop_ids() && a.encode(probe).ok() == b.encode(probe).ok()
}
