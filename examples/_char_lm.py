"""The byte-level language model the char-LM examples share: the corpus (the
Python standard library's own ``.py`` files, read as bytes), a tiny decoder-only
transformer in plain JAX, its fused-head loss, the optimizer and sampling.

The model: byte and position embeddings, pre-norm causal self-attention + MLP
blocks, a final RMS norm, and an output head ``head_w`` ``[D, 256]``,
``head_b`` ``[256]`` that training never multiplies out: the loss is
``jaxent.linear_softmax_cross_entropy`` on the final hidden states.
"""

import functools
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxent

# Model and run sizes: the full run of train_char_lm.py and its --quick one.
FULL = dict(steps=600, corpus_mib=4, context=128, width=128, layers=3, heads=4)
QUICK = dict(steps=200, corpus_mib=1, context=64, width=64, layers=2, heads=4)
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


def sample_batch(rng, data, batch_size, context):
    """Random windows of context + 1 bytes (inputs and shifted targets)."""
    starts = rng.integers(0, len(data) - context - 1, size=batch_size)
    return jnp.asarray(np.stack([data[s : s + context + 1] for s in starts]))


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


def trunk(params, x, heads):
    """Final hidden states [B, T, D] for embedded inputs x [B, T, D]."""
    for blk in params["blocks"]:
        x = x + attention(rms_norm(x, blk["norm1"]), blk["qkv"], blk["proj"], heads)
        x = x + jax.nn.gelu(rms_norm(x, blk["norm2"]) @ blk["up"]) @ blk["down"]
    return rms_norm(x, params["norm"])


def features(params, tokens, heads):
    """Final hidden states [B, T, D] for byte ids [B, T]: the head's input."""
    x = params["embed"][tokens] + params["pos"][: tokens.shape[1]]
    return trunk(params, x, heads)


def logits(params, h):
    """The head's logits [..., 256] for hidden states h [..., D] (sampling only;
    training never forms them)."""
    return h @ params["head_w"] + params["head_b"]


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


def make_optimizer(lr, steps):
    """AdamW with a linear warm-up over a tenth of ``steps``, a cosine decay to
    ``lr / 10``, and gradient clipping at global norm 1."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, max(1, steps // 10), steps, lr / 10
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01)
    )


def make_step(optimizer, loss):
    """The jitted training step ``(params, opt_state, batch) -> (params,
    opt_state, loss value)`` for ``loss(params, batch)``."""

    @jax.jit
    def step(params, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


@functools.partial(jax.jit, static_argnames="heads")
def sample_next(params, windows, key, temperature, *, heads):
    """One sampled byte [B] to follow each byte window [B, T] (T <= context)."""
    h = features(params, windows, heads)[:, -1]
    return jax.random.categorical(key, logits(params, h) / temperature)


def generate(params, prompt: bytes, length, key, cfg, temperature=0.8):
    """Samples ``length`` bytes after ``prompt`` from a sliding context window."""
    context = cfg["context"]
    out = list(prompt)
    for key_i in jax.random.split(key, length):
        window = out[-context:]
        window = [ord(" ")] * (context - len(window)) + window
        windows = jnp.asarray([window], jnp.int32)
        out.append(
            int(sample_next(params, windows, key_i, temperature, heads=cfg["heads"])[0])
        )
    return bytes(out).decode("utf-8", errors="replace")


@functools.partial(jax.jit, static_argnames=("length", "heads"))
def sample_continuations(params, prompts, key, temperature=1.0, *, length, heads):
    """``length`` sampled bytes after each prompt, in one compiled loop.

    ``prompts`` is ``[B, P]`` with ``P + length`` at most the model's context;
    returns the ``[B, P + length]`` sequences (prompts included). Each step runs
    the model over a fixed-size buffer (the bytes not yet sampled are
    placeholders that the causal mask hides from the position read), so the
    loop is one ``lax.fori_loop`` of one shape, vectorized over the batch.
    """
    batch, prompt_len = prompts.shape
    seqs = jnp.concatenate([prompts, jnp.zeros((batch, length), prompts.dtype)], axis=1)

    def body(t, seqs):
        pos = prompt_len + t
        h = features(params, seqs, heads)
        h_last = jax.lax.dynamic_index_in_dim(h, pos - 1, axis=1, keepdims=False)
        nxt = jax.random.categorical(
            jax.random.fold_in(key, t), logits(params, h_last) / temperature
        )
        return jax.lax.dynamic_update_index_in_dim(
            seqs, nxt.astype(seqs.dtype), pos, axis=1
        )

    return jax.lax.fori_loop(0, length, body, seqs)
