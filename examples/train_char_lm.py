"""Train a small byte-level language model on Python's own source code.

The corpus is the standard library's ``.py`` files (real text that ships with
every Python, so nothing is downloaded), read as bytes: a vocabulary of 256. The
model is a tiny decoder-only transformer written in plain JAX (byte and position
embeddings, pre-norm causal self-attention + MLP blocks) whose output head is
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
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from tqdm import tqdm

import jaxent

FULL = dict(steps=600, corpus_mib=4, context=128, width=128, layers=3, heads=4)
QUICK = dict(steps=200, corpus_mib=1, context=64, width=64, layers=2, heads=4)
FULL_BAR = 6.0
QUICK_BAR = 10.0
VOCAB = 256
# Vocabulary block of the fused head: 4 blocks of 64 bytes, to exercise the
# streaming path even at this small vocabulary (the default would take one).
BLOCK_SIZE = 64


def load_corpus(max_bytes: int) -> np.ndarray:
    """Concatenated stdlib sources as a uint8 array, in a fixed file order."""
    stdlib = Path(os.__file__).parent
    chunks, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)


def init_params(key, cfg):
    d, layers = cfg["width"], cfg["layers"]
    keys = iter(jax.random.split(key, 4 + 4 * layers))

    def dense(n_in, n_out, scale=1.0):
        return jax.random.normal(next(keys), (n_in, n_out)) * scale / math.sqrt(n_in)

    params = {
        "embed": jax.random.normal(next(keys), (VOCAB, d)) * 0.02,
        "pos": jax.random.normal(next(keys), (cfg["context"], d)) * 0.02,
        "blocks": [],
        "norm": jnp.ones((d,)),
        "head_w": dense(d, VOCAB),
        "head_b": jnp.zeros((VOCAB,)),
    }
    # Residual branch outputs start small so the stack begins near identity.
    out_scale = 1.0 / math.sqrt(2 * layers)
    for _ in range(layers):
        params["blocks"].append(
            {
                "norm1": jnp.ones((d,)),
                "qkv": dense(d, 3 * d),
                "proj": dense(d, d, out_scale),
                "norm2": jnp.ones((d,)),
                "up": dense(d, 4 * d),
                "down": dense(4 * d, d, out_scale),
            }
        )
    return params


def rms_norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def attention(x, qkv, proj, heads):
    b, t, d = x.shape
    q, k, v = jnp.split(x @ qkv, 3, axis=-1)
    q, k, v = (a.reshape(b, t, heads, d // heads) for a in (q, k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // heads)
    causal = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(scores, axis=-1, where=causal)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
    return out @ proj


def features(params, tokens, heads):
    """Final hidden states [B, T, D] for byte ids [B, T]: the head's input."""
    x = params["embed"][tokens] + params["pos"][: tokens.shape[1]]
    for blk in params["blocks"]:
        x = x + attention(rms_norm(x, blk["norm1"]), blk["qkv"], blk["proj"], heads)
        x = x + jax.nn.gelu(rms_norm(x, blk["norm2"]) @ blk["up"]) @ blk["down"]
    return rms_norm(x, params["norm"])


def loss_fn(params, batch, heads):
    """Mean next-byte cross-entropy; the head never builds the logits."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    h = features(params, inputs, heads)
    return jaxent.linear_softmax_cross_entropy(
        h,
        params["head_w"],
        targets,
        bias=params["head_b"],
        reduction="mean",
        block_size=BLOCK_SIZE,
    )


def make_step(optimizer, heads):
    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, heads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def sample_batch(rng, data, batch_size, context):
    """Random windows of context + 1 bytes (inputs and shifted targets)."""
    starts = rng.integers(0, len(data) - context - 1, size=batch_size)
    return jnp.asarray(np.stack([data[s : s + context + 1] for s in starts]))


def generate(params, prompt: bytes, length, key, cfg, temperature=0.8):
    """Samples ``length`` bytes after ``prompt`` from a sliding context window."""
    context, heads = cfg["context"], cfg["heads"]

    @jax.jit
    def next_byte(window, key):
        h = features(params, window[None], heads)[0, -1]
        logits = h @ params["head_w"] + params["head_b"]
        return jax.random.categorical(key, logits / temperature)

    out = list(prompt)
    for key_i in jax.random.split(key, length):
        window = out[-context:]
        window = [ord(" ")] * (context - len(window)) + window
        out.append(int(next_byte(jnp.asarray(window, jnp.int32), key_i)))
    return bytes(out).decode("utf-8", errors="replace")


def save_curve(path, losses, val_step, val_loss):
    # Headless backend, chosen before pyplot is imported: CI has no display.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.8, label="train batch")
    ax.plot([val_step], [val_loss], "o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title("byte-level LM on the Python stdlib, fused jaxent head")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, max(1, cfg["steps"] // 10), cfg["steps"], args.lr / 10
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01)
    )
    opt_state = optimizer.init(params)
    step = make_step(optimizer, cfg["heads"])

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
    val_fn = jax.jit(lambda p, b: loss_fn(p, b, cfg["heads"]))
    val_loss = float(np.mean([val_fn(params, b) for b in val_batches]))
    val_ppl = math.exp(val_loss)
    print(f"validation loss {val_loss:.3f}, perplexity {val_ppl:.2f} (bar {bar})")

    text = generate(params, b"def ", 200, jax.random.key(args.seed + 1), cfg)
    print("sample:\n" + "-" * 40 + "\n" + text + "\n" + "-" * 40)

    save_curve(args.out, losses, cfg["steps"], val_loss)
    print(f"loss curve saved to {args.out}; time {time.perf_counter() - start:.1f} s")
    if val_ppl > bar:
        print(f"FAIL: validation perplexity {val_ppl:.2f} > {bar}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
