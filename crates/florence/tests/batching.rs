//! Continuous batching: images that join a running batch at different steps, with different
//! tasks, beam counts and lengths, get exactly the tokens transformers gives them (the parity
//! fixtures' reference ids), and sampled captions equal those of a lone run.

mod common;

use florence::batching::{Event, Joining, RunningBatch};
use florence::{Florence, LoadOptions, SamplingConfig};

/// Every case image of every fixture model, one joining every other step (two at a time at
/// the start), so that images at all positions, with all settings, share decoding steps.
#[test]
fn staggered_joins_give_the_reference_tokens() {
    let mut checked = 0;
    for name in common::model_names() {
        let dir = common::model_dir(&name);
        let model = Florence::load(dir.path(), &LoadOptions::default()).unwrap();
        let mut waiting = Vec::new();
        let mut want = Vec::new();
        for case in common::cases(&name)["cases"].as_array().unwrap() {
            let (task, images) = common::case_inputs(case);
            let generation = common::generation_config(model.generation_config(), &case["generation"]);
            for (i, image) in images.iter().enumerate() {
                waiting.push(Joining {
                    key: want.len(),
                    image: model.processor().prepare(image),
                    task: task.clone(),
                    generation: generation.clone(),
                });
                want.push(common::token_ids(&case["ids"][i]));
            }
        }
        waiting.reverse();
        let mut got: Vec<Option<Vec<u32>>> = vec![None; want.len()];
        let mut batch = RunningBatch::new(&model).unwrap();
        let mut most_rows = 0;
        for step in 0.. {
            let joining: Vec<_> = match step {
                0 => waiting.split_off(waiting.len().saturating_sub(2)),
                s if s % 2 == 1 => waiting.pop().into_iter().collect(),
                _ => Vec::new(),
            };
            let mut events = batch.join(joining);
            most_rows = most_rows.max(batch.rows());
            if batch.is_empty() && waiting.is_empty() && events.is_empty() {
                break;
            }
            events.extend(batch.step().unwrap());
            for event in events {
                if let Event::Done { key, output } = event {
                    assert!(got[key].is_none(), "{name}: image {key} finished twice");
                    got[key] = Some(output.unwrap().ids);
                }
            }
        }
        assert!(most_rows > 6, "{name}: the batch never held more than {most_rows} rows");
        for (key, (got, want)) in got.into_iter().zip(&want).enumerate() {
            assert_eq!(got.as_ref(), Some(want), "{name}: image {key}");
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} images checked");
}

/// Sampling with a seed gives the same caption in a batch as alone, and the token events of a
/// one-row search begin its result.
#[test]
fn sampled_images_equal_lone_runs_and_stream_their_prefixes() {
    let name = &common::model_names()[0];
    let dir = common::model_dir(name);
    let model = Florence::load(dir.path(), &LoadOptions::default()).unwrap();
    let case = &common::cases(name)["cases"][0];
    let (task, images) = common::case_inputs(case);
    let mut generation = model.generation_config().clone();
    generation.num_beams = 1;
    generation.max_new_tokens = 20;
    let settings: Vec<_> = (0..4u64)
        .map(|seed| {
            let mut g = generation.clone();
            g.sampling = Some(SamplingConfig {
                seed,
                top_k: 0,
                ..SamplingConfig::default()
            });
            g
        })
        .collect();
    let image = &images[0];
    let alone: Vec<Vec<u32>> = settings
        .iter()
        .map(|g| model.run(std::slice::from_ref(image), &task, g).unwrap()[0].ids.clone())
        .collect();
    assert!(
        alone.windows(2).any(|w| w[0] != w[1]),
        "the seeds should give different captions"
    );

    let mut batch = RunningBatch::new(&model).unwrap();
    let mut streamed: Vec<Vec<u32>> = vec![Vec::new(); settings.len()];
    let mut got: Vec<Option<Vec<u32>>> = vec![None; settings.len()];
    for (key, g) in settings.iter().enumerate() {
        // Each joins one step after the previous one.
        let joined = batch.join(vec![Joining {
            key,
            image: model.processor().prepare(image),
            task: task.clone(),
            generation: g.clone(),
        }]);
        assert!(joined.is_empty());
        for event in batch.step().unwrap() {
            match event {
                Event::Token { key, ids } => {
                    assert!(ids.starts_with(&streamed[key]), "tokens so far only grow");
                    streamed[key] = ids;
                }
                Event::Done { key, output } => got[key] = Some(output.unwrap().ids),
            }
        }
    }
    while !batch.is_empty() {
        for event in batch.step().unwrap() {
            match event {
                Event::Token { key, ids } => streamed[key] = ids,
                Event::Done { key, output } => got[key] = Some(output.unwrap().ids),
            }
        }
    }
    for (key, want) in alone.iter().enumerate() {
        assert_eq!(got[key].as_ref(), Some(want), "seed {key}");
        assert!(
            streamed[key].len() > 1 && want.starts_with(&streamed[key]),
            "seed {key}: streamed {:?}",
            streamed[key]
        );
    }
}

/// Settings that do not fit the model are refused on joining, the others join.
#[test]
fn bad_settings_are_refused_on_joining() {
    let name = &common::model_names()[0];
    let dir = common::model_dir(name);
    let model = Florence::load(dir.path(), &LoadOptions::default()).unwrap();
    let (task, images) = common::case_inputs(&common::cases(name)["cases"][0]);
    let mut bad = model.generation_config().clone();
    bad.max_new_tokens = 0;
    let join = |key: usize, generation| Joining {
        key,
        image: model.processor().prepare(&images[0]),
        task: task.clone(),
        generation,
    };
    let mut batch = RunningBatch::new(&model).unwrap();
    let events = batch.join(vec![join(0, bad), join(1, model.generation_config().clone())]);
    assert_eq!(batch.len(), 1);
    match &events[..] {
        [Event::Done { key: 0, output: Err(e) }] => assert!(e.to_string().contains("max_new_tokens"), "{e}"),
        other => panic!("{other:?}"),
    }
}
