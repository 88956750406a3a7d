"""Train a small byte-level language model on Python's own source code.

The corpus is the standard library's ``.py`` files (real text that ships with
every Python, so nothing is downloaded), read as bytes: a vocabulary of 256. The
model is a tiny decoder-only transformer written in plain JAX (byte and position
embeddings, pre-norm causal self-attention + MLP blocks; ``_char_lm.py``, shared
with the other byte-level examples) whose output head is
``jaxent.linear_softmax_cross_entropy``: the ``[batch * context, 256]`` logits are
never materialized during training, the loss streams over vocabulary blocks.
Training uses optax AdamW with a warm-up + cosine schedule and gradient clipping.

It shows a progress bar with the loss and perplexity of the latest step (on a
terminal only) and prints them as a line every tenth of the run, then the
validation perplexity and a sample of generated text, and saves the loss curve
as a PNG.

Usage::

    python examples/train_char_lm.py                    # ~3 min on 2 CPU cores
    python examples/train_char_lm.py --quick            # ~20 s, a CI smoke test
    python examples/train_char_lm.py --steps 2000 --out curve.png

The script exits with status 1 when the final validation perplexity is above
the bar (a model that learned nothing sits near 256; the byte unigram near 25).
"""

import argparse
import functools
import math
import sys
import time

import jax
import numpy as np
from _char_lm import (
    FULL,
    QUICK,
    generate,
    init_params,
    load_corpus,
    loss_fn,
    make_optimizer,
    make_step,
    sample_batch,
)
from _plotting import save_curves
from tqdm import tqdm

FULL_BAR = 6.0
QUICK_BAR = 10.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small model and corpus, for CI"
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW step")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    parser.add_argument(
        "--out", default="char_lm_loss.png", help="where to save the loss curve"
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        cfg["steps"] = args.steps
    bar = QUICK_BAR if args.quick else FULL_BAR
    start = time.perf_counter()

    data = load_corpus(cfg["corpus_mib"] * 2**20)
    split = int(0.95 * len(data))
    train, val = data[:split], data[split:]
    print(
        f"corpus: {len(train):,} train / {len(val):,} validation bytes of stdlib "
        f"source; model width {cfg['width']}, {cfg['layers']} layers, context "
        f"{cfg['context']}, {cfg['steps']} steps"
    )

    params = init_params(jax.random.key(args.seed), cfg)
    optimizer = make_optimizer(args.lr, cfg["steps"])
    opt_state = optimizer.init(params)
    loss_of = functools.partial(loss_fn, heads=cfg["heads"])
    step = make_step(optimizer, loss_of)

    rng = np.random.default_rng(args.seed)
    losses = []
    log_every = max(1, cfg["steps"] // 10)
    # disable=None: no bar where stderr is not a terminal (logs, CI), where
    # the lines below are the record of the run.
    with tqdm(total=cfg["steps"], desc="train", unit="step", disable=None) as progress:
        for i in range(1, cfg["steps"] + 1):
            batch = sample_batch(rng, train, args.batch_size, cfg["context"])
            params, opt_state, loss = step(params, opt_state, batch)
            losses.append(float(loss))
            ppl = math.exp(losses[-1])
            progress.set_postfix(
                loss=f"{losses[-1]:.3f}", ppl=f"{ppl:.2f}", refresh=False
            )
            progress.update()
            if i % log_every == 0 or i == cfg["steps"]:
                tqdm.write(
                    f"step {i:4d}/{cfg['steps']}  loss {losses[-1]:.3f}  ppl {ppl:7.2f}"
                )

    val_batches = [
        sample_batch(rng, val, args.batch_size, cfg["context"]) for _ in range(8)
    ]
    val_fn = jax.jit(loss_of)
    val_loss = float(np.mean([val_fn(params, b) for b in val_batches]))
    val_ppl = math.exp(val_loss)
    print(f"validation loss {val_loss:.3f}, perplexity {val_ppl:.2f} (bar {bar})")

    text = generate(params, b"def ", 200, jax.random.key(args.seed + 1), cfg)
    print("sample:\n" + "-" * 40 + "\n" + text + "\n" + "-" * 40)

    save_curves(
        args.out,
        {
            "train batch": (np.arange(1, len(losses) + 1), losses, dict(lw=0.8)),
            "validation": ([cfg["steps"]], [val_loss], dict(marker="o", ls="none")),
        },
        xlabel="step",
        ylabel="cross-entropy (nats / byte)",
        title="byte-level LM on the Python stdlib, fused jaxent head",
    )
    print(f"loss curve saved to {args.out}; time {time.perf_counter() - start:.1f} s")
    if val_ppl > bar:
        print(f"FAIL: validation perplexity {val_ppl:.2f} > {bar}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
