"""Known upstream breaks: one table, read by the project's tests and by the pytest suites.

Each entry is a compatibility break found in a released upstream package: the package, the versions
affected (a PEP 440 specifier, open-ended from the first release seen broken until one is seen
fixed), where it shows (a CPU flag, which combinations), a one-line reproduction and the reason.
While the installed version is affected (and the CPU has the flag), the tests it breaks are marked
`xfail(strict=True)` with the reason:

- `tests/test_known_issues.py` runs every entry's reproduction, which asserts the behaviour the
  harness needs (it fails while the break is there);
- `pytest suites/` (harness.plugin) marks the suite tests of the matching combinations.

When an upstream release fixes it, the strict xfail passes, which fails the run: give the entry its
upper bound (`>=5.0,<5.27`), and the tests are plain tests again on the fixed release. Add an entry
the same way: reproduce it on the released version, put the reproduction here, list what it breaks.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class KnownIssue:
    id: str
    package: str  # the distribution whose releases broke it (importlib.metadata name)
    affected: str  # PEP 440 specifier of the broken releases
    checked: str  # releases the reproduction was run on, and where
    reason: str  # one line: what breaks, and why
    reproduction: str  # one line of Python (`python -c`), run in a scratch dir; it raises while broken
    symptom: str  # regex its output matches while broken (anything else is a new failure, never hidden)
    suite_tests: tuple[str, ...] = ()  # tests in suites/ that it fails, for the matching combinations:
    frameworks: tuple[str, ...] = ()  # empty: any
    precisions: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()  # device kinds: cpu, cuda, xla
    model_kinds: tuple[str, ...] = ()  # causal-lm, encoder
    cpu_flag: str | None = None  # only on CPUs with this /proc/cpuinfo flag

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.reproduction]

    def xfail_reason(self) -> str:
        return f"known issue {self.id} ({self.package} {installed_version(self.package)}): {self.reason}"


ISSUES: tuple[KnownIssue, ...] = (
    KnownIssue(
        id="transformers-hqq-load",
        package="transformers",
        affected=">=5.0",
        checked="5.0.0, 5.10.4, 5.18.0, 5.23.0, 5.25.0 (CPU)",
        reason="transformers 5 cannot quantize with HqqConfig: its HQQ quantizer has no weight-conversion ops "
        "(NotImplementedError: QuantizationMethod.HQQ is not available yet and will be supported soon)",
        reproduction="from transformers import AutoModelForCausalLM, HqqConfig; from harness.zoo import ensure_built; "
        "AutoModelForCausalLM.from_pretrained(ensure_built('tiny-llama-trained'), "
        "quantization_config=HqqConfig(nbits=4, group_size=64), device_map='cpu')",
        symptom=r"NotImplementedError: QuantizationMethod\.HQQ is not available yet",
    ),
    KnownIssue(
        id="keras-int4-preset-roundtrip",
        package="keras",
        affected=">=3.15.1",
        checked="3.15.1 with keras-hub 0.32.0, TensorFlow and JAX backends (CPU)",
        reason="Keras int4 does not survive save_to_preset: the reloaded ReversibleEmbedding's output projection "
        "quantizes its inputs to int8 (its quantization_config is not restored), so the logits change "
        "(max 0.016 on tiny-llama-trained) though every saved variable is equal",
        reproduction="import os, tempfile, numpy as np; os.environ.setdefault('KERAS_BACKEND', 'tensorflow'); "
        "import keras_hub; from harness.zoo import ensure_built; from harness.checks import roundtrip_problems; "
        "m = keras_hub.models.CausalLM.from_preset(str(ensure_built('tiny-llama-trained')), preprocessor=None); "
        "m.quantize('int4'); x = {'token_ids': np.arange(1, 9)[None], 'padding_mask': np.ones((1, 8), bool)}; "
        "t = tempfile.TemporaryDirectory(); m.save_to_preset(t.name); "
        "d = float(np.abs(np.asarray(m(x)) - np.asarray(type(m).from_preset(t.name, preprocessor=None)(x))).max()); "
        "p = roundtrip_problems({'roundtrip_max_abs_diff': d}); assert not p, p",
        symptom=r"outputs changed after a save/load round trip",
        suite_tests=("test_survives_a_save_load_round_trip",),
        frameworks=("tensorflow", "jax"),
        precisions=("keras-int4",),
        model_kinds=("causal-lm",),
    ),
    KnownIssue(
        id="bnb-4bit-cpu-packed-save",
        package="bitsandbytes",
        affected=">=0.50.2",
        checked="0.50.2 with transformers 5.25.0 (AVX512-BF16 CPU)",
        reason="bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs at the first forward (absmax transposed to "
        "[K/64, N] in bf16); save_pretrained's inverse restores the weights but not absmax, so the saved model and "
        "the live one after the save compute other logits (max 2.4 on tiny-llama-trained nf4; nf4-dq loses less)",
        reproduction="import torch; torch.set_grad_enabled(False); import tempfile; "
        "from transformers import AutoModelForCausalLM as M, BitsAndBytesConfig as B; "
        "from harness.zoo import ensure_built; from harness.checks import roundtrip_problems; "
        "m = M.from_pretrained(ensure_built('tiny-llama-trained'), quantization_config=B(load_in_4bit=True, "
        "bnb_4bit_quant_type='nf4', bnb_4bit_compute_dtype=torch.bfloat16), device_map='cpu'); "
        "x = torch.arange(1, 9)[None]; a = m(x).logits; t = tempfile.TemporaryDirectory(); m.save_pretrained(t.name); "
        "d = (a - M.from_pretrained(t.name, device_map='cpu')(x).logits).abs().max().item(); "
        "p = roundtrip_problems({'roundtrip_max_abs_diff': d}); assert not p, p",
        symptom=r"outputs changed after a save/load round trip",
        suite_tests=("test_survives_a_save_load_round_trip",),
        frameworks=("pytorch",),
        precisions=("nf4", "nf4-dq", "fp4"),
        devices=("cpu",),
        cpu_flag="avx512_bf16",
    ),
    KnownIssue(
        id="bnb-4bit-cpu-packed-merge",
        package="bitsandbytes",
        affected=">=0.50.2",
        checked="0.50.2 with peft 0.21.2 and transformers 5.25.0 (AVX512-BF16 CPU)",
        reason="after an eval-mode forward has repacked 4-bit weights for AVX512-BF16 CPUs, peft's merge_and_unload "
        "dequantizes them as the plain layout, so the merged model is wrong (max |logit diff| 7.9 on "
        "tiny-llama-trained nf4); the finetune scenario merges on a base that has run no forward",
        reproduction="import torch, copy; torch.set_grad_enabled(False); "
        "from transformers import AutoModelForCausalLM as M, BitsAndBytesConfig as B; import peft; "
        "from harness.zoo import ensure_built; q = B(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
        "bnb_4bit_compute_dtype=torch.bfloat16); x = torch.arange(1, 9)[None]; "
        "load = lambda: peft.get_peft_model(M.from_pretrained(ensure_built('tiny-llama-trained'), "
        "quantization_config=q, device_map='cpu'), peft.LoraConfig(r=8, target_modules='all-linear')).eval(); "
        "a = load(); a(x); a = a.merge_and_unload(); b = load().merge_and_unload(); "
        "d = (a(x).logits - b(x).logits).abs().max().item(); assert d < 1e-3, f'merged after a forward: {d}'",
        symptom=r"AssertionError: merged after a forward",
        cpu_flag="avx512_bf16",
    ),
)

BY_ID: Mapping[str, KnownIssue] = {issue.id: issue for issue in ISSUES}


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return frozenset()
    match = re.search(r"^(?:flags|Features)\s*:(.*)$", text, flags=re.M)
    return frozenset(match.group(1).split()) if match else frozenset()


def applies_here(issue: KnownIssue) -> bool:
    """The machine can show it: the package is installed and the CPU has the flag (if any)."""
    return installed_version(issue.package) is not None and (issue.cpu_flag is None or issue.cpu_flag in _cpu_flags())


def active(issue: KnownIssue) -> bool:
    """Installed in an affected version, on a machine that shows it."""
    from packaging.specifiers import SpecifierSet

    version = installed_version(issue.package)
    return applies_here(issue) and SpecifierSet(issue.affected).contains(version, prereleases=True)


def suite_issue(test_name: str, framework: str, precision: str, device: str, kind: str | None) -> KnownIssue | None:
    """The active known issue that fails this suite test of this combination, if any."""
    for issue in ISSUES:
        if (
            test_name in issue.suite_tests
            and (not issue.frameworks or framework in issue.frameworks)
            and (not issue.precisions or precision in issue.precisions)
            and (not issue.devices or device.partition(":")[0] in issue.devices)
            and (not issue.model_kinds or kind in issue.model_kinds)
            and active(issue)
        ):
            return issue
    return None


def table_markdown() -> str:
    """The table as Markdown (`python -m harness.known_issues`)."""
    rows = ["| id | package | affected | checked | reason | reproduction |", "|---|---|---|---|---|---|"]
    rows += [
        f'| {i.id} | {i.package} | `{i.affected}` | {i.checked} | {i.reason} | `python -c "{i.reproduction}"` |'
        for i in ISSUES
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    print(table_markdown())
