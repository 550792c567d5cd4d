//! Model behaviour beyond HF parity: checkpoints round-trip (single, sharded, bf16) with clear
//! errors for bad files, the grouped MoE dispatch against a per-token loop, the balance losses
//! against their formulas, and the bias update steering the router.

mod common;

use std::collections::BTreeMap;

use whale_model::checkpoint::{
    complete_checkpoint, load_dir, load_file, load_file_raw, rename_synced, save_file, save_sharded, write_atomically,
    write_dir_atomically, SaveDType,
};
use whale_model::moe::RealTokens;
use whale_model::{DeepSeekV3, DeepSeekV3Config, Error, IGNORE_INDEX};
use whale_tensor::testing::TempDir;
use whale_tensor::{DType, Device, Rng, Tensor};

fn tmpdir(name: &str) -> TempDir {
    TempDir::new(&format!("model-test-{name}"))
}

fn tokens(cfg: &DeepSeekV3Config, batch: usize, seq: usize, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let v: Vec<i64> = (0..batch * seq).map(|_| rng.below(cfg.vocab_size as u64) as i64).collect();
    Tensor::from_vec(v, &[batch, seq], &Device::Cpu).unwrap()
}

fn logits_bits(m: &DeepSeekV3, ids: &Tensor) -> Vec<u32> {
    m.forward(ids, None).unwrap().logits.to_vec_f32().unwrap().into_iter().map(f32::to_bits).collect()
}

#[test]
fn save_and_load_round_trip_exactly_including_biases_and_mtp() {
    let cfg = DeepSeekV3Config::tiny();
    let model = DeepSeekV3::new(cfg.clone(), 1).unwrap();
    // Move the balancing biases so that saving them matters.
    let loads: Vec<Vec<usize>> = model.moe_layers().iter().map(|m| (0..m.gate.n_experts()).collect()).collect();
    model.update_balancing_biases(&loads).unwrap();
    let dir = tmpdir("roundtrip");
    model.save_pretrained(&dir, SaveDType::F32).unwrap();
    let back = DeepSeekV3::from_pretrained(&dir).unwrap();
    let ids = tokens(&cfg, 2, 7, 3);
    assert_eq!(logits_bits(&model, &ids), logits_bits(&back, &ids));
    for (name, b) in &model.buffers {
        assert_eq!(b.to_vec_f32().unwrap(), back.buffers[name].to_vec_f32().unwrap(), "{name}");
    }
    assert!(load_file(&dir.join("model.safetensors")).unwrap().contains_key("model.layers.4.shared_head.head.weight"));
    assert!(!dir.join("model.safetensors.tmp").exists());

    // Sharded, and bf16 (values rounded once, exactly as bf16 stores them).
    let sharded = tmpdir("sharded");
    save_sharded(&sharded, &model.state_dict(), SaveDType::F32, 20_000).unwrap();
    std::fs::copy(dir.join("config.json"), sharded.join("config.json")).unwrap();
    let (tensors, _) = load_dir(&sharded).unwrap();
    assert_eq!(tensors.len(), model.state_dict().len());
    assert!(std::fs::read_dir(&sharded).unwrap().count() > 3, "several shards");
    assert_eq!(logits_bits(&model, &ids), logits_bits(&DeepSeekV3::from_pretrained(&sharded).unwrap(), &ids));
    // Saving a changed model over the sharded copy: the stale index and shards go (loading
    // prefers an index, so they would have brought the old weights back), and so on back again.
    let files = |d: &std::path::Path| -> Vec<String> {
        let mut f: Vec<String> =
            std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        f.sort();
        f
    };
    let changed = DeepSeekV3::new(cfg.clone(), 99).unwrap();
    changed.save_pretrained(&sharded, SaveDType::F32).unwrap();
    assert_eq!(files(&sharded), ["config.json", "model.safetensors"]);
    assert_eq!(logits_bits(&changed, &ids), logits_bits(&DeepSeekV3::from_pretrained(&sharded).unwrap(), &ids));
    save_sharded(&sharded, &changed.state_dict(), SaveDType::F32, 20_000).unwrap();
    let many = files(&sharded).len();
    save_sharded(&sharded, &model.state_dict(), SaveDType::F32, 40_000).unwrap();
    let index = std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap();
    let shards: Vec<String> = files(&sharded).into_iter().filter(|f| f.ends_with(".safetensors")).collect();
    assert!(
        files(&sharded).len() < many && shards.iter().all(|f| f.starts_with("model-") && index.contains(f.as_str()))
    );
    assert_eq!(logits_bits(&model, &ids), logits_bits(&DeepSeekV3::from_pretrained(&sharded).unwrap(), &ids));

    let bf = tmpdir("bf16");
    model.save_pretrained(&bf, SaveDType::BF16).unwrap();
    let loaded = DeepSeekV3::from_pretrained(&bf).unwrap();
    let w = model.params.get("model.layers.1.self_attn.kv_b_proj.weight").unwrap().to_vec_f32().unwrap();
    let w_bf = loaded.params.get("model.layers.1.self_attn.kv_b_proj.weight").unwrap().to_vec_f32().unwrap();
    for (a, b) in w.iter().zip(&w_bf) {
        assert_eq!(DType::BF16.round_f32(*a), *b);
    }
}

#[test]
fn atomic_writes_replace_whole_files_and_name_the_path_they_could_not_write() {
    let dir = tmpdir("atomic");
    let path = dir.join("trainer.json");
    write_atomically(&path, b"first, longer contents").unwrap();
    write_atomically(&path, b"second").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"second");
    assert!(!dir.join("trainer.json.tmp").exists());

    // A directory renamed into place keeps its files; a missing source is an error naming both.
    let staged = dir.join("checkpoint.tmp");
    std::fs::create_dir(&staged).unwrap();
    write_atomically(&staged.join("config.json"), b"{}").unwrap();
    rename_synced(&staged, &dir.join("checkpoint")).unwrap();
    assert_eq!(std::fs::read(dir.join("checkpoint/config.json")).unwrap(), b"{}");
    let err = rename_synced(&staged, &dir.join("elsewhere")).unwrap_err().to_string();
    assert!(err.contains("elsewhere") && err.contains("checkpoint.tmp"), "{err}");

    let err = write_atomically(&dir.join("no-such-dir/config.json"), b"{}").unwrap_err().to_string();
    assert!(err.contains("no-such-dir/config.json.tmp"), "{err}");
}

#[test]
fn a_directory_written_atomically_is_the_old_one_or_the_new_one_whole() {
    let root = tmpdir("atomic-dir");
    let ckpt = root.join("checkpoint");
    let fill = |text: &'static str| {
        move |tmp: &std::path::Path| -> Result<(), Error> {
            write_atomically(&tmp.join("weights"), text.as_bytes())?;
            write_atomically(&tmp.join("done"), b"")
        }
    };
    let read = |dir: &std::path::Path| std::fs::read_to_string(dir.join("weights")).unwrap();
    write_dir_atomically(&ckpt, fill("first")).unwrap();
    assert_eq!(read(&complete_checkpoint(&ckpt, "done").unwrap()), "first");

    // A write that fails half-way leaves the old directory in place, and the caller's own error.
    enum Caller {
        DiskFull,
        Model(Error),
    }
    impl From<Error> for Caller {
        fn from(e: Error) -> Self {
            Caller::Model(e)
        }
    }
    let failed = write_dir_atomically(&ckpt, |tmp: &std::path::Path| -> Result<(), Caller> {
        write_atomically(&tmp.join("weights"), b"half")?;
        Err(Caller::DiskFull)
    });
    match failed {
        Err(Caller::DiskFull) => {}
        Err(Caller::Model(e)) => panic!("the write's own error was replaced by {e}"),
        Ok(()) => panic!("a failed write reported success"),
    }
    assert_eq!(read(&complete_checkpoint(&ckpt, "done").unwrap()), "first");

    // A crash between the two renames of the swap: the old directory is found under `.old`, and
    // the next write replaces both.
    rename_synced(&ckpt, &root.join("checkpoint.old")).unwrap();
    assert_eq!(complete_checkpoint(&ckpt, "done").unwrap(), root.join("checkpoint.old"));
    write_dir_atomically(&ckpt, fill("second")).unwrap();
    assert_eq!(read(&complete_checkpoint(&ckpt, "done").unwrap()), "second");
    assert!(!root.join("checkpoint.old").exists() && !root.join("checkpoint.tmp").exists());
    // The same crash after the new directory was complete: it is the newer checkpoint, taken
    // over the old one (which held `second`); with `checkpoint` in place, that one.
    rename_synced(&ckpt, &root.join("checkpoint.old")).unwrap();
    let tmp = root.join("checkpoint.tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    fill("third")(&tmp).unwrap();
    // Found, it is only read; resumed from, its swap is finished (the next save cannot delete
    // the newest copy).
    assert_eq!(whale_model::checkpoint::find_checkpoint(&ckpt, "done").unwrap(), Some(tmp.clone()));
    assert_eq!(complete_checkpoint(&ckpt, "done").unwrap(), ckpt);
    assert_eq!(read(&ckpt), "third");
    assert!(!tmp.exists() && !root.join("checkpoint.old").exists());
    write_dir_atomically(&ckpt, fill("fourth")).unwrap();
    std::fs::create_dir_all(&tmp).unwrap();
    fill("fifth")(&tmp).unwrap();
    assert_eq!(read(&complete_checkpoint(&ckpt, "done").unwrap()), "fourth");
    std::fs::remove_dir_all(&tmp).unwrap();

    // Neither complete: an error naming the directory and the missing marker.
    std::fs::remove_file(ckpt.join("done")).unwrap();
    let err = complete_checkpoint(&ckpt, "done").unwrap_err().to_string();
    assert!(err.contains("checkpoint") && err.contains("no done"), "{err}");
}

#[test]
fn a_sharded_save_cut_short_never_loads_as_a_mix_of_two_saves() {
    let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 5).unwrap();
    let dir = tmpdir("cut-short");
    let first = model.state_dict();
    save_sharded(&dir, &first, SaveDType::F32, 200_000).unwrap();
    let shards = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".safetensors"));
    let n = shards.count();
    assert!(n > 2, "{n} shards");
    // A second save of other values fails at its second shard (a directory stands where its
    // temporary file goes): the first shard is new, the others old, under the same names.
    let second: BTreeMap<String, Tensor> = first.iter().map(|(k, t)| (k.clone(), t.add_scalar(1.0).unwrap())).collect();
    std::fs::create_dir(dir.join(format!("model-00002-of-{n:05}.safetensors.tmp"))).unwrap();
    assert!(save_sharded(&dir, &second, SaveDType::F32, 200_000).is_err());
    // The old index went first, so nothing loads: an error, not the mix.
    let Err(err) = load_dir(&dir) else { panic!("a mix of two saves loaded") };
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    // The next save (in fewer shards) finds the cut-short one's shards by their names and
    // removes them: only its own remain.
    std::fs::remove_dir(dir.join(format!("model-00002-of-{n:05}.safetensors.tmp"))).unwrap();
    save_sharded(&dir, &second, SaveDType::F32, 2_000_000).unwrap();
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.ends_with(".safetensors"))
        .collect();
    assert!(!left.is_empty() && left.iter().all(|f| !f.ends_with(&format!("-of-{n:05}.safetensors"))), "{left:?}");
    // And what loads is the second save, every tensor of it.
    let (loaded, _) = load_dir(&dir).unwrap();
    assert_eq!(loaded.len(), second.len());
    for (name, t) in &second {
        assert_eq!(loaded[name].to_vec_f32().unwrap(), t.to_vec_f32().unwrap(), "{name}");
    }
}

#[test]
fn an_f16_save_refuses_values_beyond_its_range() {
    let dir = tmpdir("f16");
    let path = dir.join("model.safetensors");
    let big = Tensor::from_vec(vec![1.0f32, 65504.0, 1e5], &[3], &Device::Cpu).unwrap();
    let tensors = BTreeMap::from([("w".to_string(), big)]);
    let err = save_file(&path, &tensors, SaveDType::F16).unwrap_err().to_string();
    assert!(err.contains("`w`") && err.contains("100000") && err.contains("65504"), "{err}");
    assert!(!path.exists() && !dir.join("model.safetensors.tmp").exists());
    let fits = BTreeMap::from([("w".to_string(), Tensor::from_vec(vec![65504.0f32], &[1], &Device::Cpu).unwrap())]);
    save_file(&path, &fits, SaveDType::F16).unwrap();
    assert_eq!(load_file(&path).unwrap()["w"].to_vec_f32().unwrap(), [65504.0]);
}

fn expect_checkpoint_error(dir: &std::path::Path, tensor: &str, words: &str) {
    expect_checkpoint_error_in(dir, "model.safetensors", tensor, words)
}

fn expect_checkpoint_error_in(dir: &std::path::Path, file: &str, tensor: &str, words: &str) {
    match DeepSeekV3::from_pretrained(dir) {
        Err(Error::Checkpoint { path, name, msg }) => {
            assert_eq!(path, dir.join(file));
            assert_eq!(name, tensor);
            assert!(msg.contains(words), "{msg}");
        }
        other => panic!("expected a checkpoint error naming {tensor}, got {other:?}"),
    }
}

#[test]
fn bad_checkpoints_name_the_file_and_tensor() {
    let cfg = DeepSeekV3Config::tiny();
    let model = DeepSeekV3::new(cfg, 2).unwrap();
    let dir = tmpdir("bad");
    model.save_pretrained(&dir, SaveDType::F32).unwrap();
    let file = dir.join("model.safetensors");
    let good: BTreeMap<String, Tensor> = load_file(&file).unwrap();

    let victim = "model.layers.2.mlp.experts.3.up_proj.weight";
    let mut missing = good.clone();
    missing.remove(victim);
    save_file(&file, &missing, SaveDType::F32).unwrap();
    expect_checkpoint_error(&dir, victim, "missing");

    let mut reshaped = good.clone();
    reshaped.insert(victim.into(), Tensor::zeros(&[3, 3], DType::F32, &Device::Cpu).unwrap());
    save_file(&file, &reshaped, SaveDType::F32).unwrap();
    expect_checkpoint_error(&dir, victim, "[3, 3]");

    // Integers where a weight belongs would load as their float values.
    let mut integers = good.clone();
    let shape = good["model.norm.weight"].dims().to_vec();
    integers.insert("model.norm.weight".into(), Tensor::zeros(&shape, DType::I64, &Device::Cpu).unwrap());
    save_file(&file, &integers, SaveDType::F32).unwrap();
    expect_checkpoint_error(&dir, "model.norm.weight", "a weight is a float");
    // A NaN (here in the balancing bias, which only picks experts) is refused by name.
    let mut nan = good.clone();
    let bias = "model.layers.2.mlp.gate.e_score_correction_bias";
    let mut values = good[bias].to_vec_f32().unwrap();
    values[1] = f32::NAN;
    nan.insert(bias.into(), Tensor::from_vec(values, good[bias].dims(), &Device::Cpu).unwrap());
    save_file(&file, &nan, SaveDType::F32).unwrap();
    expect_checkpoint_error(&dir, bias, "element 1 is NaN");

    let mut extra = good.clone();
    extra.insert("model.layers.9.mystery.weight".into(), Tensor::zeros(&[2], DType::F32, &Device::Cpu).unwrap());
    save_file(&file, &extra, SaveDType::F32).unwrap();
    expect_checkpoint_error(&dir, "model.layers.9.mystery.weight", "unexpected");

    // Sharded: an error about a tensor names the shard that holds it; one about a tensor no
    // shard holds names the index.
    let sharded = tmpdir("bad-sharded");
    std::fs::copy(dir.join("config.json"), sharded.join("config.json")).unwrap();
    let shard_of = |name: &str| -> String {
        let index = std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&index).unwrap();
        v["weight_map"][name].as_str().unwrap().to_string()
    };
    save_sharded(&sharded, &reshaped, SaveDType::F32, 20_000).unwrap();
    let shard = shard_of(victim);
    assert_ne!(shard, shard_of("model.embed_tokens.weight"), "the victim is not in the first shard");
    expect_checkpoint_error_in(&sharded, &shard, victim, "[3, 3]");
    save_sharded(&sharded, &extra, SaveDType::F32, 20_000).unwrap();
    expect_checkpoint_error_in(
        &sharded,
        &shard_of("model.layers.9.mystery.weight"),
        "model.layers.9.mystery.weight",
        "unexpected",
    );
    save_sharded(&sharded, &missing, SaveDType::F32, 20_000).unwrap();
    expect_checkpoint_error_in(&sharded, "model.safetensors.index.json", victim, "missing");

    std::fs::write(&file, b"definitely not safetensors").unwrap();
    let err = DeepSeekV3::from_pretrained(&dir).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("not a safetensors file"), "{err}");

    std::fs::write(dir.join("config.json"), "{\"vocab_size\": 10}").unwrap();
    let err = DeepSeekV3::from_pretrained(&dir).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
}

/// The first MoE layer of `model` on 10 random tokens: its output, the tokens (`[10, hidden]`),
/// their routing and its weights.
fn first_moe_on_ten_tokens(model: &DeepSeekV3) -> (Vec<f32>, Tensor, whale_model::moe::Routing, Vec<f32>) {
    let moe = model.moe_layers()[0];
    let d = model.config.hidden_size;
    let x = Tensor::randn(&[2, 5, d], 0.0, 1.0, DType::F32, &mut Rng::new(9)).unwrap();
    let out = moe.forward(&x, None).unwrap().output.to_vec_f32().unwrap();
    let tokens = x.reshape(&[10, d]).unwrap();
    let routing = moe.gate.route(&tokens).unwrap();
    let w = routing.weights.to_vec_f32().unwrap();
    (out, tokens, routing, w)
}

#[test]
fn grouped_dispatch_equals_a_per_token_loop() {
    let cfg = DeepSeekV3Config::tiny();
    let model = DeepSeekV3::new(cfg.clone(), 5).unwrap();
    let moe = model.moe_layers()[0];
    let (out, tokens, routing, w) = first_moe_on_ten_tokens(&model);
    let k = cfg.num_experts_per_tok;
    for t in 0..10 {
        let xt = tokens.narrow(0, t, 1).unwrap();
        let mut want = moe.shared_experts.as_ref().unwrap().forward(&xt).unwrap();
        for j in 0..k {
            let e = routing.experts[t * k + j];
            want = want.add(&moe.experts[e].forward(&xt).unwrap().mul_scalar(w[t * k + j]).unwrap()).unwrap();
        }
        let want = want.to_vec_f32().unwrap();
        let got = &out[t * cfg.hidden_size..(t + 1) * cfg.hidden_size];
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 + 1e-5 * b.abs(), "token {t}: {a} vs {b}");
        }
    }
    // Each expert's load is the number of tokens routed to it.
    for (e, &load) in routing.load.iter().enumerate() {
        assert_eq!(load, routing.experts.iter().filter(|&&x| x == e).count(), "expert {e}");
    }
}

#[test]
fn balance_losses_match_their_formulas() {
    // Spec 2.4, computed here in f64 from the routing: alpha * sum_i f_i P_i with
    // f_i = E/(K T) * count_i, P_i the mean affinity normalised over all experts; per sequence
    // (T = s, averaged over the batch) and over the whole batch (T = b * s). With padding, over
    // the real tokens: T is theirs, and a sequence without one is left out of the batch mean.
    let (seq_alpha, batch_alpha) = (0.01, 0.003);
    let (b, s) = (3, 6);
    // Rows of 6, 4 and 0 real tokens (each row's first position always counts as real: the
    // third row's targets are all ignored, so only its position 0 is).
    let targets: Vec<i64> =
        [6, 4, 0].iter().flat_map(|&n| (0..s).map(move |i| if i + 1 < n { 1 } else { IGNORE_INDEX })).collect();
    let targets = Tensor::from_vec(targets, &[b, s], &Device::Cpu).unwrap();
    let real = RealTokens::from_targets(&targets, IGNORE_INDEX).unwrap();
    assert_eq!((0..b).map(|q| real.in_row(q)).collect::<Vec<_>>(), [6, 4, 1]);
    // MTP depth 1's view: positions 1.., where the third row has no real token left, so it is
    // out of the per-sequence mean.
    let depth1 = real.shifted(1);
    assert_eq!((0..b).map(|q| depth1.in_row(q)).collect::<Vec<_>>(), [5, 3, 0]);
    for (mask, s) in [(None, s), (Some(&real), s), (Some(&depth1), s - 1)] {
        let masked = mask.is_some();
        for (seq_aux, batch_aux) in [(seq_alpha, 0.0), (0.0, batch_alpha), (seq_alpha, batch_alpha)] {
            let mut cfg = DeepSeekV3Config::tiny();
            cfg.seq_aux_alpha = seq_aux;
            cfg.aux_loss_alpha = batch_aux;
            let model = DeepSeekV3::new(cfg.clone(), 6).unwrap();
            let moe = model.moe_layers()[0];
            let (e, k) = (cfg.n_routed_experts, cfg.num_experts_per_tok);
            let x = Tensor::randn(&[b, s, cfg.hidden_size], 0.0, 1.0, DType::F32, &mut Rng::new(4)).unwrap();
            let out = moe.forward(&x, mask).unwrap();
            let got = out.aux_loss.unwrap().to_scalar().unwrap() as f64;

            let routing = moe.gate.route(&x.reshape(&[b * s, cfg.hidden_size]).unwrap()).unwrap();
            let scores = routing.scores.to_vec_f32().unwrap();
            let counted = |t: usize| mask.is_none_or(|m| m.is_real(t));
            // f and P over the counted tokens of `range`, T of them.
            let loss = |range: std::ops::Range<usize>| {
                let tokens: Vec<usize> = range.filter(|&t| counted(t)).collect();
                let t_count = tokens.len() as f64;
                let (mut f, mut p) = (vec![0.0f64; e], vec![0.0f64; e]);
                for &t in &tokens {
                    for j in 0..k {
                        f[routing.experts[t * k + j]] += e as f64 / (k as f64 * t_count);
                    }
                    let row = &scores[t * e..(t + 1) * e];
                    let z: f64 = row.iter().map(|&v| v as f64).sum();
                    for i in 0..e {
                        p[i] += row[i] as f64 / z / t_count;
                    }
                }
                f.iter().zip(&p).map(|(a, b)| a * b).sum::<f64>()
            };
            let rows: Vec<usize> = (0..b).filter(|&q| (q * s..(q + 1) * s).any(counted)).collect();
            let per_sequence = rows.iter().map(|&q| loss(q * s..(q + 1) * s)).sum::<f64>() / rows.len() as f64;
            let want = seq_aux * per_sequence + batch_aux * loss(0..b * s);
            assert!((got - want).abs() < 1e-7, "masked {masked}, alphas {seq_aux}, {batch_aux}: {got} vs {want}");
            // The load: the counted tokens' choices.
            let mut load = vec![0usize; e];
            (0..b * s).filter(|&t| counted(t)).for_each(|t| (0..k).for_each(|j| load[routing.experts[t * k + j]] += 1));
            assert_eq!(out.load, load, "masked {masked}");
        }
    }
    // A mask of another batch's shape is an error, not a misread.
    let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 6).unwrap();
    let x = Tensor::zeros(&[2, s, model.config.hidden_size], DType::F32, &Device::Cpu).unwrap();
    assert!(model.moe_layers()[0].forward(&x, Some(&real)).unwrap_err().to_string().contains("real tokens"));
}

#[test]
fn the_balance_losses_pass_their_gradient_to_the_affinities() {
    // P_i is the mean of the affinities normalised over all experts, with their gradient (f_i,
    // from the counts, has none). Experts 0 and 1 (one group) are pinned above the rest by their
    // bias, which only chooses, so no finite difference moves the choice; large alphas make the
    // gradient large against the checker's absolute tolerance.
    let mut cfg = DeepSeekV3Config::tiny();
    (cfg.seq_aux_alpha, cfg.aux_loss_alpha) = (30.0, 10.0);
    let model = DeepSeekV3::new(cfg.clone(), 6).unwrap();
    let moe = model.moe_layers()[0];
    moe.gate.e_score_correction_bias.as_ref().unwrap().with_f32_mut(|b| b[..2].fill(10.0)).unwrap();
    let x = whale_tensor::testing::randn(&[2, 3, cfg.hidden_size], 9);
    let aux = |v: &[Tensor]| Ok(moe.forward(&v[0], None).expect("the MoE forward").aux_loss.expect("alphas > 0"));
    whale_tensor::testing::GradCheck::default().run(std::slice::from_ref(&x), aux).unwrap();
    // Over the real tokens only (the second row's last is padding).
    let targets = Tensor::from_vec(vec![1i64, 1, 1, 1, IGNORE_INDEX, IGNORE_INDEX], &[2, 3], &Device::Cpu).unwrap();
    let real = RealTokens::from_targets(&targets, IGNORE_INDEX).unwrap();
    let aux =
        |v: &[Tensor]| Ok(moe.forward(&v[0], Some(&real)).expect("the MoE forward").aux_loss.expect("alphas > 0"));
    whale_tensor::testing::GradCheck::default().run(&[x], aux).unwrap();
}

#[test]
fn fp8_experts_behind_an_fp8_dispatch_take_the_dispatched_values_per_token() {
    // V3's recipe: the routed experts get the tokens as the dispatch rounded them, and their FP8
    // GEMMs read those values as they are (power-of-two input tiles); the shared expert reads
    // the tokens themselves.
    use whale_tensor::fp8::{Fp8Recipe, ScaleFormat};
    let cfg = DeepSeekV3Config::tiny();
    let mut model = DeepSeekV3::new(cfg.clone(), 5).unwrap();
    model.set_fp8(Some(Fp8Recipe::default()));
    model.set_fp8_dispatch(true);
    let moe = model.moe_layers()[0];
    let (out, tokens, routing, w) = first_moe_on_ten_tokens(&model);
    let k = cfg.num_experts_per_tok;
    let per_token = |input_scales: ScaleFormat| -> Vec<f32> {
        let mut all = Vec::new();
        for t in 0..10 {
            let xt = tokens.narrow(0, t, 1).unwrap();
            let sent = xt.fp8_comm_round().unwrap();
            let mut want = moe.shared_experts.as_ref().unwrap().forward(&xt).unwrap();
            for j in 0..k {
                let e = moe.experts[routing.experts[t * k + j]].with_input_scales(input_scales);
                want = want.add(&e.forward(&sent).unwrap().mul_scalar(w[t * k + j]).unwrap()).unwrap();
            }
            all.extend(want.to_vec_f32().unwrap());
        }
        all
    };
    let close = |want: &[f32]| out.iter().zip(want).all(|(a, b)| (a - b).abs() <= 1e-6 + 1e-5 * b.abs());
    assert!(close(&per_token(ScaleFormat::Ue8m0)), "the dispatched values, read as they are");
    assert!(!close(&per_token(ScaleFormat::F32)), "f32 input tiles would round them again");
}

#[test]
fn an_fp8_expert_without_tokens_gets_zero_gradients_as_in_higher_precision() {
    // A bias no score can overcome keeps expert 0 of every MoE layer out. Its weights get zero
    // gradients (so AdamW still decays them) with the experts in FP8 as without.
    let cfg = DeepSeekV3Config::tiny();
    let base = DeepSeekV3::new(cfg.clone(), 5).unwrap();
    for moe in base.moe_layers() {
        moe.gate.e_score_correction_bias.as_ref().unwrap().with_f32_mut(|b| b[0] = -1e6).unwrap();
    }
    let ids = tokens(&cfg, 2, 8, 3);
    let grads = |m: &DeepSeekV3| {
        m.forward(&ids, Some(&ids)).unwrap().loss.unwrap().backward().unwrap();
        let grad = |p: &Tensor| p.grad().map(|g| g.to_vec_f32().unwrap());
        m.params.iter().map(|(n, p)| (n.to_string(), grad(p))).collect::<Vec<_>>()
    };
    let plain = grads(&base.duplicate().unwrap());
    let mut fp8 = base.duplicate().unwrap();
    fp8.set_fp8(Some(whale_tensor::fp8::Fp8Recipe::F32_ACCUMULATION));
    let quantized = grads(&fp8);
    let idle: Vec<_> = quantized.iter().filter(|(n, _)| n.contains(".experts.0.")).collect();
    assert!(!idle.is_empty());
    for (name, g) in idle {
        let g = g.as_ref().unwrap_or_else(|| panic!("{name}: no gradient under FP8"));
        assert!(g.iter().all(|&v| v == 0.0), "{name}: an expert without tokens has a non-zero gradient");
    }
    for ((name, a), (_, b)) in plain.iter().zip(&quantized) {
        assert_eq!(a.is_some(), b.is_some(), "{name}: a gradient in one precision only");
    }
}

#[test]
fn the_bias_update_steers_routing_away_from_an_overloaded_expert() {
    // gamma small against the spread of the affinities (about 0.04 at this init): a large step
    // makes every token flip experts at once and the load oscillates instead of settling.
    let mut cfg = DeepSeekV3Config::tiny();
    cfg.bias_update_speed = 0.002;
    let model = DeepSeekV3::new(cfg.clone(), 7).unwrap();
    let moe = model.moe_layers()[0];
    let x = Tensor::randn(&[256, cfg.hidden_size], 0.0, 1.0, DType::F32, &mut Rng::new(8)).unwrap();
    let before = moe.gate.route(&x).unwrap().load;
    let hot = (0..before.len()).max_by_key(|&i| before[i]).unwrap();
    let mut loads: Vec<Vec<usize>> = model.moe_layers().iter().map(|m| vec![0; m.gate.n_experts()]).collect();
    let mut late_vio = Vec::new();
    for step in 0..60 {
        loads[0] = moe.gate.route(&x).unwrap().load;
        if step >= 40 {
            late_vio.push(DeepSeekV3::max_violations(&loads[..1])[0]);
        }
        model.update_balancing_biases(&loads).unwrap();
    }
    let after = moe.gate.route(&x).unwrap().load;
    assert!(after[hot] < before[hot], "expert {hot}: {} -> {}", before[hot], after[hot]);
    let start = DeepSeekV3::max_violations(&[before])[0];
    let late = late_vio.iter().sum::<f64>() / late_vio.len() as f64;
    assert!(late < start / 2.0, "MaxVio {start} -> {late} (mean of the last 20 steps)");
}

#[test]
fn softmax_scoring_v2_style_routes_without_normalising() {
    let mut cfg = DeepSeekV3Config::tiny();
    // V2-Lite's gate: softmax scores, plain top-k (one group), no renormalisation.
    (cfg.scoring_func, cfg.topk_method) = ("softmax".into(), Some("greedy".into()));
    cfg.norm_topk_prob = false;
    cfg.routed_scaling_factor = 1.0;
    cfg.n_group = 1;
    cfg.topk_group = 1;
    let model = DeepSeekV3::new(cfg.clone(), 8).unwrap();
    let moe = model.moe_layers()[0];
    assert!(moe.gate.e_score_correction_bias.is_none());
    let x = Tensor::randn(&[4, cfg.hidden_size], 0.0, 1.0, DType::F32, &mut Rng::new(1)).unwrap();
    let r = moe.gate.route(&x).unwrap();
    let p = r.scores.to_vec_f32().unwrap();
    let w = r.weights.to_vec_f32().unwrap();
    for t in 0..4 {
        let row = &p[t * 8..(t + 1) * 8];
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let mut sorted = row.to_vec();
        sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
        assert_eq!(&w[t * 2..t * 2 + 2], &sorted[..2], "weights are the top-2 probabilities, unnormalised");
    }
}

#[test]
fn a_duplicate_computes_the_same_and_trains_independently() {
    let cfg = DeepSeekV3Config::tiny();
    let m = DeepSeekV3::new(cfg.clone(), 4).unwrap();
    let copy = m.duplicate().unwrap();
    let ids = tokens(&cfg, 2, 9, 1);
    assert_eq!(logits_bits(&m, &ids), logits_bits(&copy, &ids));
    // The head-only path gives the training forward's logits.
    assert_eq!(
        m.logits(&ids).unwrap().to_vec_f32().unwrap(),
        m.forward(&ids, None).unwrap().logits.to_vec_f32().unwrap()
    );
    assert_eq!(copy.state_dict().keys().collect::<Vec<_>>(), m.state_dict().keys().collect::<Vec<_>>());
    let w = copy.params.get("lm_head.weight").unwrap();
    w.with_f32_mut(|x| x[0] += 1.0).unwrap();
    assert_ne!(logits_bits(&m, &ids), logits_bits(&copy, &ids));
    assert_ne!(m.params.get("lm_head.weight").unwrap().to_vec_f32().unwrap()[0], w.to_vec_f32().unwrap()[0]);
    // A copy (or a move: the same path) keeps the compute dtype and the FP8 recipe, and computes
    // as the original does with them.
    let mut m = m;
    m.compute_dtype = DType::BF16;
    m.set_fp8(Some(whale_tensor::fp8::Fp8Recipe::F32_ACCUMULATION));
    let copy = m.to_device(&Device::Cpu).unwrap();
    assert_eq!((copy.compute_dtype, copy.fp8()), (m.compute_dtype, m.fp8()));
    assert_eq!(logits_bits(&m, &ids), logits_bits(&copy, &ids));
}

/// Writes `model` as a DeepSeek-V3 FP8 release would: every projection and expert weight in
/// E4M3 with f32 `weight_scale_inv` per 128x128 block; embedding, head, router, norms and
/// `eh_proj` left as they are (spec 4.3). Returns the dequantised weights the file stands for.
fn write_fp8_checkpoint(model: &DeepSeekV3, dir: &std::path::Path) -> BTreeMap<String, Vec<f32>> {
    use safetensors::tensor::{Dtype, TensorView};
    use whale_kernels::cpu::fp8::{Fp8Blocks, Fp8Format, ScaleFormat};
    std::fs::create_dir_all(dir).unwrap();
    let mut json = serde_json::from_str::<serde_json::Value>(&model.config.to_json_string().unwrap()).unwrap();
    json["quantization_config"] =
        serde_json::json!({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]});
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    let mut raw: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let mut expected = BTreeMap::new();
    for (name, t) in model.state_dict() {
        let keep = t.rank() != 2
            || ["embed_tokens", "lm_head", "shared_head.head", "mlp.gate.weight", "eh_proj"]
                .iter()
                .any(|k| name.contains(k));
        let v = t.to_vec_f32().unwrap();
        if keep {
            raw.insert(name, (Dtype::F32, t.dims().to_vec(), v.iter().flat_map(|x| x.to_le_bytes()).collect()));
            continue;
        }
        let (r, c) = (t.dims()[0], t.dims()[1]);
        let Fp8Blocks { codes, scales, .. } =
            Fp8Blocks::quantize(&v, r, c, (128, 128), Fp8Format::E4M3, ScaleFormat::F32);
        let q = Fp8Blocks::from_parts(codes.clone(), scales.clone(), (r, c), (128, 128), Fp8Format::E4M3).unwrap();
        expected.insert(name.clone(), q.dequantize());
        let grid = vec![r.div_ceil(128), c.div_ceil(128)];
        raw.insert(
            format!("{name}_scale_inv"),
            (Dtype::F32, grid, scales.iter().flat_map(|x| x.to_le_bytes()).collect()),
        );
        raw.insert(name, (Dtype::F8_E4M3, vec![r, c], codes));
    }
    let views: Vec<(String, TensorView<'_>)> =
        raw.iter().map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    expected
}

#[test]
fn fp8_checkpoints_with_block_scales_load_dequantised() {
    let cfg = DeepSeekV3Config::tiny();
    let model = DeepSeekV3::new(cfg.clone(), 9).unwrap();
    let dir = tmpdir("fp8");
    let expected = write_fp8_checkpoint(&model, &dir);
    assert!(
        expected.keys().any(|n| n.contains("experts.0.down_proj")) && expected.keys().any(|n| n.contains("layers.4."))
    );
    let loaded = DeepSeekV3::from_pretrained(&dir).unwrap();
    for (name, want) in &expected {
        let Ok(p) = loaded.params.get(name) else { continue }; // MTP copies of shared weights are not parameters
        assert_eq!(&p.to_vec_f32().unwrap(), want, "{name}");
    }
    // The loaded model is the original with its quantised weights replaced by their dequantised
    // values, nothing else.
    let reference = model.duplicate().unwrap();
    for (name, want) in &expected {
        if let Ok(p) = reference.params.get(name) {
            p.with_f32_mut(|w| w.copy_from_slice(want)).unwrap();
        }
    }
    let ids = tokens(&cfg, 1, 8, 3);
    assert_eq!(logits_bits(&reference, &ids), logits_bits(&loaded, &ids));

    // A missing scale is named, not guessed.
    let file = dir.join("model.safetensors");
    let st = std::fs::read(&file).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&st).unwrap();
    let victim = expected.keys().next().unwrap().clone();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        parsed.tensors().into_iter().filter(|(n, _)| *n != format!("{victim}_scale_inv")).collect();
    safetensors::serialize_to_file(kept, None, &dir.join("broken.safetensors")).unwrap();
    let err = load_file(&dir.join("broken.safetensors")).unwrap_err().to_string();
    assert!(err.contains(&victim) && err.contains("weight_scale_inv"), "{err}");
    // A block size that is no block size is an error, not 128x128.
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), config.replace("[128,128]", "[128]")).unwrap();
    let err = DeepSeekV3::from_pretrained(&dir).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("weight_block_size"), "{err}");
}

/// A model built from tensors (no checkpoint loader in between) checks a kept FP8 weight's scale
/// grid too, and names the scale: it failed at the first forward, naming neither.
#[test]
fn fp8_tensors_with_a_wrong_scale_grid_are_refused_by_name() {
    let cfg = DeepSeekV3Config::tiny();
    let dir = tmpdir("fp8-grid");
    write_fp8_checkpoint(&DeepSeekV3::new(cfg.clone(), 9).unwrap(), &dir);
    let file = dir.join("model.safetensors");
    // The FP8 codes and scales as stored (load_file would dequantise them).
    let mut tensors = load_file_raw(&file).unwrap();
    DeepSeekV3::from_tensors(cfg.clone(), tensors.clone(), file.clone()).unwrap();
    let victim = "model.layers.1.mlp.experts.0.down_proj.weight_scale_inv";
    let grid = tensors[victim].dims().to_vec();
    tensors.insert(victim.into(), Tensor::ones(&[grid[0], grid[1] + 1], DType::F32, &Device::Cpu).unwrap());
    let err = DeepSeekV3::from_tensors(cfg, tensors, file).unwrap_err().to_string();
    assert!(err.contains(victim) && err.contains("128x128"), "{err}");
}

#[test]
fn a_tied_checkpoint_that_stores_its_head_loads_it_as_the_embedding() {
    let cfg = DeepSeekV3Config { tie_word_embeddings: true, ..DeepSeekV3Config::tiny() };
    let model = DeepSeekV3::new(cfg.clone(), 4).unwrap();
    let dir = tmpdir("tied");
    model.save_pretrained(&dir, SaveDType::F32).unwrap();
    let file = dir.join("model.safetensors");
    let mut tensors = load_file(&file).unwrap();
    assert!(!tensors.contains_key("lm_head.weight"));
    tensors.insert("lm_head.weight".into(), tensors["model.embed_tokens.weight"].clone());
    save_file(&file, &tensors, SaveDType::F32).unwrap();
    let back = DeepSeekV3::from_pretrained(&dir).unwrap();
    let ids = tokens(&cfg, 1, 6, 2);
    assert_eq!(logits_bits(&model, &ids), logits_bits(&back, &ids));
}

/// The raw tensors of a safetensors file: dtype and bytes by name.
fn raw_tensors(file: &std::path::Path) -> BTreeMap<String, (safetensors::Dtype, Vec<u8>)> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.data().to_vec()))).collect()
}

#[test]
fn fp8_weights_can_stay_fp8_for_inference_and_save_back_byte_identical() {
    use whale_model::generate::{CausalLm, SamplingConfig};
    let cfg = DeepSeekV3Config::tiny();
    let model = DeepSeekV3::new(cfg.clone(), 9).unwrap();
    let dir = tmpdir("fp8-keep");
    let expected = write_fp8_checkpoint(&model, &dir);
    let kept = DeepSeekV3::from_pretrained_fp8(&dir).unwrap();
    let whale_model::block::FeedForward::Moe(moe) = &kept.layers[1].mlp else { panic!("layer 1 is MoE") };
    let down = &moe.experts[0].down_proj;
    assert_eq!(down.weight.dtype(), DType::F8E4M3);
    assert!(down.weight_scale_inv.is_some() && down.is_fp8());
    let name = "model.layers.1.mlp.experts.0.down_proj.weight";
    assert!(kept.params.get(name).is_err(), "FP8 weights are not trained");
    assert!(kept.params.get("model.layers.1.mlp.gate.weight").is_ok(), "the router stays a trained f32 weight");

    // FP8 inference on the stored codes equals the dequantised model running FP8 GEMMs (which
    // re-quantises each weight block to the same codes and scales) bit for bit...
    let mut dequantised = DeepSeekV3::from_pretrained(&dir).unwrap();
    let ids = tokens(&cfg, 2, 8, 3);
    let plain = dequantised.logits(&ids).unwrap().to_vec_f32().unwrap();
    dequantised.set_fp8(Some(whale_tensor::fp8::Fp8Recipe::default()));
    assert_eq!(logits_bits(&kept, &ids), logits_bits(&dequantised, &ids));
    // ...and differs from plain f32 GEMMs on those weights by the activations' 1x128 E4M3
    // rounding: up to 2^-4 relative per element, about 3% RMS per GEMM, through chains of two
    // or three GEMMs in each of 4 layers.
    let a = kept.logits(&ids).unwrap().to_vec_f32().unwrap();
    let err = (a.iter().zip(&plain).map(|(x, y)| (x - y).powi(2)).sum::<f32>()
        / plain.iter().map(|y| y * y).sum::<f32>())
    .sqrt();
    assert!(err > 0.0 && err < 0.15, "FP8 vs dequantised f32 logits: relative error {err}");
    // Cached decoding (both caches; absorb dequantises kv_b_proj to fold it into the query):
    // each greedy token is the full forward's argmax at its position, up to rounding (the naive
    // cache's step quantises the same 1x128 activation tiles; absorb's folded product rounds
    // differently, as on a GPU: cuda_model.rs holds it to 1e-2).
    let vocab = cfg.vocab_size;
    for (cache, tol) in [(whale_model::mla::CacheMode::Naive, 1e-4), (whale_model::mla::CacheMode::Absorb, 1e-2)] {
        let sampling = SamplingConfig { cache, ..SamplingConfig::greedy(4, vec![]) };
        let out = kept.generate(&[vec![2, 3, 4]], &sampling, &mut Rng::new(0)).unwrap().remove(0);
        assert_eq!(out.tokens.len(), 4, "{cache:?}");
        let seq: Vec<i64> = [2, 3, 4].into_iter().chain(out.tokens[..3].iter().map(|&t| t as i64)).collect();
        let full = Tensor::from_vec(seq, &[1, 6], &Device::Cpu).unwrap();
        let logits = kept.logits(&full).unwrap().to_vec_f32().unwrap();
        for (k, &tok) in out.tokens.iter().enumerate() {
            let row = &logits[(2 + k) * vocab..(3 + k) * vocab];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert!(
                row[tok as usize] >= max - tol,
                "{cache:?} step {k}: token {tok} at {} vs max {max}",
                row[tok as usize]
            );
        }
        // The cached logits themselves, step by step, against the full forward's rows.
        let stepped_on = |model: &DeepSeekV3| common::cached_logits(model, &full, 3, cache).0.to_vec_f32().unwrap();
        let stepped = stepped_on(&kept);
        // The kept codes decode as the dequantised model does (its weights are codes x scales,
        // re-quantised to the same blocks), bit for bit: absorb's W_UK / W_UV read from the
        // FP8 blocks are the dequantised weight exactly.
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&stepped), bits(&stepped_on(&dequantised)), "{cache:?}: kept FP8 vs dequantised");
        let diff = stepped.iter().zip(&logits).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
        let err = diff / logits.iter().map(|b| b * b).sum::<f32>().sqrt();
        // Naive: the same FP8 GEMMs, rounding only (measured 2e-7). Absorb: kv_b_proj runs in f32
        // on its dequantised blocks where the full forward quantises its input to E4M3 (measured
        // 0.117; a kv_b_proj dequantised 1.5x too large gives 0.23).
        let bound = if cache == whale_model::mla::CacheMode::Naive { 1e-5 } else { 0.15 };
        assert!(err < bound, "{cache:?}: cached logits {err} from the full forward's");
    }

    // Saving writes the FP8 codes and scales back exactly as they were read.
    let again = tmpdir("fp8-keep-saved");
    kept.save_pretrained(&again, SaveDType::F32).unwrap();
    let (before, after) = (raw_tensors(&dir.join("model.safetensors")), raw_tensors(&again.join("model.safetensors")));
    for (name, (dtype, bytes)) in &before {
        if *dtype == safetensors::Dtype::F8_E4M3 || name.ends_with("_scale_inv") {
            assert_eq!(after.get(name), Some(&(*dtype, bytes.clone())), "{name}");
        }
    }
    // A scale that is not finite is refused by name, as any weight.
    let broken = tmpdir("fp8-nan-scale");
    let (mut raw, _) =
        whale_model::checkpoint::load_dir_with(&again, whale_model::checkpoint::Fp8Weights::Keep).unwrap();
    let scale_name = format!("{name}_scale_inv");
    let mut scale = raw[&scale_name].to_vec_f32().unwrap();
    scale[0] = f32::INFINITY;
    raw.insert(scale_name.clone(), Tensor::from_vec(scale, raw[&scale_name].dims(), &Device::Cpu).unwrap());
    std::fs::copy(again.join("config.json"), broken.join("config.json")).unwrap();
    save_file(&broken.join("model.safetensors"), &raw, SaveDType::F32).unwrap();
    let err = DeepSeekV3::from_pretrained_fp8(&broken).unwrap_err().to_string();
    assert!(err.contains(&scale_name) && err.contains("inf"), "{err}");
    // ...and its config.json declares them (HF readers would take the codes for values).
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(again.join("config.json")).unwrap()).unwrap();
    assert_eq!(written["quantization_config"]["weight_block_size"], serde_json::json!([128, 128]));
    let plain_save = tmpdir("fp8-dequantised-saved");
    dequantised.save_pretrained(&plain_save, SaveDType::F32).unwrap();
    assert!(!std::fs::read_to_string(plain_save.join("config.json")).unwrap().contains("quantization_config"));
    // Kept in FP8, a checkpoint with no FP8 weight would run no FP8 GEMM: refused.
    let err = DeepSeekV3::from_pretrained_fp8(&plain_save).unwrap_err().to_string();
    assert!(err.contains("no FP8 weights"), "{err}");
    // DeepSeek-V3.1's `scale_fmt: ue8m0`: kept, its activations are quantized with power-of-two
    // scales (the reference's act_quant with scale_fmt), bit for bit the dequantised model's FP8
    // GEMMs with that recipe, and not the f32-scale run; dequantised, it loads as any release.
    let v31 = tmpdir("fp8-ue8m0");
    let with_scale_fmt = |fmt: &str| {
        let mut config = written.clone();
        config["quantization_config"]["scale_fmt"] = serde_json::json!(fmt);
        std::fs::write(v31.join("config.json"), serde_json::to_string(&config).unwrap()).unwrap();
    };
    with_scale_fmt("ue8m0");
    std::fs::copy(again.join("model.safetensors"), v31.join("model.safetensors")).unwrap();
    let kept31 = DeepSeekV3::from_pretrained_fp8(&v31).unwrap();
    let ue8m0 = whale_tensor::fp8::Fp8Recipe {
        input_scales: whale_tensor::fp8::ScaleFormat::Ue8m0,
        ..whale_tensor::fp8::Fp8Recipe::default()
    };
    assert_eq!(kept31.fp8(), Some(ue8m0));
    assert_ne!(logits_bits(&kept31, &ids), logits_bits(&kept, &ids));
    // One stored layer against its definition: x in 1x128 tiles with power-of-two scales, times
    // the stored blocks, both decoded, in f32 (the GEMM promotes per 128 of K: rounding only).
    let o_proj = &kept31.layers[1].self_attn.o_proj;
    let width = o_proj.weight.dims()[1];
    let mut rng = Rng::new(17);
    let x: Vec<f32> = (0..3 * width).map(|_| rng.normal()).collect();
    let x = Tensor::from_vec(x, &[3, width], &Device::Cpu).unwrap();
    let (xq, xs) = x.quantize_fp8((1, 128), whale_tensor::fp8::Fp8Format::E4M3, ue8m0.input_scales).unwrap();
    assert!(xs.to_vec_f32().unwrap().iter().all(|s| s.log2().fract() == 0.0), "UE8M0 scales are powers of two");
    let want = Tensor::dequantize_fp8(&xq, &xs, (1, 128))
        .unwrap()
        .matmul(&o_proj.dense_weight().unwrap().t().unwrap())
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let got = whale_tensor::no_grad(|| o_proj.forward(&x)).unwrap().to_vec_f32().unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-5 * scale, "{g} vs {w}");
    }
    let loaded = DeepSeekV3::from_pretrained(&v31).unwrap();
    assert_eq!(logits_bits(&loaded, &ids), logits_bits(&DeepSeekV3::from_pretrained(&again).unwrap(), &ids));
    // Saved, it says so again; another scale format is refused by name.
    let resaved = tmpdir("fp8-ue8m0-saved");
    kept31.save_pretrained(&resaved, SaveDType::F32).unwrap();
    assert!(std::fs::read_to_string(resaved.join("config.json")).unwrap().contains(r#""scale_fmt": "ue8m0""#));
    assert_eq!(logits_bits(&DeepSeekV3::from_pretrained_fp8(&resaved).unwrap(), &ids), logits_bits(&kept31, &ids));
    with_scale_fmt("e5m2");
    let err = DeepSeekV3::from_pretrained_fp8(&v31).unwrap_err().to_string();
    assert!(err.contains("scale_fmt") && err.contains("e5m2") && err.contains("config.json"), "{err}");

    // And a trained f32 model exported as a release is what the independent writer above made.
    let exported = tmpdir("fp8-export");
    model.save_pretrained_fp8(&exported, SaveDType::F32).unwrap();
    let reloaded = DeepSeekV3::from_pretrained(&exported).unwrap();
    for (name, want) in &expected {
        let Ok(p) = reloaded.params.get(name) else { continue };
        assert_eq!(&p.to_vec_f32().unwrap(), want, "{name}");
    }
    let exported_raw = raw_tensors(&exported.join("model.safetensors"));
    assert_eq!(exported_raw[name].0, safetensors::Dtype::F8_E4M3);
    assert_eq!(exported_raw["model.layers.1.mlp.gate.weight"].0, safetensors::Dtype::F32);
}

#[test]
fn a_bf16_export_keeps_the_gate_bias_and_fp8_scales_in_f32() {
    let dir = tmpdir("bf16-export");
    let file = dir.join("model.safetensors");
    let t = || Tensor::from_vec(vec![0.1f32, -0.2003], &[2], &Device::Cpu).unwrap();
    let names = ["a.mlp.gate.e_score_correction_bias", "a.q_proj.weight_scale_inv", "a.q_proj.weight"];
    let tensors: BTreeMap<String, Tensor> = names.iter().map(|n| (n.to_string(), t())).collect();
    save_file(&file, &tensors, SaveDType::BF16).unwrap();
    // The safetensors header: an 8-byte length, then JSON naming each tensor's dtype.
    let bytes = std::fs::read(&file).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let dtype = |n: &str| header[n]["dtype"].as_str().unwrap().to_string();
    assert_eq!(dtype(names[0]), "F32");
    assert_eq!(dtype(names[1]), "F32");
    assert_eq!(dtype(names[2]), "BF16");
    // And the bias comes back exactly (bf16 would give 0.10009766).
    let bias: BTreeMap<String, Tensor> = [(names[0].to_string(), t())].into();
    save_file(&file, &bias, SaveDType::BF16).unwrap();
    assert_eq!(load_file(&file).unwrap()[names[0]].to_vec_f32().unwrap(), [0.1, -0.2003]);
}

#[test]
fn a_sequence_too_short_for_the_mtp_module_still_reports_every_moe_layers_load() {
    // One token: no target lies one ahead, so the MTP module routes nothing; its load is zeros
    // and the bias update (which needs one load per MoE layer) still runs.
    let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 3).unwrap();
    assert!(!model.mtp.is_empty(), "the tiny preset has an MTP module");
    let ids = Tensor::from_vec(vec![5i64, 7], &[2, 1], &Device::Cpu).unwrap();
    let out = model.forward(&ids, Some(&ids)).unwrap();
    assert_eq!(out.expert_load.len(), model.moe_layers().len());
    assert!(out.expert_load.last().unwrap().iter().all(|&c| c == 0), "the MTP layer routed nothing");
    let mtp_bias = |m: &DeepSeekV3| {
        m.moe_layers().last().unwrap().gate.e_score_correction_bias.as_ref().unwrap().to_vec_f32().unwrap()
    };
    let before = mtp_bias(&model);
    model.update_balancing_biases(&out.expert_load).unwrap();
    assert_eq!(mtp_bias(&model), before, "a layer that routed nothing keeps its bias");
}
