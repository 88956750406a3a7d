"""Distill a byte-level language model into a smaller one with the fused head.

Same corpus and model code as ``examples/train_char_lm.py`` (``_char_lm.py``):
the Python standard library's own sources read as bytes, a tiny decoder-only
transformer. The script

1. trains a teacher on the labels (next bytes) with
   ``jaxent.linear_softmax_cross_entropy``;
2. trains a smaller student, from the same initialization, on the same batches
   for the same number of steps, twice: (a) on the labels alone, and (b) with
   ``jaxent.linear_softmax_distillation`` against the frozen teacher: half the
   divergence from the teacher (``beta=0``, the forward KL ``KL(teacher ||
   student)`` of Hinton et al.'s distillation, the end of the generalized JSD
   that did best here) and half the labels' cross-entropy, computed from both
   models' hidden states and heads without materializing either's logits;
3. trains the student a third time, from a teacher known only by its top
   ``K = 16`` classes per token, as offline distillation stores it: the
   teacher's 16 largest log-probabilities (from its full softmax) and their
   byte ids are computed once for the students' training batches and kept as
   NumPy arrays (float16 and uint8, as they would sit on disk); the student
   trains on them with ``jaxent.linear_topk_distillation`` (the bucketed KL of
   the 16 classes and the rest, the same weights as (b)), the teacher model
   no longer needed;
4. prints and plots (``--out``) the validation cross-entropy of the three
   students and of the teacher over training, and the fraction of the
   full-teacher distillation's gain over labels alone that the top-k teacher
   recovers.

The distilled students end with a lower validation loss than the student
trained on labels alone, and the top-k one recovers at least half of the full
teacher's gain: the script asserts both in full mode (exit status 1
otherwise); ``--quick`` runs small models fast (a CI smoke test) and only
prints them.

Usage::

    python examples/distill_char_lm.py                  # ~8 min on 2 CPU cores
    python examples/distill_char_lm.py --quick          # under a minute
    python examples/distill_char_lm.py --out distill.png
"""

import argparse
import functools
import sys
import time

import _char_lm as lm
import jax
import jax.numpy as jnp
import numpy as np
from _plotting import save_curves
from tqdm import tqdm

import jaxent

# Teacher: train_char_lm's models; students: narrower, shallower.
FULL = dict(
    teacher=dict(lm.FULL),
    student=dict(lm.FULL, width=48, layers=1, heads=4),
    steps=600,
    eval_every=50,
)
QUICK = dict(
    teacher=dict(lm.QUICK, steps=100),
    student=dict(lm.QUICK, width=32, layers=1, heads=4),
    steps=100,
    eval_every=20,
)
# Distillation: soft_weight SOFT * T**2 on the divergence at temperature T
# (Hinton et al.'s T**2 keeps the soft gradient's scale as T varies) plus
# hard_weight HARD on the labels' cross-entropy. Full mode, 600 steps, final
# validation loss of the student (labels alone: 2.023): beta=0, T=1, 0.5/0.5
# gave 1.936; beta=0.5, T=1, 0.5/0.5 gave 2.010; beta=0.5, T=2, 0.7/0.3 gave
# 1.997.
BETA = 0.0
TEMPERATURE = 1.0
SOFT = 0.5
HARD = 0.5
# Classes kept per token from the teacher for the offline (top-k) student.
K = 16
# Full mode: the least fraction of the full teacher's gain the top-k one keeps.
MIN_RECOVERED = 0.5


def features_and_head(params, inputs, cfg):
    h = lm.features(params, inputs, cfg["heads"])
    return h, params["head_w"], params["head_b"]


def label_loss(params, batch, cfg):
    """train_char_lm's mean next-byte cross-entropy (the fused head)."""
    return lm.loss_fn(params, batch, cfg["heads"])


def distill_loss(params, batch, cfg, teacher, teacher_cfg):
    """Soft JSD against the frozen teacher plus the labels' cross-entropy."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    h, w, b = features_and_head(params, inputs, cfg)
    # The loss gives the teacher no gradient; stop_gradient also keeps its
    # forward pass out of the backward program.
    th, tw, tb = jax.lax.stop_gradient(features_and_head(teacher, inputs, teacher_cfg))
    return jaxent.linear_softmax_distillation(
        h,
        w,
        th,
        tw,
        targets,
        bias=b,
        teacher_bias=tb,
        beta=BETA,
        temperature=TEMPERATURE,
        soft_weight=SOFT * TEMPERATURE**2,
        hard_weight=HARD,
        reduction="mean",
        block_size=lm.BLOCK_SIZE,
    )


@functools.partial(jax.jit, static_argnames="heads")
def teacher_topk(teacher, batch, *, heads):
    """The teacher's top-K log-probabilities (from its full softmax over the
    256 bytes) and their ids ``[B, T, K]`` for each next-byte position: the
    offline teacher's inference, which may form its logits."""
    h = lm.features(teacher, batch[:, :-1], heads)
    log_probs, ids = jax.lax.top_k(jax.nn.log_softmax(lm.logits(teacher, h)), K)
    return log_probs, ids


def store_topk(teacher, cfg, batches):
    """Runs the teacher once over ``batches`` and keeps its top-K rows as
    NumPy arrays, in the compact dtypes an offline store would use: float16
    log-probabilities, uint8 ids (256 bytes)."""
    log_probs, ids = zip(
        *(teacher_topk(teacher, b, heads=cfg["heads"]) for b in batches), strict=True
    )
    return (
        np.stack([np.asarray(x, np.float16) for x in log_probs]),
        np.stack([np.asarray(x, np.uint8) for x in ids]),
    )


def topk_loss(params, batch, cfg):
    """The bucketed top-K KL from the stored teacher rows plus the labels'
    cross-entropy, with distill_loss's weights; no teacher model involved."""
    tokens, log_probs, ids = batch
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    h, w, b = features_and_head(params, inputs, cfg)
    return jaxent.linear_topk_distillation(
        h,
        w,
        ids.astype(jnp.int32),
        log_probs.astype(jnp.float32),
        targets,
        bias=b,
        temperature=TEMPERATURE,
        soft_weight=SOFT * TEMPERATURE**2,
        hard_weight=HARD,
        reduction="mean",
        block_size=lm.BLOCK_SIZE,
    )


def validation(cfg, val_batches):
    """The mean label loss over ``val_batches`` of a model of config ``cfg``."""
    val_fn = jax.jit(lambda p, b: label_loss(p, b, cfg))
    return lambda params: float(np.mean([val_fn(params, b) for b in val_batches]))


def train(name, loss, params, batches, validate, eval_every):
    """AdamW with warm-up + cosine (train_char_lm's), one step per entry of
    ``batches`` (the ``batch`` argument of ``loss(params, batch)``); returns the
    parameters and the validation curve [(step, loss)]."""
    steps = len(batches)
    optimizer = lm.make_optimizer(3e-3, steps)
    opt_state = optimizer.init(params)
    step = lm.make_step(optimizer, loss)

    curve = [(0, validate(params))]
    # disable=None: no bar where stderr is not a terminal (logs, CI), where
    # the lines below are the record of the run.
    with tqdm(total=steps, desc=name, unit="step", disable=None) as progress:
        for i, batch in enumerate(batches, 1):
            params, opt_state, value = step(params, opt_state, batch)
            progress.set_postfix(loss=f"{float(value):.3f}", refresh=False)
            progress.update()
            if i % eval_every == 0 or i == steps:
                curve.append((i, validate(params)))
                tqdm.write(
                    f"{name:<18} step {i:4d}/{steps}  train {float(value):.3f}  "
                    f"validation {curve[-1][1]:.3f}"
                )
    return params, curve


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small and fast, for CI")
    parser.add_argument("--steps", type=int, default=None, help="steps per model")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    parser.add_argument(
        "--out", default="distill_char_lm.png", help="where to save the curves"
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    mode = QUICK if args.quick else FULL
    t_cfg, s_cfg = dict(mode["teacher"]), dict(mode["student"])
    steps = args.steps or mode["steps"]
    t_steps = args.steps or t_cfg["steps"]
    start = time.perf_counter()

    data = lm.load_corpus(t_cfg["corpus_mib"] * 2**20)
    split = int(0.95 * len(data))
    train_data, val = data[:split], data[split:]
    val_rng = np.random.default_rng(args.seed + 1000)
    val_batches = [
        lm.sample_batch(val_rng, val, 32, t_cfg["context"]) for _ in range(8)
    ]
    print(
        f"corpus: {len(train_data):,} train / {len(val):,} validation bytes; teacher "
        f"width {t_cfg['width']} x {t_cfg['layers']} layers ({t_steps} steps), "
        f"students width {s_cfg['width']} x {s_cfg['layers']} ({steps} steps each)"
    )

    def draw(seed, n, context):
        rng = np.random.default_rng(seed)
        return [lm.sample_batch(rng, train_data, 32, context) for _ in range(n)]

    key_t, key_s = jax.random.split(jax.random.key(args.seed))
    teacher, teacher_curve = train(
        "teacher",
        lambda p, b: label_loss(p, b, t_cfg),
        lm.init_params(key_t, t_cfg),
        draw(args.seed, t_steps, t_cfg["context"]),
        validation(t_cfg, val_batches),
        mode["eval_every"],
    )
    # All students: the same initialization and the same batches.
    student0 = lm.init_params(key_s, s_cfg)
    batches = draw(args.seed + 1, steps, s_cfg["context"])
    validate = validation(s_cfg, val_batches)  # compiled once for all
    common = (validate, mode["eval_every"])
    _, labels_curve = train(
        "student (labels)",
        lambda p, b: label_loss(p, b, s_cfg),
        student0,
        batches,
        *common,
    )
    _, distill_curve = train(
        "student (distilled)",
        lambda p, b: distill_loss(p, b, s_cfg, teacher, t_cfg),
        student0,
        batches,
        *common,
    )
    # The offline store: the teacher's top-K rows for every training batch,
    # computed once, after which the teacher model is not used.
    topk_log_probs, topk_ids = store_topk(teacher, t_cfg, batches)
    print(
        f"stored top-{K} teacher rows: {topk_log_probs.nbytes + topk_ids.nbytes:,} "
        f"bytes for {topk_ids.shape[0] * topk_ids.shape[1] * topk_ids.shape[2]:,} "
        "tokens"
    )
    _, topk_curve = train(
        f"student (top-{K})",
        lambda p, b: topk_loss(p, b, s_cfg),
        student0,
        list(zip(batches, topk_log_probs, topk_ids, strict=True)),
        *common,
    )

    final = {
        "teacher": teacher_curve[-1][1],
        "student, labels only": labels_curve[-1][1],
        "student, distilled": distill_curve[-1][1],
        f"student, top-{K} teacher": topk_curve[-1][1],
    }
    for name, value in final.items():
        print(f"final validation loss, {name:<25} {value:.4f} nats/byte")
    gain = final["student, labels only"] - final["student, distilled"]
    topk_gain = final["student, labels only"] - final[f"student, top-{K} teacher"]
    recovered = topk_gain / gain if gain > 0 else float("nan")
    print(f"distillation gain: {gain:+.4f} nats/byte (full teacher)")
    print(
        f"distillation gain: {topk_gain:+.4f} nats/byte (top-{K} teacher), "
        f"{recovered:.0%} of the full teacher's"
    )
    teacher_label = f"teacher (width {t_cfg['width']}, {t_cfg['layers']} layers)"
    curves = {
        teacher_label: teacher_curve,
        "student, labels only": labels_curve,
        f"student, distilled (beta={BETA}, T={TEMPERATURE})": distill_curve,
        f"student, distilled from the top {K}": topk_curve,
    }
    # From the first evaluation on: the untrained models' ~log(256) at step 0
    # would flatten the rest.
    save_curves(
        args.out,
        {
            label: (*zip(*curve[1:], strict=True), dict(marker="o", ms=3, lw=1.2))
            for label, curve in curves.items()
        },
        xlabel="step",
        ylabel="validation cross-entropy (nats / byte)",
        title="byte-level LM: distillation with the fused jaxent head",
        figsize=(6.5, 4),
    )
    print(f"curves saved to {args.out}; time {time.perf_counter() - start:.1f} s")
    if not args.quick and gain <= 0:
        print(
            "FAIL: the distilled student is not better than the labels-only one",
            file=sys.stderr,
        )
        return 1
    if not args.quick and not recovered >= MIN_RECOVERED:
        print(
            f"FAIL: the top-{K} teacher recovered {recovered:.0%} of the full "
            f"teacher's gain (bar {MIN_RECOVERED:.0%})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
