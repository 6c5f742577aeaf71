"""Train a small causal character-level language model with dense and SparseK attention.

    python -m jax_sparsek.train                  # both models, defaults for the backend
    python -m jax_sparsek.train --mode sparsek --steps 500 --json out.json

The corpus is generated here, deterministically (nothing is downloaded): documents of
variable definitions (``q=42;``), filler sentences from a small grammar, then queries that
recall the definitions (``q?42;``), so that predicting the answers needs attention to a few
far-away keys, the case SparseK is for. The model is a pre-norm decoder (learned absolute
position embeddings, :class:`jax_sparsek.flax.SparseKAttention` + GELU MLP blocks, RMSNorm,
embedding tied to the output), bf16 compute with float32 parameters, trained with optax
AdamW. ``dense`` runs the same model with ``dense=True`` (plain causal attention).

Prints, per model: which attention implementation the compiled step contains (jax_sparsek's
CUDA custom calls, or the pure-JAX reference), the loss curve, compile time and tokens/s,
then both curves side by side. Exits with status 1 unless every model's final loss (the mean
over the last logging interval) is below 0.9 x its initial loss.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

DEFAULTS = {
    # Both models finish in about a minute on two CPU cores (the pure-JAX reference path).
    "cpu": dict(steps=200, seq_len=128, batch_size=8, d_model=64, layers=2, heads=4,
                kv_heads=2, topk=16, window=16, lr=3e-3),
    # One GPU: jax_sparsek's kernels where built.
    "gpu": dict(steps=300, seq_len=512, batch_size=16, d_model=256, layers=4, heads=4,
                kv_heads=2, topk=64, window=64, lr=2e-3),
}

# ------------------------------------------------------------------------------------------
# Corpus

_SUBJECTS = ("the cat", "a dog", "my bird", "the old fox", "a small fish", "the robot",
             "our teacher", "a tired horse")
_VERBS = ("sees", "likes", "eats", "follows", "finds", "hears", "paints", "carries")
_OBJECTS = ("the moon", "a red ball", "some bread", "the river", "a green tree",
            "the stars", "an apple", "the blue door")
_ADVERBS = ("", "", " today", " again", " slowly", " at night")


def make_corpus(num_chars: int, *, seq_len: int, seed: int) -> str:
    """Deterministic synthetic text of at least ``num_chars`` characters.

    Each line: 3-5 definitions ``x=42;``, filler sentences, then queries ``x?42;`` recalling
    some of the definitions in random order. Documents grow with ``seq_len`` so that the
    queries sit far from their definitions but (mostly) inside one training window.
    """
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    max_sentences = max(2, seq_len // 40)
    docs, total = [], 0
    while total < num_chars:
        n_vars = int(rng.integers(3, 6))
        names = rng.choice(letters, size=n_vars, replace=False)
        values = rng.integers(0, 100, size=n_vars)
        defs = " ".join(f"{n}={v};" for n, v in zip(names, values))
        sentences = []
        for _ in range(int(rng.integers(1, max_sentences + 1))):
            sentences.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} "
                             f"{rng.choice(_OBJECTS)}{rng.choice(_ADVERBS)}.")
        asked = rng.permutation(n_vars)[:int(rng.integers(2, n_vars + 1))]
        queries = " ".join(f"{names[i]}?{values[i]};" for i in asked)
        doc = f"{defs} {' '.join(sentences)} {queries}\n"
        docs.append(doc)
        total += len(doc)
    return "".join(docs)


class CharData:
    """Character tokens of ``text`` and random windows of ``seq_len + 1`` of them."""

    def __init__(self, text: str, seq_len: int, chars=None):
        self.chars = sorted(set(text)) if chars is None else list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.tokens = np.array([self.index[c] for c in text], dtype=np.int32)
        self.seq_len = seq_len

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def batch(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=batch_size)
        return np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts])


def answer_positions(data: CharData, batch: np.ndarray) -> np.ndarray:
    """Boolean ``[B, T]`` over the targets ``batch[:, 1:]``: the digits of a query's answer
    (the one or two digits right after a ``?``)."""
    digits = np.isin(batch, [data.index[c] for c in "0123456789"])
    question = batch == data.index["?"]
    after_question = question[:, :-1]                  # target t follows a '?'
    second_digit = np.zeros_like(after_question)       # target t follows '?' and a digit
    second_digit[:, 1:] = question[:, :-2] & digits[:, 1:-1]
    return digits[:, 1:] & (after_question | second_digit)


# ------------------------------------------------------------------------------------------
# Model


def build_model(vocab_size: int, cfg: dict, *, dense: bool, seed: int):
    from flax import nnx

    from .flax import SparseKAttention

    bf16 = jnp.bfloat16

    class Block(nnx.Module):
        def __init__(self, rngs):
            d = cfg["d_model"]
            self.norm1 = nnx.RMSNorm(d, dtype=bf16, rngs=rngs)
            self.attn = SparseKAttention(d, cfg["heads"], num_kv_heads=cfg["kv_heads"],
                                         topk=cfg["topk"], window=cfg["window"], dense=dense,
                                         implementation=cfg["implementation"], rngs=rngs)
            self.norm2 = nnx.RMSNorm(d, dtype=bf16, rngs=rngs)
            self.mlp_in = nnx.Linear(d, 4 * d, dtype=bf16, rngs=rngs)
            self.mlp_out = nnx.Linear(4 * d, d, dtype=bf16, rngs=rngs)

        def __call__(self, x):  # x: float32 residual stream
            x = x + self.attn(self.norm1(x)).astype(jnp.float32)
            h = jax.nn.gelu(self.mlp_in(self.norm2(x)))
            return x + self.mlp_out(h).astype(jnp.float32)

    class LanguageModel(nnx.Module):
        def __init__(self, rngs):
            d = cfg["d_model"]
            init = nnx.initializers.normal(0.02)
            self.embed = nnx.Embed(vocab_size, d, embedding_init=init, rngs=rngs)
            self.pos = nnx.Param(init(rngs.params(), (cfg["seq_len"], d)))
            blocks = [Block(rngs) for _ in range(cfg["layers"])]
            self.blocks = nnx.List(blocks) if hasattr(nnx, "List") else blocks
            self.norm = nnx.RMSNorm(d, dtype=bf16, rngs=rngs)

        def __call__(self, tokens):  # [B, T] -> logits [B, T, vocab] float32
            x = self.embed(tokens) + self.pos[...][:tokens.shape[-1]]
            for block in self.blocks:
                x = block(x)
            x = self.norm(x).astype(jnp.float32)
            return x @ self.embed.embedding[...].T

    return LanguageModel(nnx.Rngs(seed))


def _custom_calls(hlo_text: str) -> list[str]:
    names = set(re.findall(r"custom_call @(\w+)", hlo_text))
    names |= set(re.findall(r'call_target_name = "(\w+)"', hlo_text))
    return sorted(n for n in names if "sparsek" in n)


def train(data: CharData, eval_batch: np.ndarray, cfg: dict, *, dense: bool,
          log=print) -> dict:
    """Trains one model; returns its curves and timings."""
    import optax
    from flax import nnx

    name = "dense" if dense else "sparsek"
    model = build_model(data.vocab_size, cfg, dense=dense, seed=cfg["seed"])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    steps = cfg["steps"]
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg["lr"], warmup_steps=max(1, steps // 10), decay_steps=steps,
        end_value=cfg["lr"] / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b2=0.95, weight_decay=0.01))
    opt_state = tx.init(params)

    def loss_fn(params, batch):
        logits = nnx.merge(graphdef, params, rest)(batch[:, :-1])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
        return losses.mean(), (losses, logits)

    def train_step(params, opt_state, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def eval_step(params, batch, answers):
        loss, (losses, logits) = loss_fn(params, batch)
        correct = jnp.argmax(logits, axis=-1) == batch[:, 1:]
        recall = jnp.sum(correct & answers) / jnp.maximum(jnp.sum(answers), 1)
        return loss, recall

    batch_rng = np.random.default_rng(cfg["seed"] + 1)  # the same batches for both models
    first = jnp.asarray(data.batch(cfg["batch_size"], batch_rng))
    start = time.perf_counter()
    lowered = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, first)
    kernels = _custom_calls(lowered.as_text())
    step_fn = lowered.compile()
    eval_fn = jax.jit(eval_step)
    eval_tokens = jnp.asarray(eval_batch)
    answers = jnp.asarray(answer_positions(data, eval_batch))
    jax.block_until_ready(eval_fn(params, eval_tokens, answers))
    compile_s = time.perf_counter() - start
    implementation = (f"jax_sparsek CUDA custom calls {kernels}" if kernels else
                      "pure-JAX reference (no jax_sparsek custom call in the compiled step)")
    log(f"[{name}] attention: {implementation}; compile {compile_s:.1f} s")

    log_every = cfg["log_every"]
    losses, curve = [], []
    batch = first
    timed_start = None
    for step in range(steps):
        if step == 1:
            jax.block_until_ready(params)
            timed_start = time.perf_counter()
        params, opt_state, loss = step_fn(params, opt_state, batch)
        losses.append(loss)
        batch = jnp.asarray(data.batch(cfg["batch_size"], batch_rng))
        if (step + 1) % log_every == 0 or step == 0 or step + 1 == steps:
            window = [float(x) for x in losses[-(1 if step == 0 else log_every):]]
            eval_loss, recall = (float(x) for x in eval_fn(params, eval_tokens, answers))
            train_loss = sum(window) / len(window)
            curve.append({"step": step + 1, "train_loss": train_loss, "eval_loss": eval_loss,
                          "recall": recall})
            log(f"[{name}] step {step + 1:5d}/{steps}  train loss {train_loss:.4f}  "
                f"eval loss {eval_loss:.4f}  answer-digit accuracy {recall:.3f}")
    jax.block_until_ready(params)
    elapsed = time.perf_counter() - timed_start if timed_start is not None else float("nan")
    # Logging syncs with the device every log_every steps; the evaluation passes are small.
    tokens_per_s = (steps - 1) * cfg["batch_size"] * cfg["seq_len"] / elapsed
    losses = [float(x) for x in losses]
    final = sum(losses[-log_every:]) / len(losses[-log_every:])
    return {"implementation": implementation, "custom_calls": kernels,
            "compile_s": compile_s, "train_s": elapsed, "tokens_per_s": tokens_per_s,
            "initial_loss": losses[0], "final_loss": final, "losses": losses,
            "curve": curve, "loss_went_down": final < 0.9 * losses[0]}


# ------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> dict:
    backend = jax.default_backend()
    defaults = DEFAULTS["gpu" if backend in ("gpu", "cuda") else "cpu"]
    p = argparse.ArgumentParser(prog="python -m jax_sparsek.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("both", "dense", "sparsek"), default="both")
    p.add_argument("--steps", type=int, help=f"default {defaults['steps']} on {backend}")
    p.add_argument("--seq-len", type=int, help=f"default {defaults['seq_len']}")
    p.add_argument("--batch-size", type=int, help=f"default {defaults['batch_size']}")
    p.add_argument("--d-model", type=int, help=f"default {defaults['d_model']}")
    p.add_argument("--layers", type=int, help=f"default {defaults['layers']}")
    p.add_argument("--heads", type=int, help=f"default {defaults['heads']}")
    p.add_argument("--kv-heads", type=int, help=f"default {defaults['kv_heads']}")
    p.add_argument("--topk", type=int, help=f"SparseK budget, default {defaults['topk']}")
    p.add_argument("--window", type=int,
                   help=f"SparseK local window, default {defaults['window']}")
    p.add_argument("--lr", type=float, help=f"peak AdamW learning rate, default {defaults['lr']}")
    p.add_argument("--log-every", type=int, help="default steps // 10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--implementation", choices=("auto", "xla", "cuda"), default="auto",
                   help="jax_sparsek implementation (auto: the CUDA kernel where built)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    cfg = {k: (getattr(args, k) if getattr(args, k) is not None else v)
           for k, v in defaults.items()}
    cfg.update(mode=args.mode, seed=args.seed, json=args.json, backend=backend,
               implementation=None if args.implementation == "auto" else args.implementation)
    if cfg["steps"] < 2:
        p.error("--steps must be at least 2")
    cfg["log_every"] = args.log_every or max(1, cfg["steps"] // 10)
    return cfg


def run(cfg: dict, log=print) -> dict:
    """Trains the models of ``cfg`` (see ``parse_args``); returns the results."""
    import flax

    num_chars = max(200_000, min(cfg["steps"] * cfg["batch_size"] * (cfg["seq_len"] + 1),
                                 2_000_000))
    data = CharData(make_corpus(num_chars, seq_len=cfg["seq_len"], seed=cfg["seed"]),
                    cfg["seq_len"])
    held_out = CharData(make_corpus(50_000, seq_len=cfg["seq_len"], seed=cfg["seed"] + 1000),
                        cfg["seq_len"], chars=data.chars)
    eval_batch = held_out.batch(4 * cfg["batch_size"], np.random.default_rng(cfg["seed"] + 2))
    head_dim = cfg["d_model"] // cfg["heads"]
    log(f"jax_sparsek.train: backend {cfg['backend']} ({jax.devices()[0].device_kind}), "
        f"jax {jax.__version__}, flax {flax.__version__}")
    log(f"corpus: {len(data.tokens)} characters, vocabulary {data.vocab_size} (generated; "
        f"definitions, filler sentences, recall queries)")
    log(f"model: {cfg['layers']} layers, d_model {cfg['d_model']}, {cfg['heads']} heads / "
        f"{cfg['kv_heads']} kv heads of {head_dim}, seq_len {cfg['seq_len']}, batch "
        f"{cfg['batch_size']}, {cfg['steps']} steps, AdamW peak lr {cfg['lr']}, bf16 compute; "
        f"SparseK topk {cfg['topk']}, window {cfg['window']}")
    modes = ("dense", "sparsek") if cfg["mode"] == "both" else (cfg["mode"],)
    runs = {m: train(data, eval_batch, cfg, dense=(m == "dense"), log=log) for m in modes}

    log("")
    log("loss curves (train: mean over each interval; eval: a fixed held-out batch of "
        f"{len(eval_batch)} sequences)")
    header = f"{'step':>6}" + "".join(f"  {m + ' train':>14}  {m + ' eval':>13}" for m in modes)
    log(header)
    for i, point in enumerate(runs[modes[0]]["curve"]):
        row = f"{point['step']:>6}"
        for m in modes:
            p = runs[m]["curve"][i]
            row += f"  {p['train_loss']:>14.4f}  {p['eval_loss']:>13.4f}"
        log(row)
    log("")
    for m in modes:
        r = runs[m]
        last = r["curve"][-1]
        log(f"{m:>8}: loss {r['initial_loss']:.3f} -> {r['final_loss']:.3f}, eval "
            f"{last['eval_loss']:.3f}, answer-digit accuracy {last['recall']:.3f}; "
            f"{r['tokens_per_s']:,.0f} tokens/s (compile {r['compile_s']:.1f} s); "
            f"{r['implementation']}")
    config = {k: v for k, v in cfg.items() if k != "json"}
    return {"config": config, "vocab_size": data.vocab_size, "runs": runs}


def main(argv=None) -> int:
    cfg = parse_args(argv)
    results = run(cfg)
    if cfg["json"]:
        with open(cfg["json"], "w") as f:
            json.dump(results, f, indent=1)
    failed = [m for m, r in results["runs"].items()
              if not (r["loss_went_down"] and math.isfinite(r["final_loss"]))]
    if failed:
        print(f"FAIL: the loss did not go down (final >= 0.9 x initial) for {failed}")
        return 1
    print("OK: the loss went down for " + ", ".join(results["runs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
