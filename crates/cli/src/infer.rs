//! `whale generate` (a continuation of a prompt, with tokens/s; FP8 inference with `--fp8`),
//! `whale quantize` (a DeepSeek-V3 checkpoint written as an FP8 release) and `whale info` (what a
//! checkpoint directory holds: config, parameter counts, cache bytes per token) for DeepSeek-V3,
//! Qwen2 and Llama checkpoints, ours or HF's.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use whale_rl::parallel::model::chat::{ChatMessage, ChatTemplate};
use whale_rl::parallel::model::checkpoint::{write_dir_atomically, SaveDType};
use whale_rl::parallel::model::config::DeepSeekV3Config;
use whale_rl::parallel::model::generate::{CacheMode, SamplingConfig};
use whale_rl::parallel::model::lm::{model_type, MODEL_TYPES};
use whale_rl::parallel::model::mla::mha_cache_elements;
use whale_rl::parallel::model::tensor::Rng;
use whale_rl::parallel::model::tokenizer::tokenizer_for;
use whale_rl::parallel::model::{load_pretrained, moved_to, CausalLm, DeepSeekV3, DenseConfig};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A checkpoint directory (config.json + safetensors [+ tokenizer.json]).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub prompt: String,
    /// The prompt as a user message in the checkpoint's chat template (chat_template.jinja or
    /// tokenizer_config.json's), rendered as transformers' `apply_chat_template(...,
    /// add_generation_prompt=True)` renders it and encoded without a BOS of the tokenizer's own
    /// (the template writes it): what a chat model such as R1-Distill-Qwen was trained on.
    #[arg(long)]
    pub chat: bool,
    /// A system message before the prompt (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Argmax decoding. Without it the checkpoint's generation_config.json decides, as in HF's
    /// generate: its do_sample, temperature, top_k (HF's default 50) and top_p; greedy without
    /// the file. The flags below replace its values.
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    pub greedy: bool,
    /// Sample, at this temperature (> 0), with the file's top-k and top-p unless given.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Sample among the k most likely tokens (ties kept; 0 is off). Needs --temperature. Unset,
    /// generation_config.json's, or HF's default 50.
    #[arg(long, requires = "temperature")]
    pub top_k: Option<usize>,
    /// Sample among the most likely tokens holding mass p, in (0, 1]. Needs --temperature.
    /// Unset, generation_config.json's, or 1 (off).
    #[arg(long, requires = "temperature")]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// MLA decode cache: naive (per-head K/V) or absorb (latent + rotated k_pe).
    #[arg(long, default_value = "absorb")]
    pub cache: String,
    /// Draft with the MTP module and verify with the main model: greedy, or, when the settings
    /// sample (--temperature, or generation_config.json's do_sample), speculative sampling (the
    /// tokens follow plain sampling's distribution).
    #[arg(long)]
    pub speculative: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep a DeepSeek-V3 FP8 checkpoint's weights in FP8 and run its linear layers as FP8 GEMMs
    /// (1x128 activation tiles, the stored 128x128 weight blocks); without it they are
    /// dequantised on load.
    #[arg(long)]
    pub fp8: bool,
    /// cpu (the default), or cuda / cuda:N: the model runs there (FP8 weights kept with --fp8
    /// stay FP8 on the GPU). Sampling reads each step's logits back.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// fp32 (the default) or bf16: the dtype the model computes in, its weights kept as loaded
    /// (DeepSeek-V3's generate.py runs in bf16; with --fp8, bf16 activations quantised for the
    /// FP8 GEMMs, as its act_quant takes them).
    #[arg(long)]
    pub precision: Option<String>,
}

/// The chat template of the checkpoint `dir` (chat_template.jinja or tokenizer_config.json's),
/// for `--chat`; an error when it has none.
pub fn chat_template(dir: &Path) -> Result<ChatTemplate> {
    ChatTemplate::from_dir(dir)?.with_context(|| {
        format!(
            "--chat: {} has no chat template (chat_template.jinja, or tokenizer_config.json's chat_template)",
            dir.display()
        )
    })
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let cache = CacheMode::parse(&a.cache).with_context(|| format!("--cache {}: expected naive or absorb", a.cache))?;
    let device = crate::device::open(&a.device)?;
    let dtype = crate::device::compute_dtype(a.precision.as_deref(), "--fp8 runs an FP8 release's GEMMs in FP8")?;
    let loading = || format!("loading {}", a.checkpoint.display());
    let model: Box<dyn CausalLm> = if a.fp8 {
        Box::new(DeepSeekV3::from_pretrained_fp8(&a.checkpoint).with_context(loading)?)
    } else {
        load_pretrained(&a.checkpoint).with_context(loading)?
    };
    let mut model = moved_to(model, &device).with_context(|| format!("moving the model to {}", a.device))?;
    model.set_compute_dtype(dtype);
    let tok = tokenizer_for(&a.checkpoint)?;
    crate::device::check_fits(&*tok, &*model, &a.checkpoint, "the checkpoint")?;
    let (text, prompt) = if a.chat {
        let template = chat_template(&a.checkpoint)?;
        let system = a.system.iter().map(|s| ChatMessage::new("system", s.as_str()));
        let messages: Vec<ChatMessage> = system.chain([ChatMessage::new("user", a.prompt.as_str())]).collect();
        let text = template.render(&messages, true)?;
        let ids = tok.encode(&text).with_context(|| "encoding the chat prompt")?;
        (text, ids)
    } else {
        (a.prompt.clone(), tok.encode_prompt(&a.prompt).with_context(|| "encoding the prompt")?)
    };
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let stop = tok.stop_ids();
    let (mut cfg, source) = if a.greedy {
        (SamplingConfig::greedy(a.max_new_tokens, stop), "--greedy".to_string())
    } else {
        if let Some(t) = a.temperature.filter(|t| !t.is_finite() || *t <= 0.0) {
            bail!("--temperature {t}: must be positive and finite (or use --greedy)");
        }
        let (mut cfg, unapplied) =
            SamplingConfig::from_generation_config(&a.checkpoint, a.max_new_tokens, stop, a.temperature)?;
        if !unapplied.is_empty() {
            eprintln!(
                "note: generation_config.json also sets {}, which whale does not apply (HF's tokens would differ)",
                unapplied.join(", ")
            );
        }
        // The flags replace the file's cuts (0 turns top-k off).
        if let Some(k) = a.top_k {
            cfg.top_k = Some(k).filter(|&k| k > 0);
        }
        if let Some(p) = a.top_p {
            cfg.top_p = Some(p);
        }
        let file = if a.checkpoint.join("generation_config.json").exists() {
            "generation_config.json"
        } else {
            "HF's defaults (no generation_config.json)"
        };
        let flags: Vec<&str> = [
            ("--temperature", a.temperature.is_some()),
            ("--top-k", a.top_k.is_some()),
            ("--top-p", a.top_p.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect();
        (cfg, if flags.is_empty() { file.to_string() } else { format!("{} over {file}", flags.join(", ")) })
    };
    cfg.cache = cache;
    let cfg = cfg.limited_to(&*tok);
    let t0 = Instant::now();
    let (tokens, note) = if a.speculative {
        let ds = model.as_deepseek().context("--speculative needs a DeepSeek-V3 checkpoint with an MTP module")?;
        let (g, stats) = ds.generate_speculative(&prompt, &cfg, &mut Rng::new(a.seed))?;
        let note = format!(
            "speculative: {} of {} drafts accepted ({:.0}%), {:.2} tokens per main-model forward",
            stats.accepted,
            stats.drafted,
            100.0 * stats.acceptance_rate(),
            stats.tokens_per_forward()
        );
        (g.tokens, Some(note))
    } else {
        let g = model.generate(std::slice::from_ref(&prompt), &cfg, &mut Rng::new(a.seed))?.remove(0);
        (g.tokens, None)
    };
    let secs = t0.elapsed().as_secs_f64();
    let how = match cfg.temperature {
        0.0 => "greedy".to_string(),
        t => format!(
            "sampled at temperature {t}{}{}",
            cfg.top_k.map_or(String::new(), |k| format!(", top-k {k}")),
            cfg.top_p.map_or(String::new(), |p| format!(", top-p {p}"))
        ),
    };
    // Decoded with the prompt, as HF's TextStreamer does: a tokenizer that strips the space a
    // word starts with at the beginning of a text (Metaspace) keeps it after the prompt.
    let shown = tok.decode(&prompt);
    let whole = tok.decode(&[prompt.as_slice(), &tokens].concat());
    let continuation = whole.strip_prefix(shown.as_str()).map_or_else(|| tok.decode(&tokens), str::to_string);
    println!("{text}{continuation}");
    eprintln!(
        "\n{} new tokens in {:.2} s ({:.1} tokens/s, prompt {} tokens, {:?} cache, on {}; {how}: {source})",
        tokens.len(),
        secs,
        tokens.len() as f64 / secs.max(1e-9),
        prompt.len(),
        cache,
        a.device
    );
    if let Some(n) = note {
        eprintln!("{n}");
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// A DeepSeek-V3 checkpoint directory.
    pub checkpoint: PathBuf,
    /// Where to write the FP8 release (config.json with `quantization_config`, safetensors): a
    /// new folder, written aside and renamed into place.
    #[arg(long)]
    pub out: PathBuf,
    /// How the tensors left unquantised are stored (embedding, head, router, norms, eh_proj):
    /// bf16 as DeepSeek-V3's release (the router's correction bias and the block scales stay
    /// f32), or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
}

/// Writes a checkpoint the way DeepSeek-V3's FP8 release stores it (spec 4.3).
pub fn quantize(a: QuantizeArgs) -> Result<()> {
    // Written over an existing folder (the checkpoint itself, say), a crash would leave it half
    // one model, half the other: the release goes to a new folder, as a whole.
    if a.out.exists() {
        bail!("--out {} already exists; the release is written to a new folder", a.out.display());
    }
    let dtype = match a.dtype.as_str() {
        "bf16" => SaveDType::BF16,
        "f32" => SaveDType::F32,
        other => bail!("--dtype {other}: expected bf16 or f32"),
    };
    let model =
        DeepSeekV3::from_pretrained(&a.checkpoint).with_context(|| format!("loading {}", a.checkpoint.display()))?;
    // The release keeps the tokenizer and generation settings (a model of the character
    // tokenizer has none to keep); read before anything is written.
    let tok = a.checkpoint.join("tokenizer.json").exists().then(|| tokenizer_for(&a.checkpoint)).transpose()?;
    write_dir_atomically(&a.out, |tmp| {
        model.save_pretrained_fp8(tmp, dtype)?;
        tok.as_ref().map_or(Ok(()), |tok| tok.save_pretrained(tmp))
    })
    .with_context(|| format!("writing {}", a.out.display()))?;
    let size = |dir: &std::path::Path| std::fs::metadata(dir.join("model.safetensors")).map(|m| m.len() as usize);
    println!(
        "wrote {} (projection and expert weights in E4M3 with 128x128 block scales): {} -> {}",
        a.out.display(),
        bytes(size(&a.checkpoint).unwrap_or(0)),
        bytes(size(&a.out).unwrap_or(0))
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// A checkpoint directory; only its config.json is read.
    pub dir: PathBuf,
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn bytes(n: usize) -> String {
    if n >= 1 << 20 {
        format!("{:.2} MiB", n as f64 / (1 << 20) as f64)
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

pub fn info(a: InfoArgs) -> Result<()> {
    let config_path = a.dir.join("config.json");
    let kind = model_type(&a.dir)?;
    println!("{}: {kind}", a.dir.display());
    // (layout, elements per token per layer) and the layer count.
    let (rows, layers): (Vec<(&str, usize)>, usize) = match kind.as_str() {
        "deepseek_v3" | "deepseek_v2" => {
            let text = std::fs::read_to_string(&config_path).with_context(|| config_path.display().to_string())?;
            let c = DeepSeekV3Config::from_json_str(&text).with_context(|| config_path.display().to_string())?;
            let p = c.param_counts();
            println!(
                "  layers {} ({} dense, then MoE) + {} MTP, hidden {}, vocab {}",
                c.num_hidden_layers, c.first_k_dense_replace, c.num_nextn_predict_layers, c.hidden_size, c.vocab_size
            );
            println!(
                "  MLA: {} heads, q_lora {:?}, kv_lora {}, qk {} nope + {} rope, v {}",
                c.num_attention_heads,
                c.q_lora_rank,
                c.kv_lora_rank,
                c.qk_nope_head_dim,
                c.qk_rope_head_dim,
                c.v_head_dim
            );
            println!(
                "  MoE: {} routed experts (top-{}, {} groups, top-{} groups) + {} shared, width {}",
                c.n_routed_experts,
                c.num_experts_per_tok,
                c.n_group,
                c.topk_group,
                c.n_shared_experts,
                c.moe_intermediate_size
            );
            println!(
                "  parameters: {} total, {} activated per token, {} in MTP modules",
                human(p.total),
                human(p.activated),
                human(p.mtp)
            );
            let rows = vec![
                ("MLA absorb (latent + k_pe)", CacheMode::Absorb.elements_per_token(&c)),
                ("MLA naive (per-head K and V)", CacheMode::Naive.elements_per_token(&c)),
                ("MHA of the same heads (K and V of v_head_dim)", mha_cache_elements(&c)),
            ];
            (rows, c.num_hidden_layers)
        }
        "qwen2" | "llama" => {
            let c = DenseConfig::from_file(&config_path)?;
            println!(
                "  layers {}, hidden {}, MLP {}, vocab {}, {} heads / {} KV heads of {}, rope_theta {}, {} head",
                c.num_hidden_layers,
                c.hidden_size,
                c.intermediate_size,
                c.vocab_size,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim,
                c.rope_theta,
                if c.tie_word_embeddings { "tied" } else { "untied" }
            );
            let n = c.param_count() as u64;
            println!("  parameters: {} total, {} activated per token (dense)", human(n), human(n));
            (vec![("GQA (K and V of the KV heads)", c.cache_elements_per_token())], c.num_hidden_layers)
        }
        other => bail!("{}: model_type `{other}` is not supported ({MODEL_TYPES})", config_path.display()),
    };
    println!("  KV cache per token:");
    println!("  | layout | elements / layer | bf16 / layer | bf16, all {layers} layers |");
    println!("  |---|---:|---:|---:|");
    for (name, e) in rows {
        println!("  | {name} | {e} | {} B | {} |", 2 * e, bytes(2 * e * layers));
    }
    match ChatTemplate::from_dir(&a.dir) {
        Ok(Some(t)) => println!("  chat template: {} (whale generate --chat)", t.origin().display()),
        Ok(None) => println!("  chat template: none"),
        Err(e) => println!("  chat template: not readable: {e}"),
    }
    Ok(())
}
