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
from harness.corpus import eval_text
from harness.options import RunOptions
from harness.records import NO_TOKENIZER_REASON
from harness.workload import CHUNK_TOKENS, COMPARE_BLOCK_TOKENS, ENCODER_BATCH, ENCODER_MAX_TOKENS, ENCODER_SENTENCES

EVAL_TOKENS_FLOOR = 512  # never fewer: 16 bootstrap blocks of 32 tokens, so the KL CI stays meaningful
QUALITY_BUDGET_FACTOR = 15  # the reference's quality forwards may take this many phase budgets (--time-budget)
# A precision compares the reference's tokens unless that takes it more than this many times the quality
# budget (a precision that much slower than the reference, e.g. fp16 on a CPU without native fp16):
# then it compares fewer, and its record (eval_tokens < reference_eval_tokens) and the report say so.
QUALITY_OVERRUN_FACTOR = 4
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_BLOCK = 32  # tokens per resampled block: neighbouring tokens are correlated
SEED = 0
CAUSAL_FIELDS = (
    "kl_mean", "kl_mean_ci_low", "kl_mean_ci_high", "kl_p99", "top1_agree", "ppl", "ppl_delta_frac",
    "ppl_delta_frac_ci_low", "ppl_delta_frac_ci_high", "max_abs_logit_diff", "greedy_match_frac",
    "greedy_token_agree", "greedy_tokens_generated", "reference_eval_tokens",
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


def model_eval_ids(model: Any, options: RunOptions) -> tuple[np.ndarray, str | None]:
    """(eval token ids, why quality cannot be measured or None) for a harness.plan.models.ModelSource.

    With a tokenizer: the eval text's ids. Without one, load, size and throughput still run, on
    seeded token ids drawn from the model's vocabulary; quality needs real text, so its fields
    are null with NO_TOKENIZER_REASON.
    """
    if model.tokenizer is not None:
        return eval_token_ids(model.tokenizer, options), None
    import json

    config = json.loads((Path(model.source) / "config.json").read_text())
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not vocab:
        raise ValueError(f"{model.source}: no tokenizer and no vocab_size in config.json: pass --tokenizer")
    rng = np.random.default_rng(SEED)
    return rng.integers(0, int(vocab), options.eval_tokens, dtype=np.int64), NO_TOKENIZER_REASON


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


def scaled_eval_tokens(requested: int, forward_tok_s: float | None, budget_s: float) -> int:
    """Eval tokens for a model whose forward runs at `forward_tok_s`: as many whole CHUNK_TOKENS chunks
    as half that rate covers in `budget_s`, never more than `requested`, never fewer than
    EVAL_TOKENS_FLOOR (or `requested`, if smaller).

    Half the rate: the quality pass computes every position's logits and compares them in float64,
    while the rate given (prefill_tok_s) is a prompt forward that keeps the last position's logits.
    An unknown rate keeps `requested`.
    """
    if forward_tok_s is None or forward_tok_s <= 0 or requested <= EVAL_TOKENS_FLOOR:
        return requested
    affordable = int(forward_tok_s / 2 * budget_s) // CHUNK_TOKENS * CHUNK_TOKENS
    return min(requested, max(EVAL_TOKENS_FLOOR, affordable))


def quality_budget_s(options: RunOptions) -> float:
    """Seconds the quality forwards may take: QUALITY_BUDGET_FACTOR x the per-phase --time-budget."""
    from harness.stats import DEFAULT_TIME_BUDGET_S

    return QUALITY_BUDGET_FACTOR * getattr(options, "time_budget_s", DEFAULT_TIME_BUDGET_S)


# --- producing outputs ------------------------------------------------------------------------


def eval_chunks(ids: np.ndarray) -> np.ndarray:
    """The eval ids as [chunks, CHUNK_TOKENS] rows (one forward each), the tail dropped."""
    usable = len(ids) // CHUNK_TOKENS * CHUNK_TOKENS or len(ids)
    chunk = min(CHUNK_TOKENS, usable)
    return ids[:usable].reshape(-1, chunk)


def greedy_outputs(backend: Backend, ids: np.ndarray, options: RunOptions) -> np.ndarray:
    """Greedy continuations of K prompts spread over the eval text: [K, greedy_tokens]."""
    prompt_len = 16
    starts = np.linspace(0, max(len(ids) - prompt_len, 0), options.greedy_prompts).astype(int)
    prompts = np.stack([ids[s : s + prompt_len] for s in starts])
    greedy = backend.generate(prompts, options.greedy_tokens)
    if greedy.shape != (len(prompts), options.greedy_tokens):
        raise RuntimeError(f"greedy generation returned {greedy.shape[1]} tokens, asked for {options.greedy_tokens}")
    return greedy


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


class CausalComparison:
    """Per-token KL, next-token NLL and top-1 agreement, accumulated one chunk at a time.

    Each chunk's float64 work runs in blocks of COMPARE_BLOCK_TOKENS rows, so the comparison
    holds a few [block, vocab] float64 arrays at once, never [tokens, vocab]: a 128k vocabulary
    costs about 1 MB per token and copy in float64.
    """

    def __init__(self) -> None:
        self.kl: list[np.ndarray] = []
        self.nll_ref: list[np.ndarray] = []
        self.nll_cand: list[np.ndarray] = []
        self.top1: list[np.ndarray] = []
        self.max_abs_logit_diff = 0.0

    def add(self, reference: np.ndarray, candidate: np.ndarray, chunk_ids: np.ndarray) -> None:
        """Compare one chunk: logits [tokens, vocab] of both, and the chunk's token ids."""
        targets = chunk_ids[1:]
        for start in range(0, len(chunk_ids), COMPARE_BLOCK_TOKENS):
            stop = min(start + COMPARE_BLOCK_TOKENS, len(chunk_ids))
            ref_block = np.asarray(reference[start:stop], dtype=np.float32)
            cand_block = np.asarray(candidate[start:stop], dtype=np.float32)
            self.max_abs_logit_diff = max(self.max_abs_logit_diff, float(np.abs(ref_block - cand_block).max()))
            ref_lp, cand_lp = _log_softmax(ref_block), _log_softmax(cand_block)
            kl = (np.exp(ref_lp) * (ref_lp - cand_lp)).sum(axis=-1)
            self.kl.append(np.maximum(kl, 0.0))  # rounding can leave -1e-17 where the distributions are equal
            self.top1.append(ref_lp.argmax(-1) == cand_lp.argmax(-1))
            rows = np.arange(start, min(stop, len(targets)))  # the last position has no next token
            picked = targets[rows]
            self.nll_ref.append(-ref_lp[rows - start, picked])
            self.nll_cand.append(-cand_lp[rows - start, picked])

    def result(self, greedy_reference: np.ndarray, greedy_candidate: np.ndarray) -> dict[str, Any]:
        kl, nll_ref, nll_cand = np.concatenate(self.kl), np.concatenate(self.nll_ref), np.concatenate(self.nll_cand)
        ppl_ref, ppl = float(np.exp(nll_ref.mean())), float(np.exp(nll_cand.mean()))
        kl_low, kl_high = bootstrap_ci(kl, lambda idx: kl[idx].mean())
        delta_low, delta_high = bootstrap_ci(
            nll_ref, lambda idx: np.exp(nll_cand[idx].mean() - nll_ref[idx].mean()) - 1
        )
        steps = greedy_reference.shape[1]
        diverge = first_divergence(greedy_reference, greedy_candidate)
        return {
            "kl_mean": float(kl.mean()),
            "kl_mean_ci_low": kl_low,
            "kl_mean_ci_high": kl_high,
            "kl_p99": float(np.percentile(kl, 99)),
            "top1_agree": float(np.concatenate(self.top1).mean()),
            "ppl": ppl,
            "ppl_delta_frac": ppl / ppl_ref - 1.0,
            "ppl_delta_frac_ci_low": delta_low,
            "ppl_delta_frac_ci_high": delta_high,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "greedy_match_frac": float(np.mean([steps if d is None else d for d in diverge]) / steps),
            "greedy_token_agree": float((greedy_reference == greedy_candidate).mean()),
            "greedy_tokens_generated": int(greedy_candidate.shape[1]),
            "greedy_first_diverge": diverge,
            "eval_tokens": int(kl.size),
        }


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
    """KL, top-1, perplexity (with bootstrap CIs), max logit difference, greedy agreement.

    `logits` are [tokens, vocab] over the reference's `chunks` (rows of token ids), in order.
    """
    chunks = reference["chunks"]
    comparison = CausalComparison()
    width = chunks.shape[1]
    for index, row in enumerate(chunks):
        rows = slice(index * width, (index + 1) * width)
        comparison.add(reference["logits"][rows], candidate["logits"][rows], row)
    return comparison.result(reference["greedy"], candidate["greedy"])


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


def logits_path(reference_path: str) -> Path:
    """The reference's logits live beside its .npz as a .npy, written and read one chunk at a time."""
    return Path(reference_path).with_suffix(".logits.npy")


class LogitsFile:
    """A float32 [tokens, vocab] .npy, written and read chunk by chunk with plain file I/O.

    Not a memory map: mapped pages count in the worker's RSS (file-backed) as they are touched, so a
    mapped reference of 2,048 tokens x 151,936 vocab would add 1.2 GB to every worker's peak. Plain
    reads leave them in the page cache, outside the process.
    """

    def __init__(self, path: Path, mode: str, shape: tuple[int, int] | None = None) -> None:
        """mode "r": read an existing file; "w": create one of `shape`."""
        if mode == "w" and shape is None:
            raise ValueError("a new logits file needs its shape")
        self.handle = open(path, "rb" if mode == "r" else "w+b")  # closed by close()
        if mode == "w":
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_2_0(self.handle, header)
            self.shape = shape
        else:
            version = np.lib.format.read_magic(self.handle)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            self.shape, _, dtype = read_header(self.handle)
            if dtype != np.dtype("<f4"):
                raise ValueError(f"{path}: reference logits must be float32, not {dtype}")
        self.offset = self.handle.tell()

    def rows(self, start: int, count: int) -> np.ndarray:
        """Rows [start, start + count) as a new float32 array."""
        self.handle.seek(self.offset + start * self.shape[1] * 4)
        return np.fromfile(self.handle, dtype="<f4", count=count * self.shape[1]).reshape(count, self.shape[1])

    def write(self, start: int, rows: np.ndarray) -> None:
        self.handle.seek(self.offset + start * self.shape[1] * 4)
        self.handle.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())

    def close(self) -> None:
        self.handle.close()


def _atomic_savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def causal_quality(
    backend: Backend,
    eval_ids: np.ndarray,
    options: RunOptions,
    reference_path: str | None,
    write_path: str | None,
    forward_tok_s: float | None = None,
) -> dict[str, Any]:
    """Stream the eval text chunk by chunk: write each chunk's logits (reference) and/or compare them.

    The reference's logits go to a .npy written and read chunk by chunk, so no worker ever holds
    [tokens, vocab]. The token count is decided once per model and device, by the reference
    (scaled_eval_tokens on its own forward rate), and every other precision compares exactly the
    reference's tokens, so the rows of one model are comparable; only a precision that would take
    more than QUALITY_OVERRUN_FACTOR quality budgets for them compares fewer (a prefix of the same
    text), and eval_tokens < reference_eval_tokens says so. Greedy prompts always come from the whole
    eval text, as the reference's did.
    """
    all_chunks = eval_chunks(eval_ids)
    width = all_chunks.shape[1]
    reference_logits = None
    if reference_path is not None and reference_path != write_path:
        reference_logits = LogitsFile(logits_path(reference_path), "r")
        with np.load(reference_path) as data:
            reference_chunks = data["chunks"]
        budget_s = QUALITY_OVERRUN_FACTOR * quality_budget_s(options)
        tokens = scaled_eval_tokens(reference_chunks.size, forward_tok_s, budget_s)
        chunks = all_chunks[: min(len(reference_chunks), max(tokens // width, 1))]
        if reference_chunks.shape[1] != chunks.shape[1] or not (reference_chunks[: len(chunks)] == chunks).all():
            raise ValueError("the eval tokens differ from the reference's: both must use the same tokenizer and text")
        reference_tokens = int(reference_chunks.size)
    else:  # the reference: it decides the token count for its model and device
        tokens = scaled_eval_tokens(all_chunks.size, forward_tok_s, quality_budget_s(options))
        chunks = all_chunks[: max(tokens // width, 1)]
        reference_tokens = int(chunks.size)
    writer = None
    comparison = CausalComparison()
    for index, row in enumerate(chunks):
        logits = backend.logits(row[None, :])[0]
        if write_path is not None:
            if writer is None:
                Path(write_path).parent.mkdir(parents=True, exist_ok=True)
                tmp = logits_path(write_path).with_suffix(".tmp.npy")
                writer = LogitsFile(tmp, "w", (chunks.size, logits.shape[-1]))
            writer.write(index * width, logits)
        if reference_logits is not None:
            comparison.add(reference_logits.rows(index * width, width), logits, row)
        elif reference_path is not None:  # the reference compared with itself
            comparison.add(logits, logits, row)
        del logits
    greedy = greedy_outputs(backend, eval_ids, options)
    if reference_logits is not None:
        reference_logits.close()
    if writer is not None:
        writer.close()
        logits_path(write_path).with_suffix(".tmp.npy").replace(logits_path(write_path))
        _atomic_savez(write_path, {"chunks": chunks, "greedy": greedy})
    if reference_path is None:
        return {}
    with np.load(reference_path) as data:
        reference_greedy = data["greedy"]
    return comparison.result(reference_greedy, greedy) | {
        "eval_tokens_requested": int(all_chunks.size),
        "reference_eval_tokens": reference_tokens,
    }


def measure_quality(
    backend: Backend,
    kind: str,
    eval_ids: np.ndarray,
    options: RunOptions,
    reference_path: str | None,
    write_reference_path: str | None,
    tokenizer_source: str | None = None,
    forward_tok_s: float | None = None,
) -> dict[str, Any]:
    """Produce this combination's outputs; write them as the reference or compare with it.

    `forward_tok_s`: the model's measured forward rate, which scales the eval tokens (causal LMs).
    """
    if kind == "causal-lm":
        return causal_quality(backend, eval_ids, options, reference_path, write_reference_path, forward_tok_s)
    tokenizer = load_tokenizer(tokenizer_source or backend.spec.source, options.trust_remote_code)
    outputs = encoder_outputs(backend, tokenizer, options)
    if write_reference_path:
        _atomic_savez(write_reference_path, outputs)
    if reference_path is None:
        return {}
    with np.load(reference_path) as data:
        reference = dict(data)
    return compare_encoder(reference, outputs)
