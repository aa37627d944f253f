//! The tensor path's language model against the fast path on the committed fixture models,
//! finite-difference checks of its layers, and segment-wise backward.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::checkpoint::{Checkpoint, WeightFiles};
use crate::config::Florence2Config;
use crate::model::Florence2;
use crate::tensor::ops::gradcheck;
use crate::tensor::{segment, Parameters, Pass};
use crate::LoadOptions;

/// Uniform values in `[-1, 1)`, seeded, in `dtype`.
fn uniform(shape: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.gen::<f64>() * 2.0 - 1.0).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar()?)
}

/// `got` within `tol` of `expected`, relative to `expected`'s largest entry (at least 1).
fn assert_close(got: &Tensor, expected: &Tensor, tol: f64, what: &str) -> Result<()> {
    let diff = max_abs(&(got - expected)?)?;
    let scale = max_abs(expected)?.max(1.0);
    assert!(diff <= tol * scale, "{what}: differs by {diff:e} (scale {scale})");
    Ok(())
}

struct Fixture {
    config: Florence2Config,
    params: Parameters,
    fast: Florence2,
}

/// A committed fixture model, as the tensor path's parameters and as the fast path.
fn fixture(name: &str) -> Result<Fixture> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name);
    let config = Florence2Config::from_file(&dir.join("config.json"))?;
    let files = WeightFiles::discover(&dir)?;
    let mut checkpoint = Checkpoint::open(&files)?;
    checkpoint.check(&config, false)?;
    let params = Parameters::from_checkpoint(&config, &checkpoint, &Device::Cpu, |_| true)?;
    let fast = Florence2::load(config.clone(), &files, &LoadOptions::default())?;
    Ok(Fixture { config, params, fast })
}

/// Two samples of different prompt and label lengths: the second is padded in both.
fn batch(pad_in_loss: bool) -> Result<(Vec<Vec<u32>>, TextInputs)> {
    let prompts = vec![vec![0, 5, 17, 300, 2], vec![0, 9, 2]];
    let labels = vec![vec![0, 40, 41, 4242, 43, 2], vec![0, 50, 2]];
    let inputs = TextInputs::new(&prompts, &labels, pad_in_loss, &Device::Cpu)?;
    Ok((prompts, inputs))
}

#[test]
fn text_inputs_collate_as_semantics_says() -> Result<()> {
    let prompts = vec![vec![0, 5, 6, 2], vec![0, 7, 2]];
    let labels = vec![vec![0, 10, 11, 2], vec![0, 12, 2]];
    for pad_in_loss in [false, true] {
        let t = TextInputs::new(&prompts, &labels, pad_in_loss, &Device::Cpu)?;
        assert_eq!(t.prompt_ids.to_vec2::<u32>()?, [[0, 5, 6, 2], [0, 7, 2, 1]]);
        assert_eq!(t.prompt_mask.to_vec2::<f32>()?, [[1., 1., 1., 1.], [1., 1., 1., 0.]]);
        assert_eq!(t.labels.to_vec2::<u32>()?, [[0, 10, 11, 2], [0, 12, 2, 1]]);
        assert_eq!(t.decoder_input_ids.to_vec2::<u32>()?, [[2, 0, 10, 11], [2, 0, 12, 2]]);
        let last = if pad_in_loss { 1. } else { 0. };
        assert_eq!(t.label_mask.to_vec2::<f32>()?, [[1., 1., 1., 1.], [1., 1., 1., last]]);
        assert_eq!(t.label_count, if pad_in_loss { 8 } else { 7 });
    }
    assert!(TextInputs::new(&[], &[], false, &Device::Cpu).is_err());
    assert!(TextInputs::new(&prompts, &labels[..1], false, &Device::Cpu).is_err());
    assert!(TextInputs::new(&prompts, &[vec![0, 2], vec![]], false, &Device::Cpu).is_err());
    Ok(())
}

/// Each sample of a padded batch against the fast path run on that sample alone: padding is
/// masked out of the encoder's and the cross-attention's keys.
fn check_fast_path_parity(name: &str) -> Result<()> {
    let f = fixture(name)?;
    let model = BartLanguageModel::new(&f.config.text, f.params.var_builder())?;
    let (prompts, inputs) = batch(false)?;
    let n_image = 7;
    let image = uniform(&[2, n_image, f.config.text.d_model], 1, DType::F32)?;
    let memory = model.encode(&image, &inputs, &mut Mode::eval())?;
    let logits = model.logits(&image, &inputs, &mut Mode::eval())?;
    for (i, prompt) in prompts.iter().enumerate() {
        let fast_memory = f.fast.encode(&image.narrow(0, i, 1)?, prompt)?;
        let ours = memory.narrow(0, i, 1)?.narrow(1, 0, n_image + prompt.len())?;
        assert_close(&ours, &fast_memory, 1e-4, &format!("{name} sample {i} encoder output"))?;

        // The fast path's incremental decoder, fed the teacher-forced inputs one by one.
        let mut decoder = f.fast.decoder(&fast_memory, 1)?;
        let steps = inputs
            .decoder_input_ids
            .get(i)?
            .to_vec1::<u32>()?
            .iter()
            .map(|&t| decoder.step_logits(&[t]))
            .collect::<Result<Vec<_>>>()?;
        let fast_logits = Tensor::cat(&steps, 0)?;
        assert_close(
            &logits.get(i)?,
            &fast_logits,
            1e-4,
            &format!("{name} sample {i} logits"),
        )?;
    }
    Ok(())
}

#[test]
fn matches_the_fast_path_on_the_remote_fixture() -> Result<()> {
    check_fast_path_parity("remote_f32")
}

#[test]
fn matches_the_fast_path_on_the_native_fixture() -> Result<()> {
    check_fast_path_parity("native_f32")
}

fn tiny_config() -> TextConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 11, "d_model": 4, "encoder_layers": 1, "decoder_layers": 1,
        "encoder_attention_heads": 2, "decoder_attention_heads": 2,
        "encoder_ffn_dim": 6, "decoder_ffn_dim": 5, "max_position_embeddings": 8
    }))
    .expect("a valid text config")
}

/// Names and shapes of a layer's tensors: attention blocks, layer norms and the MLP.
fn layer_shapes(attentions: &[&str], norms: &[&str], d: usize, ffn: usize) -> Vec<(String, Vec<usize>)> {
    let mut shapes = Vec::new();
    for a in attentions {
        for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            shapes.push((format!("{a}.{p}.weight"), vec![d, d]));
            shapes.push((format!("{a}.{p}.bias"), vec![d]));
        }
    }
    for n in norms {
        shapes.push((format!("{n}.weight"), vec![d]));
        shapes.push((format!("{n}.bias"), vec![d]));
    }
    shapes.push(("fc1.weight".into(), vec![ffn, d]));
    shapes.push(("fc1.bias".into(), vec![ffn]));
    shapes.push(("fc2.weight".into(), vec![d, ffn]));
    shapes.push(("fc2.bias".into(), vec![d]));
    shapes
}

/// A layer's tensors, random, in f64 (so that finite differences are exact): those checked,
/// and the key biases, held fixed because their gradient is exactly zero (a constant added to
/// a row of scores leaves the softmax unchanged), which finite differences see as noise.
struct LayerTensors {
    names: Vec<String>,
    checked: Vec<Tensor>,
    fixed: HashMap<String, Tensor>,
}

impl LayerTensors {
    fn random(shapes: Vec<(String, Vec<usize>)>, seed: u64) -> Result<Self> {
        let mut t = Self {
            names: Vec::new(),
            checked: Vec::new(),
            fixed: HashMap::new(),
        };
        for (i, (name, shape)) in shapes.into_iter().enumerate() {
            let value = uniform(&shape, seed + i as u64, DType::F64)?;
            if name.ends_with("k_proj.bias") {
                t.fixed.insert(name, value);
            } else {
                t.names.push(name);
                t.checked.push(value);
            }
        }
        Ok(t)
    }

    /// A builder over the fixed tensors and `checked`, the values of the checked ones.
    fn builder(&self, checked: &[Tensor]) -> VarBuilder<'static> {
        let mut map = self.fixed.clone();
        map.extend(self.names.iter().cloned().zip(checked.iter().cloned()));
        VarBuilder::from_tensors(map, DType::F64, &Device::Cpu)
    }
}

#[test]
fn encoder_layer_gradients_match_finite_differences() -> Result<()> {
    let cfg = tiny_config();
    let shapes = layer_shapes(&["self_attn"], &["self_attn_layer_norm", "final_layer_norm"], 4, 6);
    let tensors = LayerTensors::random(shapes, 200)?;
    let mut inputs = vec![uniform(&[2, 3, 4], 100, DType::F64)?];
    inputs.extend(tensors.checked.iter().cloned());
    // The second sample's last key is padding.
    let mask = additive_mask(&Tensor::new(&[[1f32, 1., 1.], [1., 1., 0.]], &Device::Cpu)?, DType::F64)?;
    gradcheck::check(
        |t| {
            let layer = EncoderLayer::new(&cfg, tensors.builder(&t[1..]))?;
            layer.forward(&t[0], &mask, &mut Mode::eval())
        },
        &inputs,
        1e-6,
        1e-5,
    )
}

#[test]
fn decoder_layer_gradients_match_finite_differences() -> Result<()> {
    let cfg = tiny_config();
    let shapes = layer_shapes(
        &["self_attn", "encoder_attn"],
        &["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
        4,
        5,
    );
    let tensors = LayerTensors::random(shapes, 300)?;
    let mut inputs = vec![
        uniform(&[2, 3, 4], 100, DType::F64)?,
        uniform(&[2, 4, 4], 101, DType::F64)?,
    ];
    inputs.extend(tensors.checked.iter().cloned());
    let causal = causal_mask(3, DType::F64, &Device::Cpu)?;
    let memory_mask = additive_mask(
        &Tensor::new(&[[1f32, 1., 1., 1.], [1., 1., 0., 0.]], &Device::Cpu)?,
        DType::F64,
    )?;
    gradcheck::check(
        |t| {
            let layer = DecoderLayer::new(&cfg, tensors.builder(&t[2..]))?;
            layer.forward(&t[0], &t[1], (&causal, &memory_mask), &mut Mode::eval())
        },
        &inputs,
        1e-6,
        1e-5,
    )
}

#[test]
fn masks_hold_zero_and_the_dtype_minimum() -> Result<()> {
    let causal = causal_mask(3, DType::F32, &Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let m = f32::MIN;
    assert_eq!(causal, [0., m, m, 0., 0., m, 0., 0., 0.]);
    let padding = additive_mask(&Tensor::new(&[[1f32, 0.]], &Device::Cpu)?, DType::F64)?;
    assert_eq!(padding.flatten_all()?.to_vec1::<f64>()?, [0., f64::MIN]);
    Ok(())
}

/// The language model's trainable variables (vision and projector are left out).
fn language_vars(params: &Parameters) -> Vec<Var> {
    params
        .trainable()
        .into_iter()
        .filter(|(n, _)| n.starts_with("language_model."))
        .map(|(_, v)| v.clone())
        .collect()
}

#[test]
fn segment_wise_backward_equals_one_graph_and_checkpointing_changes_nothing() -> Result<()> {
    let f = fixture("remote_f32")?;
    let mut cfg = f.config.text.clone();
    (cfg.dropout, cfg.attention_dropout, cfg.activation_dropout) = (0.1, 0.1, 0.1);
    let model = BartLanguageModel::new(&cfg, f.params.var_builder())?;
    let vars = language_vars(&f.params);
    let (_, inputs) = batch(true)?;
    let image = uniform(&[2, 5, cfg.d_model], 2, DType::F32)?;
    let chain = model.segments(&inputs);
    let run = |train, checkpointing| {
        let pass = Pass {
            train,
            seed: 5,
            checkpointing,
        };
        segment::backward(&chain, vec![image.clone()], &vars, 1.0, &pass)
    };

    // Evaluation: the chain's gradients are those of one graph through `logits`.
    let (objective, grads) = run(false, true)?;
    let logits = model.logits(&image, &inputs, &mut Mode::eval())?;
    let whole = cross_entropy_sum(&logits, &inputs.labels, &inputs.label_mask)?;
    assert_close(&objective, &whole, 1e-6, "objective")?;
    let store = whole.backward()?;
    for (k, (var, grad)) in vars.iter().zip(&grads).enumerate() {
        let expected = store.get(var.as_tensor()).expect("one graph reaches every parameter");
        let got = grad.as_ref().expect("the chain reaches every parameter");
        let scale = max_abs(expected)?.max(1e-6);
        let diff = max_abs(&(got - expected)?)?;
        assert!(diff <= 1e-5 * scale, "parameter {k}: {diff:e} (scale {scale:e})");
    }

    // Training, with every dropout on: recomputation draws the same masks.
    let (a, with) = run(true, true)?;
    let (b, without) = run(true, false)?;
    assert_eq!(a.to_scalar::<f32>()?, b.to_scalar::<f32>()?);
    assert_ne!(
        a.to_scalar::<f32>()?,
        objective.to_scalar::<f32>()?,
        "dropout is active"
    );
    for (k, (g1, g2)) in with.iter().zip(&without).enumerate() {
        let (g1, g2) = (g1.as_ref().unwrap(), g2.as_ref().unwrap());
        assert_eq!(max_abs(&(g1 - g2)?)?, 0.0, "parameter {k}");
    }
    Ok(())
}

/// Every language parameter's gradient against transformers' BART on one padded micro-batch
/// with `pad_in_loss` (tools/reference/language_grad_ref.py).
#[test]
fn gradients_equal_transformers() -> Result<()> {
    let f = fixture("native_f32")?;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/language_grad.safetensors");
    let reference = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let model = BartLanguageModel::new(&f.config.text, f.params.var_builder())?;
    let (_, inputs) = batch(true)?;
    let pass = Pass {
        train: false,
        seed: 0,
        checkpointing: true,
    };
    let named: Vec<(&str, Var)> = f
        .params
        .trainable()
        .into_iter()
        .filter(|(n, _)| n.starts_with("language_model."))
        .map(|(n, v)| (n, v.clone()))
        .collect();
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let (loss, grads) = segment::backward(
        &model.segments(&inputs),
        vec![reference["image_embeds"].clone()],
        &vars,
        1.0,
        &pass,
    )?;
    assert_close(&loss.reshape(1)?, &reference["loss"], 1e-5, "loss")?;
    assert_eq!(named.len(), reference.len() - 2, "one reference gradient per parameter");
    for ((name, _), grad) in named.iter().zip(&grads) {
        let expected = &reference[&format!("grad.{name}")];
        let got = grad.as_ref().expect("every language parameter gets a gradient");
        let diff = max_abs(&(got - expected)?)?;
        if name.ends_with("k_proj.bias") {
            // Exactly zero (a constant added to a row of scores leaves the softmax as it is):
            // both sides hold rounding noise.
            assert!(max_abs(got)? < 1e-6 && max_abs(expected)? < 1e-6, "{name}");
            continue;
        }
        let scale = max_abs(expected)?;
        assert!(diff <= 1e-4 * scale, "{name}: differs by {diff:e} (scale {scale:e})");
    }
    Ok(())
}
