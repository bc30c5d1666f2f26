//! Activation statistics of an fp32 model over a calibration set, computed by tract:
//! the wanted intermediate values become extra model outputs, and every run feeds
//! their values into one [`Histogram`] per value.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;

use super::histogram::Histogram;
use super::inputs::InputSet;

/// Statistics of the ONNX values `names` of the model in `onnx` (serialized ModelProto),
/// over every input of `inputs` at `input_size`. A name may be the graph input.
pub fn collect(
    onnx: &[u8],
    names: &[String],
    inputs: &InputSet,
    input_size: usize,
    threads: usize,
    progress: &ProgressBar,
) -> Result<BTreeMap<String, Histogram>> {
    let plan = plan_with_outputs(onnx, names, input_size)?;
    let executor = if threads > 1 {
        Executor::multithread(threads)
    } else {
        Executor::SingleThread
    };
    let mut stats: BTreeMap<String, Histogram> = names
        .iter()
        .map(|n| (n.clone(), Histogram::new()))
        .collect();
    progress.reset();
    progress.set_length(inputs.len() as u64);
    for input in inputs.tensors(input_size) {
        let input = input?.into_tensor();
        let outputs =
            crate::ops::on_executor(&executor, || plan.run(tvec!(input.clone().into_tvalue())))
                .context("running the calibration model")?;
        for (name, value) in names.iter().zip(outputs.iter()) {
            let view = value.to_plain_array_view::<f32>()?;
            let values = view
                .as_slice()
                .map(|s| s.to_vec())
                .unwrap_or_else(|| view.iter().copied().collect());
            stats
                .get_mut(name)
                .expect("one histogram per name")
                .add(&values)
                .with_context(|| format!("calibrating {name}"))?;
        }
        progress.inc(1);
    }
    progress.finish();
    Ok(stats)
}

/// The model with outputs `names` (in that order), optimized by tract for a
/// `[1, 3, size, size]` f32 input.
pub fn plan_with_outputs(
    onnx: &[u8],
    names: &[String],
    input_size: usize,
) -> Result<Arc<TypedSimplePlan>> {
    let mut model = crate::onnx::loader()
        .model_for_read(&mut &onnx[..])
        .context("loading the model for calibration")?;
    let mut outlets = vec![];
    for name in names {
        // Graph inputs are source nodes named after the input, without an outlet label.
        let source = model
            .input_outlets()?
            .iter()
            .find(|o| model.node(o.node).name == *name)
            .copied();
        match model.find_outlet_label(name).or(source) {
            Some(outlet) => outlets.push(outlet),
            None => bail!("the model has no value named {name:?}"),
        }
    }
    model.select_output_outlets(&outlets)?;
    for ix in 0..outlets.len() {
        model.set_output_fact(ix, InferenceFact::default())?;
    }
    let shape = [1, 3, input_size, input_size];
    let plan = model
        .with_input_fact(0, f32::fact(shape).into())?
        .into_optimized()
        .context("optimizing the calibration model")?
        .into_runnable()?;
    Ok(plan)
}

/// Per-channel statistics of an NCHW (or NC) value: largest magnitude and mean of
/// each channel (axis 1) over all positions and inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelStats {
    pub absmax: Vec<f32>,
    pub mean: Vec<f64>,
}

/// [`ChannelStats`] of the ONNX values `names` over `inputs`.
pub fn collect_channel_stats(
    onnx: &[u8],
    names: &[String],
    inputs: &InputSet,
    input_size: usize,
    threads: usize,
    progress: &ProgressBar,
) -> Result<BTreeMap<String, ChannelStats>> {
    let plan = plan_with_outputs(onnx, names, input_size)?;
    let executor = if threads > 1 {
        Executor::multithread(threads)
    } else {
        Executor::SingleThread
    };
    let mut sums: BTreeMap<String, (Vec<f32>, Vec<f64>, u64)> = BTreeMap::new();
    progress.reset();
    progress.set_length(inputs.len() as u64);
    for input in inputs.tensors(input_size) {
        let input = input?.into_tensor();
        let outputs =
            crate::ops::on_executor(&executor, || plan.run(tvec!(input.clone().into_tvalue())))
                .context("running the calibration model")?;
        for (name, value) in names.iter().zip(outputs.iter()) {
            let view = value.to_plain_array_view::<f32>()?;
            let shape = view.shape().to_vec();
            if shape.len() < 2 {
                bail!("{name} has shape {shape:?}; per-channel statistics need a channel axis 1");
            }
            let channels = shape[1];
            let inner: usize = shape[2..].iter().product();
            let entry = sums
                .entry(name.clone())
                .or_insert_with(|| (vec![0.0; channels], vec![0.0; channels], 0));
            let values: Vec<f32> = view.iter().copied().collect();
            for (k, plane) in values.chunks(inner.max(1)).enumerate() {
                let c = k % channels;
                let (mut max, mut sum) = (entry.0[c], 0f64);
                for &v in plane {
                    max = max.max(v.abs());
                    sum += v as f64;
                }
                entry.0[c] = max;
                entry.1[c] += sum;
            }
            entry.2 += (values.len() / channels) as u64;
        }
        progress.inc(1);
    }
    progress.finish();
    Ok(sums
        .into_iter()
        .map(|(name, (absmax, sum, n))| {
            let mean = sum.iter().map(|s| s / n.max(1) as f64).collect();
            (name, ChannelStats { absmax, mean })
        })
        .collect())
}
