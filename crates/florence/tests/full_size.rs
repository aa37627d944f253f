//! Opt-in parity check on random full-size models (Florence-2-base and -large shapes) made by
//! `tools/reference/make_full_size.py`, which also records transformers' tokens:
//!
//! ```text
//! FLORENCE_FULL_SIZE_DIRS=/tmp/base:/tmp/large cargo test --release -p florence --test full_size -- --ignored
//! ```

mod common;

use florence::generation::EarlyStopping;
use florence::{Florence, LoadOptions, Task};
use serde_json::Value;

#[test]
#[ignore = "needs FLORENCE_FULL_SIZE_DIRS from tools/reference/make_full_size.py (GBs of weights)"]
fn full_size_models_generate_the_reference_tokens() {
    let dirs = std::env::var("FLORENCE_FULL_SIZE_DIRS")
        .expect("set FLORENCE_FULL_SIZE_DIRS to directories made by tools/reference/make_full_size.py");
    let mut checked = 0;
    for dir in dirs.split(':').filter(|d| !d.is_empty()) {
        let dir = std::path::Path::new(dir);
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let model = Florence::load(dir, &LoadOptions::default()).unwrap();
        for case in expected["cases"].as_array().unwrap() {
            let g = &case["generation"];
            let mut gen = model.generation_config().clone();
            gen.num_beams = g["num_beams"].as_u64().unwrap() as usize;
            gen.max_new_tokens = g["max_new_tokens"].as_u64().unwrap() as usize;
            gen.min_new_tokens = g["min_new_tokens"].as_u64().unwrap() as usize;
            gen.early_stopping = EarlyStopping::Finished;
            let img = florence::preprocess::load_image(case["image"].as_str().unwrap().as_ref()).unwrap();
            let task = Task::new(case["task"].as_str().unwrap(), None).unwrap();
            let out = &model.run(&[img], &task, &gen).unwrap()[0];
            let want = common::token_ids(&case["ids"]);
            assert_eq!(out.ids, want, "{}: {} beams", dir.display(), gen.num_beams);
            assert_eq!(out.raw, case["raw"].as_str().unwrap());
            eprintln!(
                "{}: {} beams, {} tokens identical",
                dir.display(),
                gen.num_beams,
                want.len()
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no full-size cases found");
}
