"""Hugging Face checkpoint -> GGUF files for llama.cpp: convert, quantize, cache, and read back.

The f16 baseline comes from llama.cpp's own `convert_hf_to_gguf.py` (run in a subprocess with this
interpreter); every other type from llama.cpp's quantize API (`llama_model_quantize`) applied to
that baseline. Files are cached once per (checkpoint, type, llama.cpp version) under
`<cache>/<checkpoint-hash>/<version>/<type>.gguf`, each with a JSON sidecar that records how long
it took to make and how often it was reused.

llama-cpp-python ships no converter in its wheel; its source distribution does
(vendor/llama.cpp/convert_hf_to_gguf.py with the `conversion` package and `gguf-py` beside it).
`harness setup llamacpp` (`install_converter`) installs it once, at setup and never in a worker:
it extracts those parts of the installed version's sdist ($HARNESS_LLAMACPP_SDIST, else one
`pip download` with a timeout) into `<cache>/converter/<version>` and records how long that took.
`converter_script` only finds it ($HARNESS_GGUF_CONVERTER first) and fails fast, naming the setup
command, where it is missing.

Nothing here imports llama_cpp at module level: it is imported where a function needs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.registry import PRECISIONS

CACHE_ENV = "HARNESS_GGUF_CACHE"
CONVERTER_ENV = "HARNESS_GGUF_CONVERTER"
SDIST_ENV = "HARNESS_LLAMACPP_SDIST"
BASELINE = "gguf-f16"
SIDECAR_VERSION = 1
CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")

# Harness precision name -> llama.cpp ftype (llama_cpp.LLAMA_FTYPE_MOSTLY_<name>).
TYPES: dict[str, str] = {p.name: p.options["ftype"] for p in PRECISIONS.values() if p.family == "gguf"}


class ConversionError(RuntimeError):
    """The converter or the quantizer failed; the message says why in one line."""


@dataclass(frozen=True)
class GGUFFile:
    """One cached GGUF file and how this call got it."""

    path: Path
    precision: str
    made_s: float  # seconds it took to make (recorded when it was made)
    spent_s: float  # seconds this call spent making it and whatever it needed (0.0 when all were cached)
    reused: bool  # True when this call found it in the cache
    sidecar: dict[str, Any]


# --- where things live --------------------------------------------------------------------------


def cache_root() -> Path:
    """$HARNESS_GGUF_CACHE, else <user cache>/harness/gguf."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "harness" / "gguf"


def checkpoint_hash(hf_dir: Path) -> str:
    """Identity of a checkpoint directory: the contents of its small files (config, tokenizer) and
    the name, size and mtime of its large ones (weights), so the hash is cheap for big models."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(hf_dir).iterdir() if p.is_file()):
        stat = path.stat()
        digest.update(path.name.encode() + b"\0")
        if stat.st_size <= 1 << 20:
            digest.update(path.read_bytes())
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def llama_cpp_version() -> str:
    """llama-cpp-python's version (it pins one llama.cpp commit), e.g. '0.3.36'."""
    from importlib.metadata import version

    return version("llama_cpp_python")


def cache_dir(hf_dir: Path, version: str | None = None) -> Path:
    return cache_root() / checkpoint_hash(hf_dir) / (version or llama_cpp_version())


def ftype_name(precision: str) -> str:
    if precision not in TYPES:
        raise ValueError(f"unknown GGUF precision {precision!r}: one of {', '.join(TYPES)}")
    return TYPES[precision]


# --- the converter ------------------------------------------------------------------------------


def extract_converter(sdist: Path, dest: Path) -> Path:
    """Copy convert_hf_to_gguf.py, its `conversion` package and `gguf-py` out of a
    llama-cpp-python sdist into `dest`; returns the script's path."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converter-", dir=dest.parent))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for member in tar.getmembers():
                _, _, inner = member.name.partition("/vendor/llama.cpp/")
                if inner and inner.startswith(CONVERTER_MEMBERS) and (member.isfile() or member.isdir()):
                    member.name = inner
                    members.append(member)
            if not any(m.name == "convert_hf_to_gguf.py" for m in members):
                raise ConversionError(f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py inside")
            tar.extractall(tmp, members=members, filter="data")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / "convert_hf_to_gguf.py"


class ConverterMissing(ConversionError):
    """llama.cpp's converter is not installed for this llama-cpp-python version."""


INSTALL_RECORD = "harness-install.json"  # beside the installed converter: how and how fast it was installed
SETUP_COMMAND = "harness setup llamacpp"
DOWNLOAD_TIMEOUT_S = 600.0


def converter_dir(version: str | None = None) -> Path:
    """Where `install_converter` puts the converter of llama-cpp-python `version` (default: the installed one)."""
    return cache_root() / "converter" / (version or llama_cpp_version())


def converter_script(version: str | None = None) -> Path:
    """Path of the installed convert_hf_to_gguf.py from the same llama.cpp as the installed
    llama-cpp-python ($HARNESS_GGUF_CONVERTER first). Never downloads: ConverterMissing names the fix."""
    if os.environ.get(CONVERTER_ENV):
        script = Path(os.environ[CONVERTER_ENV]).expanduser()
        if not script.is_file():
            raise ConversionError(f"${CONVERTER_ENV}={script} is not a file")
        return script
    version = version or llama_cpp_version()
    script = converter_dir(version) / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    raise ConverterMissing(
        f"llama.cpp's converter for llama-cpp-python {version} is not installed in {script.parent}: run "
        f"`{SETUP_COMMAND}` once (offline: set ${SDIST_ENV} to the llama-cpp-python {version} sdist first), "
        f"or set ${CONVERTER_ENV} to a convert_hf_to_gguf.py"
    )


def _run_killable(command: list[str], timeout_s: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """subprocess.run in its own session; on timeout the whole process group (pip's build helpers
    too) is killed and TimeoutExpired raised."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **kwargs) as process:  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def download_sdist(version: str, into: Path, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """llama-cpp-python's sdist through `pip download` (pip's own cache and index settings), within `timeout_s`."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={version}", "-d", str(into)]  # fmt: skip
    try:
        done = _run_killable(command, timeout_s)
    except subprocess.TimeoutExpired:
        raise ConversionError(
            f"`pip download llama-cpp-python=={version}` did not finish in {timeout_s:g} s; "
            f"retry with a longer --timeout, or set ${SDIST_ENV} to the sdist"
        ) from None
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not found:
        raise ConversionError(
            f"the llama-cpp-python {version} sdist could not be downloaded ({_last_error_line(done.stderr)}); "
            f"set ${SDIST_ENV} to the sdist, or ${CONVERTER_ENV} to a convert_hf_to_gguf.py"
        )
    return found[0]


@dataclass(frozen=True)
class ConverterInstall:
    """What `install_converter` did."""

    script: Path
    source: str  # where it came from: the sdist's path, "pip download", or $HARNESS_GGUF_CONVERTER
    install_s: float  # seconds the install took (download, extraction and the import check), when it was made
    installed_now: bool  # False: an earlier install (or $HARNESS_GGUF_CONVERTER) was found


def check_converter(script: Path, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Run the converter's own `--print-supported-models` with this interpreter: it imports every
    module a conversion needs (torch, transformers, gguf-py, ...). ConversionError with the missing piece."""
    try:
        done = _run_killable([sys.executable, str(script), "--print-supported-models"], timeout_s,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    except subprocess.TimeoutExpired:
        raise ConversionError(f"{script} --print-supported-models did not finish in {timeout_s:g} s") from None
    if done.returncode != 0:
        raise ConversionError(
            f"{script} does not run here ({_last_error_line(done.stderr)}); install its dependencies: "
            "pip install 'harness[llamacpp]'"
        )


def install_converter(version: str | None = None, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> ConverterInstall:
    """Install llama.cpp's converter for llama-cpp-python `version` (default: the installed one) into
    `converter_dir`, once: from $HARNESS_LLAMACPP_SDIST, else one `pip download` bounded by
    `timeout_s`; then check that it runs. Records the seconds in <dir>/harness-install.json.
    Setup only: workers never download (converter_script)."""
    if os.environ.get(CONVERTER_ENV):
        script = converter_script(version)
        check_converter(script, timeout_s)
        return ConverterInstall(script, f"${CONVERTER_ENV}", 0.0, False)
    version = version or llama_cpp_version()
    dest = converter_dir(version)
    script = dest / "convert_hf_to_gguf.py"
    record = dest / INSTALL_RECORD
    with _locked(dest.parent / f".{version}.lock"):
        if script.is_file():
            made = json.loads(record.read_text()) if record.is_file() else {}
            return ConverterInstall(script, made.get("source", "an earlier install"), made.get("install_s", 0.0), False)
        start = time.perf_counter()
        if os.environ.get(SDIST_ENV):
            sdist = Path(os.environ[SDIST_ENV]).expanduser()
            if not sdist.is_file():
                raise ConversionError(f"${SDIST_ENV}={sdist} is not a file")
            source = str(sdist)
            extract_converter(sdist, dest)
        else:
            source = "pip download"
            with tempfile.TemporaryDirectory(prefix="harness-sdist-") as tmp:
                extract_converter(download_sdist(version, Path(tmp), timeout_s), dest)
        try:
            check_converter(script, timeout_s)
        except ConversionError:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        seconds = time.perf_counter() - start
        _write_json(record, {"llama_cpp_python": version, "source": source, "install_s": seconds,
                             "installed_unix": time.time()})  # fmt: skip
    return ConverterInstall(script, source, seconds, True)


def setup(timeout_s: float = DOWNLOAD_TIMEOUT_S) -> str:
    """The registry's setup hook (`harness setup llamacpp`): install the converter; one line on what was done."""
    done = install_converter(timeout_s=timeout_s)
    if done.installed_now:
        return f"llama.cpp converter installed from {done.source} in {done.install_s:.1f} s: {done.script}"
    return f"llama.cpp converter already installed ({done.source}, took {done.install_s:.1f} s then): {done.script}"


# --- making the files ---------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _last_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["no output"])[-1].strip()


# Runs the converter as its own __main__, with one change: a byte-level BPE tokenizer whose
# pre-tokenizer hash the converter does not list (it knows published models' tokenizers by the hash
# of their output on a test text) gets a fallback instead of failing the conversion: the llama.cpp
# pre-tokenizer whose regex the tokenizer's own Split uses (PRE_TOKENIZER_REGEXES), else GPT-2's.
# The fallback is printed to stderr and recorded; the backend's tokenizer check then decides whether
# the GGUF vocab really tokenizes like the Hugging Face tokenizer.
_DRIVER = """
import json, runpy, sys
script, fallback, known = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.argv = [script] + sys.argv[4:]
sys.path[0:0] = [str(__import__("pathlib").Path(script).parent), str(__import__("pathlib").Path(script).parent / "gguf-py")]
import conversion.base as base
original = base.TextModel.get_vocab_base_pre
def split_regexes(tokenizer):
    try:
        pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    except Exception:
        return []
    return [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", [pre]) if p.get("type") == "Split"]
def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        chosen = next((known[r] for r in split_regexes(tokenizer) if r in known), fallback)
        print("HARNESS_PRE_TOKENIZER_FALLBACK=" + chosen, file=sys.stderr, flush=True)
        return chosen
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(script, run_name="__main__")
"""
PRE_TOKENIZER_FALLBACK = "gpt-2"  # llama.cpp's name for GPT-2's byte-level regex split
# A tokenizer's Split regex -> the llama.cpp pre-tokenizer that splits alike (llama-vocab.cpp).
PRE_TOKENIZER_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
FALLBACK_MARKER = "HARNESS_PRE_TOKENIZER_FALLBACK="


@dataclass(frozen=True)
class Conversion:
    seconds: float
    pre_tokenizer_fallback: str | None  # set when the converter did not recognize the tokenizer
    config_fixups: tuple[str, ...] = ()  # what the converter's copy of config.json got beside the checkpoint's


def config_fixups(config: dict[str, Any]) -> dict[str, Any]:
    """config.json keys the converter needs that transformers 5 no longer writes: GPT-2's `n_ctx`
    (the converter reads it; transformers 5 writes only `n_positions`, the same number). Empty: none."""
    if config.get("model_type") == "gpt2" and "n_ctx" not in config and "n_positions" in config:
        return {"n_ctx": config["n_positions"]}
    return {}


@contextlib.contextmanager
def converter_input(hf_dir: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(directory to hand the converter, keys added to its config.json). With fix-ups, a temporary
    directory of the same name holds links to every file of `hf_dir` and a fixed copy of
    config.json; the checkpoint itself is never edited."""
    config_path = hf_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    added = config_fixups(config)
    if not added:
        yield hf_dir, {}
        return
    with tempfile.TemporaryDirectory(prefix="harness-convert-") as tmp:
        view = Path(tmp) / hf_dir.name  # the converter names the model after its directory
        view.mkdir()
        for entry in hf_dir.iterdir():
            if entry.name != "config.json":
                (view / entry.name).symlink_to(entry.resolve())
        (view / "config.json").write_text(json.dumps({**config, **added}, indent=2))
        yield view, added


def convert_to_gguf(hf_dir: Path, out_path: Path, outtype: str = "f16", script: Path | None = None) -> Conversion:
    """Run llama.cpp's converter on `hf_dir` into `out_path` (in a subprocess of this interpreter).

    An architecture the converter does not know raises ConversionError with the converter's reason.
    """
    script = script or converter_script()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with converter_input(Path(hf_dir)) as (source, added):
        command = [sys.executable, "-c", _DRIVER, str(script), PRE_TOKENIZER_FALLBACK, json.dumps(PRE_TOKENIZER_REGEXES),
                   str(source), "--outfile", str(tmp), "--outtype", outtype]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
    if done.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ConversionError(f"convert_hf_to_gguf.py failed on {hf_dir}: {_last_error_line(done.stderr)}")
    os.replace(tmp, out_path)
    fallback = next(
        (line.split("=", 1)[1] for line in done.stderr.splitlines() if line.startswith(FALLBACK_MARKER)), None
    )
    fixups = tuple(f"{key}={value}" for key, value in added.items())
    return Conversion(seconds, fallback, fixups)


@contextlib.contextmanager
def _quiet_llama_cpp() -> Iterator[None]:
    """Only errors from llama.cpp's log (llama-cpp-python routes it through this logger's level)."""
    import logging

    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quantize_gguf(f16_path: Path, type_name: str, out_path: Path, threads: int | None = None) -> float:
    """Quantize a GGUF file to llama.cpp ftype `type_name` (e.g. 'Q4_K_M') with llama_model_quantize;
    returns its seconds. Tensors whose rows do not fit the type's block fall back inside llama.cpp:
    `tensor_types` reads what each got."""
    import ctypes

    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}", None)
    if ftype is None:
        raise ValueError(f"llama.cpp has no ftype {type_name!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    tmp = out_path.with_name(out_path.name + ".tmp")
    with _quiet_llama_cpp():
        start = time.perf_counter()
        status = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(tmp).encode(), ctypes.byref(params))
        seconds = time.perf_counter() - start
    if status != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ConversionError(f"llama_model_quantize({f16_path.name} -> {type_name}) returned {status}")
    os.replace(tmp, out_path)
    return seconds


def _sidecar_path(gguf_path: Path) -> Path:
    return gguf_path.with_suffix(".json")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _reuse(path: Path) -> dict[str, Any]:
    sidecar = json.loads(_sidecar_path(path).read_text())
    sidecar["reuse_count"] = sidecar.get("reuse_count", 0) + 1
    sidecar["last_reused_unix"] = time.time()
    _write_json(_sidecar_path(path), sidecar)
    return sidecar


def gguf_file(hf_dir: str | Path, precision: str, version: str | None = None) -> GGUFFile:
    """The cached GGUF of `hf_dir` in `precision` (a TYPES key), made first if missing: the f16
    baseline by the converter, other types quantized from it."""
    ftype = ftype_name(precision)
    hf_dir = Path(hf_dir).resolve()
    version = version or llama_cpp_version()
    directory = cache_dir(hf_dir, version)
    path = directory / f"{precision.removeprefix('gguf-')}.gguf"
    with _locked(directory / f".{path.stem}.lock"):
        if path.is_file() and _sidecar_path(path).is_file():
            sidecar = _reuse(path)
            return GGUFFile(path, precision, sidecar["made_s"], 0.0, True, sidecar)
        spent = 0.0
        if precision == BASELINE:
            conversion = convert_to_gguf(hf_dir, path, "f16")
            made = spent = conversion.seconds
            made_from, fallback, fixups = None, conversion.pre_tokenizer_fallback, list(conversion.config_fixups)
        else:
            baseline = gguf_file(hf_dir, BASELINE, version)
            made = quantize_gguf(baseline.path, ftype, path)
            spent = baseline.spent_s + made
            made_from, fallback = baseline.path.name, baseline.sidecar.get("pre_tokenizer_fallback")
            fixups = baseline.sidecar.get("config_fixups", [])
        types = tensor_types(path)
        sidecar = {
            "sidecar_version": SIDECAR_VERSION,
            "precision": precision,
            "ftype": ftype,
            "source": str(hf_dir),
            "checkpoint_hash": checkpoint_hash(hf_dir),
            "llama_cpp_python": version,
            "made_from": made_from,
            "pre_tokenizer_fallback": fallback,
            "config_fixups": fixups,  # keys the converter's copy of config.json got (GPT-2: n_ctx)
            "made_s": made,
            "made_unix": time.time(),
            "reuse_count": 0,
            "tensor_bytes": sum(n for _, n in types.values()),
            "file_bytes": path.stat().st_size,
            "tensor_type_counts": type_counts(types),
        }
        _write_json(_sidecar_path(path), sidecar)
        return GGUFFile(path, precision, made, spent, False, sidecar)


# --- reading the header -------------------------------------------------------------------------


def ggml_type_name(enum_name: str) -> str:
    """GGUF enum names as llama.cpp prints them: Q4_K -> q4_K, F32 -> f32, IQ2_XXS -> iq2_xxs."""
    lowered = enum_name.lower()
    return lowered[:-2] + "_K" if lowered.endswith("_k") else lowered


def tensor_types(path: str | Path) -> dict[str, tuple[str, int]]:
    """Every tensor in a GGUF file: name -> (type as llama.cpp names it, bytes of its data)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {t.name: (ggml_type_name(t.tensor_type.name), int(t.n_bytes)) for t in reader.tensors}


def type_counts(types: dict[str, tuple[str, int]]) -> dict[str, int]:
    """How many tensors got each type, e.g. {'q4_K': 14, 'q6_K': 1, 'f32': 9}."""
    return dict(sorted(Counter(kind for kind, _ in types.values()).items()))


def header_field(path: str | Path, key: str) -> Any:
    """One metadata value of a GGUF file (e.g. 'general.architecture'), or None."""
    return header_fields(path, key)[0]


def header_fields(path: str | Path, *keys: str) -> list[Any]:
    """Metadata values of a GGUF file, one header read; a key with `{}` gets the file's architecture
    ('{}.context_length' -> 'llama.context_length'). None for a key the file lacks."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    architecture = reader.get_field("general.architecture")
    prefix = architecture.contents() if architecture is not None else ""
    fields = [reader.get_field(key.format(prefix)) for key in keys]
    return [None if field is None else field.contents() for field in fields]
