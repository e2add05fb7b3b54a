"""Output quality against a reference precision, on the same evaluation text.

The reference worker writes its outputs (logits or embeddings, greedy continuations) to an .npz
in the run dir; every other worker compares its own outputs with that file. All metrics are
computed in float64 numpy, so the reference compared with itself gives exactly KL 0, agreement 1.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from harness.backends.base import Backend
from harness.config import RunOptions
from harness.corpus import eval_text

CHUNK_TOKENS = 256
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_BLOCK = 32  # tokens per resampled block: neighbouring tokens are correlated
ENCODER_SENTENCES = 32
ENCODER_MAX_TOKENS = 64
ENCODER_BATCH = 8
SEED = 0
CAUSAL_FIELDS = (
    "kl_mean", "kl_mean_ci_low", "kl_mean_ci_high", "kl_p99", "top1_agree", "ppl", "ppl_delta_frac",
    "ppl_delta_frac_ci_low", "ppl_delta_frac_ci_high", "max_abs_logit_diff", "greedy_match_frac",
)  # fmt: skip
ENCODER_FIELDS = ("embed_cosine_mean", "embed_cosine_min", "rank_agree")


def load_tokenizer(source: str, trust_remote_code: bool = False):
    """The model's tokenizer, called like a transformers tokenizer.

    Where torch is already imported (PyTorch workers) or remote code is trusted, this is
    transformers' AutoTokenizer. Otherwise (TensorFlow workers: `from transformers import
    AutoTokenizer` imports torch) it is the `tokenizers` library on the directory's
    tokenizer.json, with the file's own padding/truncation cleared as transformers does, giving
    the same ids and masks for calls of the forms this module makes.
    """
    import json
    import sys

    path = Path(source)
    if "torch" in sys.modules or trust_remote_code or not (path / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    settings: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins, as in transformers
        if (path / name).is_file():
            settings.update(json.loads((path / name).read_text()))
    pad = settings.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    pad_id = tokenizer.token_to_id(pad) if pad else None

    def encode(
        texts: str | list[str],
        add_special_tokens: bool = True,
        padding: bool = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> dict[str, Any]:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        if truncation and max_length:
            tokenizer.enable_truncation(max_length)
        if padding:
            if pad_id is None:
                raise ValueError(f"{source}: padding needs a pad_token in tokenizer_config.json")
            tokenizer.enable_padding(direction=settings.get("padding_side", "right"), pad_id=pad_id, pad_token=pad)
        single = isinstance(texts, str)
        encodings = tokenizer.encode_batch([texts] if single else texts, add_special_tokens=add_special_tokens)
        out: dict[str, Any] = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
        }
        if return_tensors == "np":
            return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}
        return {k: v[0] for k, v in out.items()} if single else out

    return encode


def eval_token_ids(source: str, options: RunOptions) -> np.ndarray:
    """The evaluation text tokenized by the model's own tokenizer, cut to the token budget."""
    tokenizer = load_tokenizer(source, options.trust_remote_code)
    ids = tokenizer(eval_text(options.eval_text), add_special_tokens=False)["input_ids"]
    return np.asarray(ids[: options.eval_tokens], dtype=np.int64)


def eval_sentences(options: RunOptions, count: int = ENCODER_SENTENCES) -> list[str]:
    """Sentences of the evaluation text, for embedding comparisons."""
    text = re.sub(r"\s+", " ", eval_text(options.eval_text))
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 30 <= len(s.strip()) <= 300]
    return sentences[:count]


def sentence_pairs(count: int) -> np.ndarray:
    """Pairs (i, j): each sentence with its neighbour and with a seeded random partner."""
    rng = np.random.default_rng(SEED)
    neighbours = [(i, i + 1) for i in range(count - 1)]
    randoms = [(i, int(j)) for i, j in enumerate(rng.integers(0, count, count)) if i != j]
    return np.asarray(neighbours + randoms, dtype=np.int64)


# --- producing outputs ------------------------------------------------------------------------


def causal_outputs(backend: Backend, ids: np.ndarray, options: RunOptions) -> dict[str, np.ndarray]:
    """Logits over the eval text in chunks, and greedy continuations of K prompts."""
    usable = len(ids) // CHUNK_TOKENS * CHUNK_TOKENS or len(ids)
    chunk = min(CHUNK_TOKENS, usable)
    chunks = ids[:usable].reshape(-1, chunk)
    logits = np.concatenate([backend.logits(row[None, :])[0] for row in chunks]).astype(np.float32)
    prompt_len = 16
    starts = np.linspace(0, max(len(ids) - prompt_len, 0), options.greedy_prompts).astype(int)
    prompts = np.stack([ids[s : s + prompt_len] for s in starts])
    greedy = backend.generate(prompts, options.greedy_tokens)
    if greedy.shape != (len(prompts), options.greedy_tokens):
        raise RuntimeError(f"greedy generation returned {greedy.shape[1]} tokens, asked for {options.greedy_tokens}")
    return {"logits": logits, "chunks": chunks, "greedy": greedy}


def encoder_outputs(backend: Backend, tokenizer, options: RunOptions) -> dict[str, np.ndarray]:
    """Mean-pooled embeddings of the evaluation sentences, in small batches of similar length."""
    sentences = eval_sentences(options)
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    embeddings = np.zeros((len(sentences), 0), dtype=np.float32)
    for start in range(0, len(order), ENCODER_BATCH):
        rows = order[start : start + ENCODER_BATCH]
        batch = tokenizer([sentences[i] for i in rows], padding=True, truncation=True,
                          max_length=ENCODER_MAX_TOKENS, return_tensors="np")  # fmt: skip
        out = backend.embed(batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64))
        if embeddings.shape[1] == 0:
            embeddings = np.zeros((len(sentences), out.shape[1]), dtype=np.float32)
        embeddings[rows] = out
    return {"embeddings": embeddings, "pairs": sentence_pairs(len(embeddings))}


# --- comparing ------------------------------------------------------------------------------


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _next_token_nll(logprobs: np.ndarray, chunks: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each next token, within each chunk."""
    per_chunk = logprobs.reshape(chunks.shape[0], chunks.shape[1], -1)
    targets = chunks[:, 1:]
    picked = np.take_along_axis(per_chunk[:, :-1, :], targets[..., None], axis=-1)[..., 0]
    return -picked.reshape(-1)


def bootstrap_ci(
    values: np.ndarray, statistic, resamples: int = BOOTSTRAP_RESAMPLES, block: int = BOOTSTRAP_BLOCK
) -> tuple[float, float]:
    """95 % block-bootstrap interval of `statistic(indices)` over token positions."""
    n = len(values)
    blocks = max(n // block, 1)
    rng = np.random.default_rng(SEED)
    stats = []
    for _ in range(resamples):
        starts = rng.integers(0, max(n - block, 0) + 1, blocks)
        idx = (starts[:, None] + np.arange(min(block, n))[None, :]).reshape(-1)
        stats.append(statistic(idx))
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)


def first_divergence(reference: np.ndarray, candidate: np.ndarray) -> list[int | None]:
    """Per prompt, the first position where the greedy tokens differ (None if never)."""
    out = []
    for ref_row, cand_row in zip(reference, candidate, strict=True):
        diff = np.nonzero(ref_row != cand_row)[0]
        out.append(int(diff[0]) if len(diff) else None)
    return out


def compare_causal(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, Any]:
    """KL, top-1, perplexity (with bootstrap CIs), max logit difference, greedy agreement."""
    ref_lp, cand_lp = _log_softmax(reference["logits"]), _log_softmax(candidate["logits"])
    kl = (np.exp(ref_lp) * (ref_lp - cand_lp)).sum(axis=-1)
    kl = np.maximum(kl, 0.0)  # rounding can leave -1e-17 where the distributions are equal
    nll_ref = _next_token_nll(ref_lp, reference["chunks"])
    nll_cand = _next_token_nll(cand_lp, reference["chunks"])
    ppl_ref, ppl = float(np.exp(nll_ref.mean())), float(np.exp(nll_cand.mean()))
    kl_low, kl_high = bootstrap_ci(kl, lambda idx: kl[idx].mean())
    delta_low, delta_high = bootstrap_ci(nll_ref, lambda idx: np.exp(nll_cand[idx].mean() - nll_ref[idx].mean()) - 1)
    steps = reference["greedy"].shape[1]
    diverge = first_divergence(reference["greedy"], candidate["greedy"])
    return {
        "kl_mean": float(kl.mean()),
        "kl_mean_ci_low": kl_low,
        "kl_mean_ci_high": kl_high,
        "kl_p99": float(np.percentile(kl, 99)),
        "top1_agree": float((ref_lp.argmax(-1) == cand_lp.argmax(-1)).mean()),
        "ppl": ppl,
        "ppl_delta_frac": ppl / ppl_ref - 1.0,
        "ppl_delta_frac_ci_low": delta_low,
        "ppl_delta_frac_ci_high": delta_high,
        "max_abs_logit_diff": float(np.abs(reference["logits"] - candidate["logits"]).max()),
        "greedy_match_frac": float(np.mean([steps if d is None else d for d in diverge]) / steps),
        "greedy_first_diverge": diverge,
        "eval_tokens": int(kl.size),
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (ties broken by order, which float similarities rarely have)."""
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def compare_encoder(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, Any]:
    """Embedding cosine to the reference, and whether pair similarities keep their order."""
    cosine = _cosine(reference["embeddings"], candidate["embeddings"])
    pairs = reference["pairs"]

    def pair_similarity(emb: np.ndarray) -> np.ndarray:
        return _cosine(emb[pairs[:, 0]], emb[pairs[:, 1]])

    return {
        "embed_cosine_mean": float(cosine.mean()),
        "embed_cosine_min": float(cosine.min()),
        "rank_agree": spearman(pair_similarity(reference["embeddings"]), pair_similarity(candidate["embeddings"])),
    }


def measure_quality(
    backend: Backend,
    kind: str,
    eval_ids: np.ndarray,
    options: RunOptions,
    reference_path: str | None,
    write_reference_path: str | None,
) -> dict[str, Any]:
    """Produce this combination's outputs; write them as the reference or compare with it."""
    if kind == "causal-lm":
        outputs = causal_outputs(backend, eval_ids, options)
    else:
        outputs = encoder_outputs(backend, load_tokenizer(backend.spec.source, options.trust_remote_code), options)
    if write_reference_path:
        Path(write_reference_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(write_reference_path + ".tmp.npz")
        np.savez(tmp, **outputs)
        tmp.replace(write_reference_path)
    if reference_path is None:
        return {}
    with np.load(reference_path) as data:
        reference = dict(data)
    return compare_causal(reference, outputs) if kind == "causal-lm" else compare_encoder(reference, outputs)
