//! The optimizers, gradient clipping and schedules against `tools/reference/optim_ref.py`'s
//! fixtures (came-pytorch 0.1.3, torch.optim.AdamW, clip_grad_norm_, torch's schedulers as the
//! reference trainer drives them).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor, Var};
use florence_train::optim::{clip_grad_norm, OptimizerKind, Param};
use florence_train::schedule::{Schedule, ScheduleKind};
use serde_json::Value;

/// The fixture parameters, in the order the optimizers see them.
const NAMES: [&str; 5] = ["w2d", "w3d", "b1d", "one", "tall"];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/optim")
        .join(name)
}

fn meta() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("optim.json")).unwrap()).unwrap()
}

fn tensors(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(file), &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The largest `|a - b| / |b|` (`b` the reference), over elements with `|b| > floor`, and the
/// largest `|a - b|` over the others.
fn errors(a: &Tensor, b: &Tensor, floor: f64) -> (f64, f64) {
    assert_eq!(a.dims(), b.dims());
    let (mut rel, mut abs) = (0f64, 0f64);
    for (x, y) in values(a).into_iter().zip(values(b)) {
        let d = (f64::from(x) - f64::from(y)).abs();
        if f64::from(y).abs() > floor {
            rel = rel.max(d / f64::from(y).abs());
        } else {
            abs = abs.max(d);
        }
    }
    (rel, abs)
}

fn params_from(t: &HashMap<String, Tensor>, prefix: &str) -> Vec<Param> {
    NAMES
        .iter()
        .map(|n| Param {
            name: n.to_string(),
            var: Var::from_tensor(&t[&format!("{prefix}.{n}")]).unwrap(),
        })
        .collect()
}

fn grads(t: &HashMap<String, Tensor>, step: usize) -> Vec<Tensor> {
    NAMES.iter().map(|n| t[&format!("grad{step}.{n}")].clone()).collect()
}

fn rates() -> Vec<f64> {
    meta()["rates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn decay(key: &str) -> f64 {
    meta()["weight_decay"][key].as_f64().unwrap()
}

/// `max |a - b| / max |b|`: the error on the tensor's scale, for running averages whose
/// elements may nearly cancel.
fn scaled_error(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (values(a), values(b));
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    f64::from(err) / f64::from(scale)
}

/// Three steps against the reference: the parameters within 1e-6 relative, every state slot
/// (torch's names) within 1e-6 of its largest element, and no slot more or less than torch's.
fn check_against_reference(kind: OptimizerKind, key: &str, file: &str) {
    let t = tensors(file);
    let params = params_from(&t, "init");
    let mut opt = kind.build(decay(key));
    for (s, lr) in rates().into_iter().enumerate().map(|(i, lr)| (i + 1, lr)) {
        opt.step(&params, &grads(&t, s), lr).unwrap();
        for p in &params {
            let (rel, abs) = errors(p.var.as_tensor(), &t[&format!("param{s}.{}", p.name)], 1e-3);
            println!("{key} step {s} {}: param rel {rel:.2e} abs {abs:.2e}", p.name);
            assert!(
                rel <= 1e-6 && abs <= 1e-9,
                "{key} step {s} {}: rel {rel:e} abs {abs:e}",
                p.name
            );
        }
        let state: HashMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
        let prefix = format!("state{s}.");
        let mut expected: Vec<&str> = t.keys().filter_map(|k| k.strip_prefix(&prefix)).collect();
        let mut got: Vec<&str> = state.keys().map(String::as_str).filter(|k| *k != "step").collect();
        expected.sort();
        got.sort();
        assert_eq!(got, expected, "{key} step {s}: state slots");
        for name in got {
            let err = scaled_error(&state[name], &t[&format!("{prefix}{name}")]);
            println!("{key} step {s} {name}: scaled error {err:.2e}");
            assert!(err <= 1e-6, "{key} step {s} {name}: scaled error {err:e}");
        }
    }
}

#[test]
fn came_matches_came_pytorch() {
    check_against_reference(OptimizerKind::Came, "CAME", "came.safetensors");
}

#[test]
fn adamw_matches_torch() {
    check_against_reference(OptimizerKind::AdamW, "AdamW", "adamw.safetensors");
}

fn assert_bitwise(a: &Tensor, b: &Tensor, what: &str) {
    let bits = |t: &Tensor| values(t).into_iter().map(f32::to_bits).collect::<Vec<_>>();
    assert_eq!(bits(a), bits(b), "{what}");
}

/// Saving the state after step 1 through a safetensors file, loading it into a fresh optimizer
/// and fresh parameters, and taking steps 2 and 3 gives what three uninterrupted steps give.
fn check_resume(kind: OptimizerKind, key: &str, file: &str) {
    let t = tensors(file);
    let lrs = rates();
    let whole = params_from(&t, "init");
    let mut opt = kind.build(decay(key));
    for s in 1..=3 {
        opt.step(&whole, &grads(&t, s), lrs[s - 1]).unwrap();
    }

    let first = params_from(&t, "init");
    let mut before = kind.build(decay(key));
    before.step(&first, &grads(&t, 1), lrs[0]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    let saved: HashMap<String, Tensor> = before.state().unwrap().into_iter().collect();
    candle_core::safetensors::save(&saved, &path).unwrap();
    let resumed_params: Vec<Param> = first
        .iter()
        .map(|p| Param {
            name: p.name.clone(),
            var: Var::from_tensor(&p.var.as_detached_tensor()).unwrap(),
        })
        .collect();
    let mut after = kind.build(decay(key));
    after
        .load_state(
            &resumed_params,
            &candle_core::safetensors::load(&path, &Device::Cpu).unwrap(),
        )
        .unwrap();
    for s in 2..=3 {
        after.step(&resumed_params, &grads(&t, s), lrs[s - 1]).unwrap();
    }

    for (a, b) in resumed_params.iter().zip(&whole) {
        assert_bitwise(a.var.as_tensor(), b.var.as_tensor(), &format!("{key} {}", a.name));
    }
    let (sa, sb) = (after.state().unwrap(), opt.state().unwrap());
    assert_eq!(sa.len(), sb.len());
    for ((na, ta), (nb, tb)) in sa.iter().zip(&sb) {
        assert_eq!(na, nb);
        if na != "step" {
            assert_bitwise(ta, tb, &format!("{key} state {na}"));
        }
    }
}

#[test]
fn came_resume_is_bitwise() {
    check_resume(OptimizerKind::Came, "CAME", "came.safetensors");
}

#[test]
fn adamw_resume_is_bitwise() {
    check_resume(OptimizerKind::AdamW, "AdamW", "adamw.safetensors");
}

/// A state that does not fit the parameters, and a step with the wrong gradients, are errors.
#[test]
fn mismatches_are_errors() {
    let t = tensors("adamw.safetensors");
    let params = params_from(&t, "init");
    let mut opt = OptimizerKind::AdamW.build(0.0);
    assert!(opt.step(&params, &grads(&t, 1)[1..], 1e-3).is_err());
    let mut wrong = grads(&t, 1);
    wrong.swap(0, 1);
    assert!(opt.step(&params, &wrong, 1e-3).is_err());
    opt.step(&params, &grads(&t, 1), 1e-3).unwrap();

    let mut state: HashMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
    state.remove("step");
    assert!(OptimizerKind::AdamW.build(0.0).load_state(&params, &state).is_err());
    // CAME's slots are not AdamW's.
    assert!(OptimizerKind::Came.build(0.0).load_state(&params, &state).is_err());
}

#[test]
fn clip_grad_norm_matches_torch() {
    let t = tensors("clip.safetensors");
    for (c, case) in meta()["clip"].as_array().unwrap().iter().enumerate() {
        let max_norm = case["max_norm"].as_f64().unwrap();
        let expected = case["norm"].as_f64().unwrap();
        let mut grads: Vec<Tensor> = (0..NAMES.len()).map(|i| t[&format!("grad.{i}")].clone()).collect();
        let norm = clip_grad_norm(&mut grads, max_norm).unwrap();
        println!("clip {max_norm}: norm {norm} torch {expected}");
        assert!((norm - expected).abs() <= 1e-6 * expected, "norm {norm} vs {expected}");
        for (i, g) in grads.iter().enumerate() {
            let (rel, abs) = errors(g, &t[&format!("clipped{c}.{i}")], 1e-30);
            assert!(rel <= 1e-6 && abs == 0.0, "clip {max_norm} grad {i}: rel {rel:e}");
        }
    }
    assert_eq!(clip_grad_norm(&mut [], 1.0).unwrap(), 0.0);
}

#[test]
fn schedules_match_torch_at_every_step() {
    let mut exact = 0;
    let mut all = 0;
    for entry in meta()["schedules"].as_array().unwrap() {
        let kind = match entry["kind"].as_str().unwrap() {
            "REX" => ScheduleKind::Rex,
            "Cosine" => ScheduleKind::Cosine,
            "Constant" => ScheduleKind::Constant,
            "Linear" => ScheduleKind::Linear,
            other => panic!("unknown schedule {other}"),
        };
        let num = |k: &str| entry[k].as_f64().unwrap();
        let int = |k: &str| entry[k].as_u64().unwrap() as usize;
        let schedule = Schedule::new(kind, num("lr"), num("min_lr"), int("warmup"), int("total"));
        for (i, want) in entry["rates"].as_array().unwrap().iter().enumerate() {
            let (step, want) = (i + 1, want.as_f64().unwrap());
            let got = schedule.lr(step);
            let ok = (got - want).abs() <= 1e-9 * want.abs() || (got - want).abs() <= 1e-15;
            assert!(
                ok,
                "{kind:?} {entry_id}: step {step}: {got:e} vs torch {want:e}",
                entry_id = label(entry)
            );
            exact += usize::from(got == want);
            all += 1;
        }
    }
    println!("schedules: {exact} of {all} rates bit-identical to torch's");
}

fn label(entry: &Value) -> String {
    format!(
        "lr {} min {} W {} T {}",
        entry["lr"], entry["min_lr"], entry["warmup"], entry["total"]
    )
}
