//! safetensors checkpoints with HF tensor names: single files and sharded ones
//! (`model.safetensors.index.json`), memory-mapped on load, written atomically on save.
//!
//! DeepSeek-V3's FP8 releases (spec 4.3) load too: every `F8_E4M3` weight `X.weight` comes with
//! `X.weight_scale_inv` (f32, one per 128x128 block, the dequantisation multiplier). By default
//! the pair is dequantised to f32 on load (`W = float(Wq) * s[i / 128, j / 128]`) and the scale
//! dropped; [`Fp8Weights::Keep`] keeps both as they are, for FP8 inference, and saving writes FP8
//! tensors back as FP8. [`quantize_fp8_release`] turns a model's weights into that format.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use whale_tensor::fp8::{Fp8Format, ScaleFormat};
use whale_tensor::{DType, Device, Tensor};

use crate::{Error, Result};

/// Reads every tensor of one safetensors file (memory-mapped). f32, bf16 and f16 keep their
/// dtype; i64/u32 index tensors load as such; FP8 weights are dequantised with their
/// `weight_scale_inv` (which must be in the same file; [`load_dir`] pairs across shards).
pub fn load_file(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let mut tensors = load_file_raw(path)?;
    resolve_fp8(&mut tensors, FP8_BLOCK, &TensorFiles::from(path.to_path_buf()), Fp8Weights::Dequantize)?;
    Ok(tensors)
}

/// Which file holds each tensor of a loaded checkpoint, so that an error about a tensor names
/// the shard it is in. A name no file holds (a tensor the config wants and the checkpoint
/// lacks) is reported under `path`: the single file, or the index of a sharded checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorFiles {
    pub path: PathBuf,
    shard: HashMap<String, PathBuf>,
}

impl TensorFiles {
    /// The file to name in an error about tensor `name`.
    pub fn of(&self, name: &str) -> &Path {
        self.shard.get(name).unwrap_or(&self.path)
    }

    /// An error about tensor `name`, naming its file.
    pub fn error(&self, name: &str, msg: impl Into<String>) -> Error {
        Error::Checkpoint { path: self.of(name).to_path_buf(), name: name.to_string(), msg: msg.into() }
    }
}

impl TensorFiles {
    /// The tensors of a model being copied to `device` (named so in errors).
    pub fn copy_on(device: &Device) -> Self {
        TensorFiles::from(PathBuf::from(format!("<copy on {device:?}>")))
    }
}

/// Every tensor in one file.
impl From<PathBuf> for TensorFiles {
    fn from(path: PathBuf) -> Self {
        TensorFiles { path, shard: HashMap::new() }
    }
}

/// What loading does with a checkpoint's FP8 weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fp8Weights {
    /// Replace each FP8 weight and its scales by the f32 weight they stand for.
    #[default]
    Dequantize,
    /// Keep the codes (dtype F8E4M3/F8E5M2) and `*_scale_inv`, checked against each other.
    Keep,
}

/// DeepSeek-V3's `weight_block_size`.
pub const FP8_BLOCK: (usize, usize) = (128, 128);

/// The tensors of one safetensors file as stored: FP8 codes and their `weight_scale_inv` kept
/// apart ([`load_file`] dequantises them).
pub fn load_file_raw(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let file = File::open(path).map_err(|e| Error::file(path, e))?;
    // SAFETY: the mapping is read-only and dropped before this function returns; a concurrent
    // truncation of the file by another process is outside what we guard against (as every
    // mmap-based loader).
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::file(path, e))?;
    let st = SafeTensors::deserialize(&mmap).map_err(|e| Error::file(path, format!("not a safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let t =
            to_tensor(&view).map_err(|msg| Error::Checkpoint { path: path.to_path_buf(), name: name.clone(), msg })?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Checks every FP8 weight against its `weight_scale_inv` and, when asked, dequantises the pair.
fn resolve_fp8(
    tensors: &mut BTreeMap<String, Tensor>,
    block: (usize, usize),
    files: &TensorFiles,
    mode: Fp8Weights,
) -> Result<()> {
    let err = |name: &str, msg: String| files.error(name, msg);
    let fp8: Vec<String> =
        tensors.iter().filter(|(_, t)| t.dtype().fp8_format().is_some()).map(|(n, _)| n.clone()).collect();
    for name in &fp8 {
        if mode == Fp8Weights::Keep && block != FP8_BLOCK {
            return Err(err(name, format!("FP8 inference needs {FP8_BLOCK:?} blocks; config.json declares {block:?}")));
        }
        let scale_name = format!("{name}_scale_inv");
        let scale = tensors
            .get(&scale_name)
            .ok_or_else(|| err(name, format!("is FP8 but `{scale_name}` (its block scales) is missing")))?;
        let q = &tensors[name];
        let [rows, cols] = q.dims()[..] else {
            return Err(err(name, format!("FP8 weights must be 2-D, got {:?}", q.dims())));
        };
        let grid = [rows.div_ceil(block.0), cols.div_ceil(block.1)];
        if scale.dims() != grid {
            return Err(err(
                &scale_name,
                format!("has shape {:?}; a [{rows}, {cols}] weight in {block:?} blocks needs {grid:?}", scale.dims()),
            ));
        }
        if mode == Fp8Weights::Dequantize {
            let w = Tensor::dequantize_fp8(q, scale, block).map_err(|e| err(name, e.to_string()))?;
            tensors.remove(&scale_name);
            tensors.insert(name.clone(), w);
        }
    }
    let orphan =
        tensors.keys().find(|k| k.strip_suffix("_scale_inv").is_some_and(|base| !fp8.iter().any(|n| n == base)));
    if let Some(orphan) = orphan {
        return Err(err(orphan, "is a block scale without an FP8 weight".into()));
    }
    Ok(())
}

/// The names DeepSeek-V3's FP8 release quantizes (spec 4.3): the 2-D projection and expert
/// weights; not the embedding, the output heads, the router, `eh_proj`, norms or biases.
pub fn is_fp8_release_weight(name: &str, shape: &[usize]) -> bool {
    const KEPT: [&str; 5] = ["embed_tokens", "lm_head", "shared_head.head", "mlp.gate.weight", "eh_proj"];
    shape.len() == 2 && name.ends_with(".weight") && !KEPT.iter().any(|k| name.contains(k))
}

/// `tensors` as a DeepSeek-V3 FP8 release stores them: every [`is_fp8_release_weight`] in E4M3
/// with an f32 `*_scale_inv` per 128x128 block (tensors already FP8 are kept as they are), the
/// rest unchanged.
pub fn quantize_fp8_release(tensors: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (name, t) in tensors {
        let quantize = t.dtype().is_float() && t.dtype().fp8_format().is_none();
        if quantize && is_fp8_release_weight(name, t.dims()) {
            // A saved copy: the model's own weights may be variables.
            let (codes, scales) = t.detach().quantize_fp8(FP8_BLOCK, Fp8Format::E4M3, ScaleFormat::F32)?;
            out.insert(format!("{name}_scale_inv"), scales);
            out.insert(name.clone(), codes);
        } else {
            out.insert(name.clone(), t.clone());
        }
    }
    Ok(out)
}

/// `config.json` text with the FP8 release's `quantization_config` added: activations quantized
/// with `activation_scales` (UE8M0 is DeepSeek-V3.1's `scale_fmt`).
pub fn with_fp8_quantization_config(config_json: &str, activation_scales: ScaleFormat) -> Result<String> {
    let mut v: serde_json::Value =
        serde_json::from_str(config_json).map_err(|e| Error::config("quantization_config", e.to_string()))?;
    v["quantization_config"] = serde_json::json!({
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [FP8_BLOCK.0, FP8_BLOCK.1],
    });
    if activation_scales == ScaleFormat::Ue8m0 {
        v["quantization_config"]["scale_fmt"] = serde_json::json!("ue8m0");
    }
    Ok(serde_json::to_string_pretty(&v).expect("json"))
}

/// How a release's activations are quantized for its FP8 GEMMs: `quantization_config.scale_fmt`
/// in its config.json, absent for f32 scales (V3's), `ue8m0` for power-of-two ones (V3.1's, the
/// reference's `act_quant(x, 128, scale_fmt)`); another value is an error naming the key.
pub fn fp8_activation_scales(dir: &Path) -> Result<ScaleFormat> {
    let (path, q) = quantization_config(dir)?;
    match &q["scale_fmt"] {
        serde_json::Value::Null => Ok(ScaleFormat::F32),
        serde_json::Value::String(s) if s == "ue8m0" => Ok(ScaleFormat::Ue8m0),
        other => {
            Err(Error::file(&path, format!("quantization_config.scale_fmt: {other} is not supported (ue8m0 or none)")))
        }
    }
}

/// The FP8 block size a checkpoint's config.json declares (`quantization_config.weight_block_size`),
/// 128x128 where it declares none; a declaration that is not two positive integers is an error
/// (scales read on the wrong grid would be silently wrong weights).
fn fp8_block(dir: &Path) -> Result<(usize, usize)> {
    let (path, q) = quantization_config(dir)?;
    let b = &q["weight_block_size"];
    if b.is_null() {
        return Ok(FP8_BLOCK);
    }
    match b.as_array().map(|a| a.iter().map(|x| x.as_u64().filter(|&n| n > 0)).collect::<Vec<_>>()).as_deref() {
        Some([Some(r), Some(c)]) => Ok((*r as usize, *c as usize)),
        _ => {
            Err(Error::file(&path, format!("quantization_config.weight_block_size: {b} is not two positive integers")))
        }
    }
}

/// The `quantization_config` of `dir`'s config.json (null without one, or without the file),
/// with the file's path for errors.
fn quantization_config(dir: &Path) -> Result<(PathBuf, serde_json::Value)> {
    let path = dir.join("config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((path, serde_json::Value::Null)),
        Err(e) => return Err(Error::file(&path, e)),
    };
    let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::file(&path, e))?;
    let q = v.get_mut("quantization_config").map_or(serde_json::Value::Null, serde_json::Value::take);
    Ok((path, q))
}

fn to_tensor(view: &TensorView<'_>) -> std::result::Result<Tensor, String> {
    let shape = view.shape().to_vec();
    let bytes = view.data();
    let dev = Device::Cpu;
    let err = |e: whale_tensor::Error| e.to_string();
    match view.dtype() {
        Dtype::F32 => {
            let v: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            Tensor::from_vec(v, &shape, &dev).map_err(err)
        }
        Dtype::BF16 => {
            let v: Vec<bf16> = bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect();
            Tensor::from_vec(v, &shape, &dev).map_err(err)
        }
        Dtype::F16 => {
            let v: Vec<f16> = bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect();
            Tensor::from_vec(v, &shape, &dev).map_err(err)
        }
        Dtype::I64 => {
            let v: Vec<i64> =
                bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
            Tensor::from_vec(v, &shape, &dev).map_err(err)
        }
        Dtype::U32 => {
            let v: Vec<u32> =
                bytes.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
            Tensor::from_vec(v, &shape, &dev).map_err(err)
        }
        Dtype::F8_E4M3 => Tensor::from_fp8_codes(bytes.to_vec(), &shape, Fp8Format::E4M3).map_err(err),
        Dtype::F8_E5M2 => Tensor::from_fp8_codes(bytes.to_vec(), &shape, Fp8Format::E5M2).map_err(err),
        other => Err(format!("dtype {other:?} is not supported (f32, bf16, f16, F8_E4M3, F8_E5M2, i64, u32)")),
    }
}

/// Loads a checkpoint directory: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`. Returns the tensors and the file each came from (for errors).
/// FP8 weights are dequantised.
pub fn load_dir(dir: &Path) -> Result<(BTreeMap<String, Tensor>, TensorFiles)> {
    load_dir_with(dir, Fp8Weights::Dequantize)
}

/// [`load_dir`] with a choice of what happens to FP8 weights.
pub fn load_dir_with(dir: &Path, fp8_weights: Fp8Weights) -> Result<(BTreeMap<String, Tensor>, TensorFiles)> {
    let index = dir.join(INDEX);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::file(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::file(&index, e))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::file(&index, "no `weight_map` object"))?;
        let mut shards: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
        shards.sort_unstable();
        shards.dedup();
        let mut all = BTreeMap::new();
        let mut files = TensorFiles::from(index.clone());
        for shard in shards {
            let path = dir.join(shard);
            for (name, t) in load_file_raw(&path)? {
                if map.get(&name).and_then(|f| f.as_str()) != Some(shard) {
                    return Err(Error::Checkpoint {
                        path,
                        name,
                        msg: "is not listed for this shard in the index".into(),
                    });
                }
                files.shard.insert(name.clone(), path.clone());
                all.insert(name, t);
            }
        }
        if let Some(missing) = map.keys().find(|k| !all.contains_key(*k)) {
            let shard = map[missing].as_str().map_or_else(|| "no file".to_string(), |f| format!("`{f}`"));
            return Err(files.error(missing, format!("listed in the index under {shard}, which does not hold it")));
        }
        resolve_fp8(&mut all, fp8_block(dir)?, &files, fp8_weights)?;
        return Ok((all, files));
    }
    let single = TensorFiles::from(dir.join("model.safetensors"));
    let mut all = load_file_raw(&single.path)?;
    resolve_fp8(&mut all, fp8_block(dir)?, &single, fp8_weights)?;
    Ok((all, single))
}

/// Storage dtype for saving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDType {
    F32,
    BF16,
    F16,
}

/// Float tensors are stored as `dtype`; FP8 tensors keep their codes; indices are i64.
fn tensor_bytes(t: &Tensor, dtype: SaveDType) -> Result<(Dtype, Vec<u8>)> {
    match t.dtype() {
        DType::F8E4M3 => return Ok((Dtype::F8_E4M3, t.fp8_codes()?)),
        DType::F8E5M2 => return Ok((Dtype::F8_E5M2, t.fp8_codes()?)),
        _ => {}
    }
    if !t.dtype().is_float() {
        let v = t.to_vec_i64()?;
        return Ok((Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()));
    }
    let v = t.to_vec_f32()?;
    Ok(match dtype {
        SaveDType::F32 => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        SaveDType::BF16 => (Dtype::BF16, v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect()),
        SaveDType::F16 => {
            let halves: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            if let Some((x, _)) = v.iter().zip(&halves).find(|(x, h)| x.is_finite() && h.is_infinite()) {
                return Err(Error::Model(format!("{x} is beyond f16's range (65504); save as bf16 or f32")));
            }
            (Dtype::F16, halves.iter().flat_map(|h| h.to_le_bytes()).collect())
        }
    })
}

/// Bytes `t` takes in a file saved as `dtype`, as [`save_file`] writes it: FP8 codes, integers
/// as i64, floats as `dtype` or f32 ([`keeps_f32`]).
fn stored_bytes(name: &str, t: &Tensor, dtype: SaveDType) -> usize {
    let elem = if t.dtype().fp8_format().is_some() {
        1
    } else if !t.dtype().is_float() {
        8
    } else if keeps_f32(name) || matches!(dtype, SaveDType::F32) {
        4
    } else {
        2
    };
    t.elem_count() * elem
}

/// Tensors stored in f32 whatever the save dtype, as DeepSeek's releases store them: the gate's
/// selection bias (a bf16 step at |b| ~ 0.1 is about half the bias update's gamma) and FP8 block
/// scales.
fn keeps_f32(name: &str) -> bool {
    name.ends_with("e_score_correction_bias") || name.ends_with("weight_scale_inv")
}

/// Writes `tensors` to `path` (through `path.tmp` and a rename, so a crash never leaves a
/// half-written file under the real name). Float tensors are stored as `dtype`.
pub fn save_file(path: &Path, tensors: &BTreeMap<String, Tensor>, dtype: SaveDType) -> Result<()> {
    save_file_then(path, tensors, dtype, || Ok(()))
}

/// [`save_file`], running `before_rename` once the file is written and synced under its
/// temporary name.
fn save_file_then(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    dtype: SaveDType,
    before_rename: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (dt, bytes) = tensor_bytes(t, if keeps_f32(name) { SaveDType::F32 } else { dtype })
            .map_err(|e| Error::Checkpoint { path: path.to_path_buf(), name: name.clone(), msg: e.to_string() })?;
        owned.push((name.clone(), dt, t.dims().to_vec(), bytes));
    }
    let views = owned
        .iter()
        .map(|(n, dt, shape, bytes)| {
            TensorView::new(*dt, shape.clone(), bytes).map(|v| (n.clone(), v)).map_err(|e| Error::Checkpoint {
                path: path.to_path_buf(),
                name: n.clone(),
                msg: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let tmp = path.with_extension("safetensors.tmp");
    let meta: HashMap<String, String> = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &tmp).map_err(|e| Error::file(&tmp, e))?;
    sync(&tmp)?;
    before_rename()?;
    rename_synced(&tmp, path)
}

/// Flushes `path` (a file or, on Unix, a directory's entries) to the disk.
fn sync(path: &Path) -> Result<()> {
    if path.is_dir() && !cfg!(unix) {
        return Ok(()); // Only Unix opens a directory to sync it.
    }
    File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::file(path, format!("syncing: {e}")))
}

/// Writes `bytes` to `path` and flushes them to the disk.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::file(path, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| Error::file(path, e))
}

/// Renames `from` (a flushed file, or a directory of flushed files) to `to` and flushes the
/// directories involved, so that after a power loss `to` is either the old or the new one.
pub fn rename_synced(from: &Path, to: &Path) -> Result<()> {
    if from.is_dir() {
        sync(from)?;
    }
    std::fs::rename(from, to).map_err(|e| Error::file(to, format!("renaming {} here: {e}", from.display())))?;
    let parent = |p: &Path| p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    sync(&parent(to))?;
    if parent(from) != parent(to) {
        sync(&parent(from))?;
    }
    Ok(())
}

/// Writes `bytes` to `path.tmp`, flushes them and renames the file into place: a reader (or a
/// restart after a crash) sees the old contents or the new, never part of them.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    write_synced(&tmp, bytes)?;
    rename_synced(&tmp, path)
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{suffix}"));
    dir.with_file_name(name)
}

/// Writes a directory at `dir` atomically: `write` fills `dir.tmp` (its last file should be the
/// one that marks it complete, each flushed before it), which is flushed; then the old directory
/// moves to `dir.old`, the new one into place, and `dir.old` is removed. A crash at any point
/// leaves `dir`, or between the two renames both `dir.old` and the newer `dir.tmp`, complete.
/// Generic over the caller's error, so that `write` can fail with the caller's own.
pub fn write_dir_atomically<E: From<Error>>(
    dir: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let tmp = sibling(dir, "tmp");
    let old = sibling(dir, "old");
    let remove = |d: &Path| std::fs::remove_dir_all(d).map_err(|e| Error::file(d, e));
    if tmp.exists() {
        remove(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::file(&tmp, e))?;
    write(&tmp)?;
    // Its entries on the disk before the old directory moves aside: between the renames it is
    // the newest complete copy.
    sync(&tmp)?;
    if dir.exists() {
        if old.exists() {
            remove(&old)?;
        }
        rename_synced(dir, &old)?;
    }
    rename_synced(&tmp, dir)?;
    if old.exists() {
        remove(&old)?;
    }
    Ok(())
}

/// The complete checkpoint [`find_checkpoint`] finds, for a run that resumes from it: one found in
/// `dir.tmp` (a swap cut between its renames) has its swap finished first, so that the run's next
/// save, which starts by clearing `dir.tmp`, cannot delete the newest copy while it writes.
pub fn complete_checkpoint(dir: &Path, marker: &str) -> Result<PathBuf> {
    let found = find_checkpoint(dir, marker)?
        .ok_or_else(|| Error::file(dir, format!("no complete checkpoint here (no {marker})")))?;
    if found != sibling(dir, "tmp") {
        return Ok(found);
    }
    // A rename that cannot be made (a read-only copy of a run) leaves it to be read where it
    // lies; one whose flush failed after it was made is in place all the same.
    if rename_synced(&found, dir).is_err() && !dir.join(marker).exists() {
        return Ok(found);
    }
    // The next save removes a leftover `dir.old` too.
    let _ = std::fs::remove_dir_all(sibling(dir, "old"));
    Ok(dir.to_path_buf())
}

/// The complete checkpoint at `dir`; when a crash interrupted the swap of
/// [`write_dir_atomically`] (no `dir`), the new one at `dir.tmp` if it was complete, else the old
/// one at `dir.old`; `None` when there is none (`marker` is the file written last). It only
/// reads: [`complete_checkpoint`] finishes an interrupted swap for a run that resumes. A marker
/// that cannot be checked (no permission, an I/O error) is an error, never "none": a resume that
/// took it for a run to start over would replace the checkpoint.
pub fn find_checkpoint(dir: &Path, marker: &str) -> Result<Option<PathBuf>> {
    let has = |d: &Path| d.join(marker).try_exists().map_err(|e| Error::file(d.join(marker), e));
    // With `dir` in place a complete `dir.tmp` is a write that had not begun its swap: `dir` is
    // the checkpoint (the next save replaces the other).
    for candidate in [dir.to_path_buf(), sibling(dir, "tmp"), sibling(dir, "old")] {
        if has(&candidate)? {
            return Ok(Some(candidate));
        }
    }
    Ok(None)
}

/// Writes pretty JSON and flushes it to the disk.
pub fn write_json_synced(path: &Path, value: &serde_json::Value) -> Result<()> {
    write_synced(path, serde_json::to_string_pretty(value).expect("a JSON value serialises").as_bytes())
}

/// Writes `tensors` as shards of at most `max_shard_bytes` plus `model.safetensors.index.json`.
pub fn save_sharded(
    dir: &Path,
    tensors: &BTreeMap<String, Tensor>,
    dtype: SaveDType,
    max_shard_bytes: usize,
) -> Result<()> {
    let mut shards: Vec<BTreeMap<String, Tensor>> = vec![BTreeMap::new()];
    let mut size = 0;
    for (name, t) in tensors {
        let bytes = stored_bytes(name, t, dtype);
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(BTreeMap::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("one shard").insert(name.clone(), t.clone());
    }
    let n = shards.len();
    let previous = listed_shards(dir);
    // The old index goes first: a save cut short then leaves no index (an error on load), never
    // an old index over a mix of new and old shards of the same names.
    remove_files(dir, [INDEX.to_string()])?;
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        save_file(&dir.join(&file), shard, dtype)?;
        for (name, t) in shard {
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
            total += stored_bytes(name, t, dtype);
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    write_atomically(&dir.join(INDEX), serde_json::to_string_pretty(&index).expect("json").as_bytes())?;
    // What an earlier save left that this one does not use: its single file and extra shards.
    let written: Vec<String> = (1..=n).map(|i| format!("model-{i:05}-of-{n:05}.safetensors")).collect();
    let stale = previous.into_iter().chain(["model.safetensors".to_string()]).filter(|f| !written.contains(f));
    remove_files(dir, stale)
}

const INDEX: &str = "model.safetensors.index.json";

/// The shard files `dir`'s index lists; without a readable index (a save cut short removed it),
/// the files named as shards are (`model-00001-of-00003.safetensors`).
fn listed_shards(dir: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(dir.join(INDEX)) else {
        let is_shard = |f: &str| {
            let Some(rest) = f.strip_prefix("model-").and_then(|r| r.strip_suffix(".safetensors")) else {
                return false;
            };
            rest.split_once("-of-")
                .is_some_and(|(a, b)| [a, b].iter().all(|n| n.len() == 5 && n.bytes().all(|c| c.is_ascii_digit())))
        };
        let names = std::fs::read_dir(dir).into_iter().flatten().flatten();
        let mut files: Vec<String> =
            names.filter_map(|e| e.file_name().into_string().ok()).filter(|f| is_shard(f)).collect();
        files.sort_unstable();
        return files;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return Vec::new() };
    let mut files: Vec<String> = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|m| m.values().filter_map(|f| f.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    files.sort_unstable();
    files.dedup();
    // Only plain safetensors file names: an index is not a licence to delete anything else.
    files.retain(|f| f.ends_with(".safetensors") && Path::new(f).file_name().is_some_and(|n| n == f.as_str()));
    files
}

/// Removes `files` (names in `dir`) where they exist.
fn remove_files(dir: &Path, files: impl IntoIterator<Item = String>) -> Result<()> {
    for f in files {
        let path = dir.join(f);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::file(&path, e)),
            _ => {}
        }
    }
    Ok(())
}

/// Writes an HF model directory: `model.safetensors` with `tensors`, then `config.json` (each
/// through a temporary file and a rename). Saving over a sharded checkpoint removes its index
/// before the new weights are renamed in (loading prefers an index: a save cut short must not
/// leave the old one in charge), and its shards after (as HF's save_pretrained cleans up).
/// Over an existing checkpoint the files are replaced one by one; a checkpoint that must switch
/// as a whole is written with the parallel crate's `write_dir_atomically`.
pub fn save_model_dir(
    dir: &Path,
    config_json: &str,
    tensors: &BTreeMap<String, Tensor>,
    dtype: SaveDType,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let previous: Vec<String> = listed_shards(dir).into_iter().filter(|f| f != "model.safetensors").collect();
    let weights = dir.join("model.safetensors");
    save_file_then(&weights, tensors, dtype, || remove_files(dir, [INDEX.to_string()]))?;
    write_atomically(&dir.join("config.json"), config_json.as_bytes())?;
    remove_files(dir, previous)
}
