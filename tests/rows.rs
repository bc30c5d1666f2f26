//! `ops::rows::RowReduce` and the `rows` pass against tract's own `Reduce<Sum>` and
//! `RmsNorm` (the oracle), bit for bit, on the shapes PoolFormer's head gives them
//! (a channel axis followed by unit axes) and a few others.

mod common;

use poolformer_edge::ops::rows::{RowOp, RowReduce};
use poolformer_edge::passes;
use tract_core::ops::nn::{Reduce, Reducer, RmsNorm};
use tract_onnx::prelude::*;

/// Values over six decades and both signs, so that another order of additions
/// changes low bits.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let m = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            m * 10f32.powi(((s >> 8) % 7) as i32 - 3)
        })
        .collect()
}

fn run(op: impl Into<Box<dyn TypedOp>>, x: &Tensor) -> Vec<f32> {
    let model = common::one_op_model(op, f32::fact(x.shape()));
    common::run_model(&model, x, 1)
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

const SHAPES: &[(&[usize], usize)] = &[
    (&[1, 512, 1, 1], 1),
    (&[1, 1000, 1, 1], 1),
    (&[3, 7, 1, 1], 1),
    (&[2, 3, 33, 1], 2),
    (&[5, 129, 1], 1),
    (&[1, 1, 1, 1], 1),
];

#[test]
fn row_ops_give_tracts_bits() {
    for (i, &(shape, axis)) in SHAPES.iter().enumerate() {
        assert!(RowReduce::fits(shape, axis), "{shape:?}");
        let n: usize = shape.iter().product();
        let x = Tensor::from_shape(shape, &values(n, 17 + i as u64)).unwrap();
        let sum = RowReduce {
            axis,
            op: RowOp::Sum,
        };
        assert_eq!(
            bits(&run(sum, &x)),
            bits(&run(Reduce::new(tvec![axis], Reducer::Sum), &x)),
            "sum over axis {axis} of {shape:?}"
        );
        for eps in [1e-6f32, 1e-5, 0.5] {
            let ours = RowReduce {
                axis,
                op: RowOp::RmsNorm { eps },
            };
            let tracts = RmsNorm {
                axis,
                eps: Arc::new(tensor0(eps)),
            };
            assert_eq!(
                bits(&run(ours, &x)),
                bits(&run(tracts, &x)),
                "RMS norm over axis {axis} of {shape:?}, eps {eps}"
            );
        }
    }
}

#[test]
fn only_unit_tailed_axes_fit() {
    assert!(
        !RowReduce::fits(&[1, 512], 1),
        "the last axis: tract's fast path"
    );
    assert!(!RowReduce::fits(&[1, 512, 2, 1], 1));
    assert!(!RowReduce::fits(&[1, 512, 1, 1], 3));
    assert!(RowReduce::fits(&[1, 512, 1, 1], 2));
}

/// A norm like PoolFormer's head (sum over channels → mean → centred → RMS norm) on a
/// `1×C×1×1` input: the pass takes both reductions, and the graph's output keeps its
/// bits; on `1×1×1×C` (the reduced axis last) it takes nothing.
#[test]
fn the_pass_takes_unit_tailed_reductions_only() {
    for (shape, axis, taken) in [([1, 512, 1, 1], 1, 2), ([1, 1, 1, 512], 3, 0)] {
        let n: usize = shape.iter().product();
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(shape)).unwrap();
        let s = model
            .wire_node("sum", Reduce::new(tvec![axis], Reducer::Sum), &[x])
            .unwrap()[0];
        let k = model
            .add_const(
                "recip",
                tensor0(1.0 / n as f32).broadcast_into_rank(4).unwrap(),
            )
            .unwrap();
        let m = model
            .wire_node("mean", tract_core::ops::math::mul(), &[s, k])
            .unwrap()[0];
        let d = model
            .wire_node("d", tract_core::ops::math::sub(), &[x, m])
            .unwrap()[0];
        let y = model
            .wire_node(
                "norm",
                RmsNorm {
                    axis,
                    eps: Arc::new(tensor0(1e-6f32)),
                },
                &[d],
            )
            .unwrap();
        model.select_output_outlets(&y).unwrap();
        let input = Tensor::from_shape(&shape, &values(n, 5)).unwrap();
        let (fused, report) = passes::optimize(model.clone(), true).unwrap();
        let (plain, _) = passes::optimize(model, false).unwrap();
        let count = |m: &TypedModel| m.nodes().iter().filter(|n| n.op_is::<RowReduce>()).count();
        assert_eq!(count(&fused), taken, "{shape:?}: {report:?}");
        assert_eq!(count(&plain), 0);
        let out = |m: &TypedModel| -> Vec<f32> {
            common::run_model(m, &input, 1)
                .to_plain_array_view::<f32>()
                .unwrap()
                .iter()
                .copied()
                .collect()
        };
        assert_eq!(bits(&out(&fused)), bits(&out(&plain)), "{shape:?}");
    }
}
