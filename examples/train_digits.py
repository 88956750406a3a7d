"""Train a small MLP on scikit-learn's 8x8 digits with a jaxent loss.

The model is a plain pytree of JAX arrays (64 -> 128 -> 10, tanh). Each step is
one ``jax.jit``-compiled ``jax.value_and_grad`` of
``jaxent.softmax_cross_entropy_with_integer_labels`` (mean reduction, label
smoothing 0.05) followed by an optax Adam update. The data set ships with
scikit-learn, so nothing is downloaded.

Usage::

    python examples/train_digits.py                 # full run, needs test acc >= 0.95
    python examples/train_digits.py --quick         # a few seconds, needs >= 0.85
    python examples/train_digits.py --epochs 100 --seed 1 --out curve.png

The script exits with status 1 when the final test accuracy is below the bar:
0.95 in full mode, 0.85 with ``--quick`` (fewer epochs, meant as a CI smoke
test). It saves the per-epoch loss curve as a PNG to ``--out``.
"""

import argparse
import itertools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _plotting import save_curves
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jaxent

FULL_EPOCHS = 40
QUICK_EPOCHS = 5
FULL_BAR = 0.95
QUICK_BAR = 0.85
LABEL_SMOOTHING = 0.05


def init_params(key, sizes):
    """Returns a list of {"w", "b"} layers, Glorot-uniform weights, zero biases."""
    params = []
    for key_i, (n_in, n_out) in zip(
        jax.random.split(key, len(sizes) - 1), itertools.pairwise(sizes), strict=True
    ):
        limit = np.sqrt(6.0 / (n_in + n_out))
        w = jax.random.uniform(key_i, (n_in, n_out), minval=-limit, maxval=limit)
        params.append({"w": w, "b": jnp.zeros((n_out,))})
    return params


def forward(params, x):
    """Returns logits [N, 10] for inputs x [N, 64]."""
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, x, y):
    logits = forward(params, x)
    return jaxent.softmax_cross_entropy_with_integer_labels(
        logits, y, label_smoothing=LABEL_SMOOTHING, reduction="mean"
    )


@jax.jit
def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(forward(params, x), axis=-1) == y)


def make_step(optimizer):
    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"number of epochs (default {FULL_EPOCHS}, or {QUICK_EPOCHS} "
        "with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"short run for CI; the accuracy bar drops from {FULL_BAR} to {QUICK_BAR}",
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam step size")
    parser.add_argument(
        "--out", default="digits_loss.png", help="where to save the loss curve"
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else FULL_EPOCHS)
    bar = QUICK_BAR if args.quick else FULL_BAR
    start = time.perf_counter()

    digits = load_digits()
    # Pixel values are 0..16; scale to [0, 1] so tanh units start unsaturated.
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=args.seed, stratify=y
    )
    x_test_j, y_test_j = jnp.asarray(x_test), jnp.asarray(y_test)
    print(f"digits: {len(x_train)} train, {len(x_test)} test, {epochs} epochs")

    key = jax.random.key(args.seed)
    init_key, shuffle_key = jax.random.split(key)
    params = init_params(init_key, [64, 128, 10])
    optimizer = optax.adam(args.lr)
    opt_state = optimizer.init(params)
    step = make_step(optimizer)
    test_loss = jax.jit(loss_fn)

    n = len(x_train)
    n_batches = n // args.batch_size  # drop the ragged tail: one compiled shape
    train_losses, test_losses = [], []
    log_every = max(1, epochs // 10)
    # disable=None: no bar where stderr is not a terminal (logs, CI).
    with tqdm(total=epochs, desc="train", unit="epoch", disable=None) as progress:
        for epoch in range(1, epochs + 1):
            shuffle_key, perm_key = jax.random.split(shuffle_key)
            perm = np.asarray(jax.random.permutation(perm_key, n))
            batch_losses = []
            for b in range(n_batches):
                idx = perm[b * args.batch_size : (b + 1) * args.batch_size]
                params, opt_state, loss = step(
                    params, opt_state, x_train[idx], y_train[idx]
                )
                batch_losses.append(loss)
            train_losses.append(float(jnp.mean(jnp.stack(batch_losses))))
            test_losses.append(float(test_loss(params, x_test_j, y_test_j)))
            progress.set_postfix(loss=f"{train_losses[-1]:.4f}", refresh=False)
            progress.update()
            if epoch % log_every == 0 or epoch == epochs:
                train_acc = float(accuracy(params, x_train, y_train))
                tqdm.write(
                    f"epoch {epoch:3d}  loss {train_losses[-1]:.4f}  "
                    f"train acc {train_acc:.4f}  test loss {test_losses[-1]:.4f}"
                )

    test_acc = float(accuracy(params, x_test_j, y_test_j))
    epoch_numbers = np.arange(1, epochs + 1)
    save_curves(
        args.out,
        {
            "train (mean over batches)": (epoch_numbers, train_losses),
            "test": (epoch_numbers, test_losses),
        },
        xlabel="epoch",
        ylabel=f"cross-entropy (label smoothing {LABEL_SMOOTHING})",
        title="MLP on 8x8 digits, jaxent loss",
    )
    elapsed = time.perf_counter() - start
    print(f"test accuracy {test_acc:.4f} (bar {bar})  time {elapsed:.1f} s")
    print(f"loss curve saved to {args.out}")
    if test_acc < bar:
        print(f"FAIL: test accuracy {test_acc:.4f} < {bar}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
