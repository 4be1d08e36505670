"""Run MergeKit 0.1.5's own test suite with and without mergekit-permute loaded.

    python scripts/mergekit_suite.py [--sdist DIR] [--python PY] [--output JSON]

A dev/benchmark script, never part of CI: it needs PyPI (pip download) the first time.

1. `pip download --no-deps --no-binary :all: mergekit==0.1.5` into DIR (default
   ~/.cache/mergekit_permute/mergekit-sdist), check the sdist's sha256, extract it afresh.
2. The sdist ships tests/ but not the tests/common.py they import (make_picollama,
   make_gpt2size, make_picogranite, make_picoLlaVa, run_and_check_merge); we write our own
   (COMMON_PY below) plus an empty tests/__init__.py, so that `tests` is the sdist's package
   and not this repository's tests/ (on sys.path through the editable install). The sdist's
   source copy `mergekit/` is renamed `_mergekit_sdist_src/`, so the suite imports the
   INSTALLED MergeKit, the one our plugin hooks (a probe checks this before each run).
3. `python -m pytest -p no:cacheprovider -q -rfEs` (plus --junitxml, for failure messages)
   twice from the sdist root, OMP_NUM_THREADS=1: once with MERGEKIT_PERMUTE_DISABLE=1,
   once with the plugin active, deselecting only
   test_state_dict_methods_accept_strided_weights_without_mutation[permute] (MergeKit feeds
   bare tensors to every registered method; `permute` needs model paths and refuses them by
   design, which our own tests check).
4. Writes benchmarks/results/mergekit-suite.json and prints a one-line summary.

Exit status: 0 when the plugin-active run has no failure that the disabled run lacks;
1 when it has (listed in the JSON under plugin_only_failures); 2 when the check itself could
not be made (download, extraction, probe, a run without a pytest summary, or the `permute`
parametrization not found to deselect).
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MERGEKIT_VERSION = "0.1.5"
SDIST_NAME = f"mergekit-{MERGEKIT_VERSION}.tar.gz"
# sha256 of mergekit-0.1.5.tar.gz as published on PyPI.
SDIST_SHA256 = "caa51dbbfa493bcd62218d17f2bc7bb1c7a2a2e4baf4e2f34a29d73c66c594aa"
DEFAULT_SDIST_DIR = Path.home() / ".cache" / "mergekit_permute" / "mergekit-sdist"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "mergekit-suite.json"
DISABLE_ENV = "MERGEKIT_PERMUTE_DISABLE"
PLUGIN_DESELECT = [
    ("tests/test_merge_method_regressions.py::"
     "test_state_dict_methods_accept_strided_weights_without_mutation[permute]"),
]

# ---------------------------------------------------------------------------------------
# tests/common.py written into the extracted sdist (our code, not MergeKit's).
# ---------------------------------------------------------------------------------------
COMMON_PY = '''\
"""Helpers that MergeKit's test suite imports as tests.common (not shipped in its sdist).

Written by mergekit-permute's scripts/mergekit_suite.py. Tiny randomly initialised
checkpoints are built with transformers; run_and_check_merge runs a merge with
mergekit.merge.run_merge into a temporary directory and checks the output before the
test's own validator sees it.
"""

import os
import tempfile
from typing import Callable, List, Optional

import torch
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from mergekit.architecture import arch_info_for_config, get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.io import LazyTensorLoader
from mergekit.merge import run_merge
from mergekit.options import MergeOptions


def _save(model, path) -> str:
    """save_pretrained into path (created if needed; a single model.safetensors)."""
    path = str(path)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return path


def _text_config_kwargs(vocab_size: int) -> dict:
    # Width 32, 2 layers, untied lm_head: attention, gated MLP, norms, embeddings and
    # head are all present, and every merge method runs in milliseconds per tensor.
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_hidden_layers=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )


def make_picollama(path, vocab_size: int = 64) -> str:
    """A two-layer LlamaForCausalLM (hidden size 32, untied lm_head) saved at path."""
    return _save(LlamaForCausalLM(LlamaConfig(**_text_config_kwargs(vocab_size))), path)


def make_picogranite(path, vocab_size: int = 64) -> str:
    """A two-layer GraniteForCausalLM with non-trivial Granite multipliers."""
    config = GraniteConfig(
        **_text_config_kwargs(vocab_size),
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_multiplier=0.0078125,
        logits_scaling=8.0,
    )
    return _save(GraniteForCausalLM(config), path)


def make_gpt2size(path, vocab_size: int = 50257) -> str:
    """A GPT2LMHeadModel laid out like GPT-2 small (12 blocks, GPT-2's vocabulary, tied
    head), narrowed to width 64 to stay a few MB."""
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=128, n_embd=64, n_layer=12, n_head=4
    )
    return _save(GPT2LMHeadModel(config), path)


def make_picoLlaVa(path, vocab_size: int = 64) -> str:
    """A LlavaForConditionalGeneration: two-layer CLIP vision tower, projector, two-layer
    Llama language model. MergeKit has no JSON definition for LLaVA, so it infers the
    architecture from the checkpoint: check merges of it with auto_arch=True."""
    image_size, patch_size = 32, 8
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_text_config_kwargs(vocab_size)),
        image_token_index=vocab_size - 1,
        image_seq_length=(image_size // patch_size) ** 2,
        tie_word_embeddings=False,
    )
    return _save(LlavaForConditionalGeneration(config), path)


def _weight_files(out_path: str, index_json_name: Optional[str]) -> List[str]:
    names = os.listdir(out_path)
    if index_json_name is not None:
        return [index_json_name] if index_json_name in names else []
    return sorted(
        n
        for n in names
        if n.endswith((".safetensors", ".safetensors.index.json"))
        or (n.startswith("pytorch_model") and n.endswith((".bin", ".bin.index.json")))
    )


def _required_weight_names(
    config: MergeConfiguration, out_path: str, options: MergeOptions, auto_arch: bool
) -> List[List[str]]:
    """For each non-optional weight of the output's architecture, the names any of
    which satisfies it (name, aliases, tied names)."""
    out_config = AutoConfig.from_pretrained(
        out_path, trust_remote_code=options.trust_remote_code
    )
    if auto_arch:
        # Architecture inferred from the input checkpoints (what run_merge itself does
        # for a model MergeKit has no JSON definition of), sized by the output config.
        arch = get_architecture_info(config, options)
    else:
        arch = arch_info_for_config(out_config)
        assert arch is not None, (
            f"MergeKit has no architecture definition for {out_config.architectures}; "
            "use run_and_check_merge(..., auto_arch=True) for inferred architectures"
        )
    return [
        [w.name, *(w.aliases or ()), *(w.tied_names or ())]
        for w in arch.all_weights(out_config)
        if not w.optional
    ]


def check_merge_output(
    config: MergeConfiguration,
    out_path: str,
    options: MergeOptions,
    check_nan: bool = True,
    check_tensors: bool = True,
    index_json_name: Optional[str] = None,
    auto_arch: bool = False,
) -> None:
    assert os.path.isfile(os.path.join(out_path, "config.json")), (
        "merge wrote no config.json"
    )
    assert _weight_files(out_path, index_json_name), (
        f"merge wrote no weights: {sorted(os.listdir(out_path))}"
    )
    AutoConfig.from_pretrained(out_path, trust_remote_code=options.trust_remote_code)
    loader = LazyTensorLoader.from_disk(out_path, lazy_unpickle=False)
    names = set(loader.index.tensor_paths)
    assert names, "merge output holds no tensors"
    for name in sorted(names):
        tensor = loader.get_tensor(name)  # every tensor must load
        if check_nan and tensor.is_floating_point():
            assert not torch.isnan(tensor).any(), f"NaN in output tensor {name}"
    if check_tensors:
        missing = [
            candidates[0]
            for candidates in _required_weight_names(config, out_path, options, auto_arch)
            if not any(c in names for c in candidates)
        ]
        assert not missing, f"merge output lacks required tensors: {missing}"


def run_and_check_merge(
    config: MergeConfiguration,
    check_nan: bool = True,
    check_tensors: bool = True,
    validate: Optional[Callable[[str], None]] = None,
    index_json_name: Optional[str] = None,
    auto_arch: bool = False,
    options: Optional[MergeOptions] = None,
) -> None:
    """Merge `config` into a temporary directory with run_merge; check that config.json
    and weights were written and load, that no tensor is NaN, and that every tensor the
    architecture requires is present (auto_arch=True: the architecture MergeKit infers
    from the inputs, else its JSON definition for the output config); then call
    validate(output_dir) if given. Exceptions from run_merge propagate."""
    if options is None:
        options = MergeOptions(quiet=True)
    with tempfile.TemporaryDirectory() as out_path:
        run_merge(config, out_path=out_path, options=options)
        check_merge_output(
            config,
            out_path,
            options,
            check_nan=check_nan,
            check_tensors=check_tensors,
            index_json_name=index_json_name,
            auto_arch=auto_arch,
        )
        if validate is not None:
            validate(out_path)
'''

# Run in the sdist root with the run's environment, before pytest: which MergeKit is
# imported, and whether the plugin registered `permute`.
PROBE = r"""
import json, sys
import importlib.metadata as md
import mergekit, mergekit.merge
from mergekit import merge_methods
import torch, transformers
names = sorted(m.spec.name for m in merge_methods.registered_methods())
print(json.dumps({
    "mergekit_file": mergekit.__file__,
    "mergekit_version": md.version("mergekit"),
    "permute_registered": "permute" in names,
    "python": sys.version.split()[0],
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "pytest": md.version("pytest"),
}))
"""


class SuiteError(Exception):
    """The comparison could not be made (exit status 2)."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(cache: Path, python: str) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / SDIST_NAME
    if not tarball.exists():
        print(f"downloading mergekit=={MERGEKIT_VERSION} sdist into {cache}", flush=True)
        cmd = [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"mergekit=={MERGEKIT_VERSION}", "-d", str(cache)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not tarball.exists():
            raise SuiteError(f"pip download failed (rc {proc.returncode}); PyPI access is "
                             f"needed the first time:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    digest = sha256(tarball)
    if digest != SDIST_SHA256:
        raise SuiteError(f"{tarball} has sha256 {digest}, expected {SDIST_SHA256}; "
                         "delete it to download again")
    return tarball


def prepare_tree(tarball: Path, cache: Path) -> Path:
    """Extract afresh, hide the sdist's mergekit/ source copy, add tests/common.py."""
    root = cache / f"mergekit-{MERGEKIT_VERSION}"
    if root.exists():
        shutil.rmtree(root)
    with tarfile.open(tarball) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(cache, filter="data")
        else:  # Python < 3.11.4
            tar.extractall(cache)
    tests = root / "tests"
    if not tests.is_dir():
        raise SuiteError(f"{tarball} has no tests/ directory")
    if (tests / "common.py").exists():
        raise SuiteError(f"{tarball} now ships tests/common.py; this script would overwrite it")
    (root / "mergekit").rename(root / "_mergekit_sdist_src")
    (tests / "__init__.py").write_text("")
    (tests / "common.py").write_text(COMMON_PY)
    return root


def run_env(plugin: bool) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    if plugin:
        env.pop(DISABLE_ENV, None)
    else:
        env[DISABLE_ENV] = "1"
    return env


def probe(python: str, root: Path, env: dict) -> dict:
    proc = subprocess.run([python, "-c", PROBE], cwd=root, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SuiteError(f"probe failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(info["mergekit_file"]).resolve().is_relative_to(root.resolve()):
        raise SuiteError(f"the suite would import the sdist's copy {info['mergekit_file']}, "
                         "not the installed MergeKit")
    return info


SUMMARY = re.compile(r"^=*\s*(?P<body>.*?)\s+in\s+(?P<sec>[\d.]+)s(?:\s+\([\d:]+\))?\s*=*$")
COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)")
SHORT = re.compile(r"^(FAILED|ERROR) (.+?)(?: - (.*))?$")
SKIP = re.compile(r"^SKIPPED \[(\d+)\] [^:]+(?::\d+)?: (.*)$")


def parse_output(text: str) -> dict:
    counts = None
    for line in reversed(text.splitlines()):
        m = SUMMARY.match(line.strip())
        if m and (COUNT.search(m["body"]) or "no tests ran" in m["body"]):
            counts = {"passed": 0, "failed": 0, "skipped": 0, "deselected": 0, "errors": 0,
                      "xfailed": 0, "xpassed": 0}
            for n, kind in COUNT.findall(m["body"]):
                kind = {"error": "errors", "warning": "warnings"}.get(kind, kind)
                counts[kind] = int(n)
            counts["pytest_seconds"] = float(m["sec"])
            break
    if counts is None:
        return {}
    failures, skips = {}, {}
    lines = text.splitlines()
    start = max((i for i, ln in enumerate(lines) if "short test summary info" in ln),
                default=0)
    for line in lines[start:]:
        if m := SHORT.match(line.strip()):
            failures[m[2]] = f"{m[1]}: {m[3]}" if m[3] else m[1]
        elif m := SKIP.match(line.strip()):
            skips[m[2]] = skips.get(m[2], 0) + int(m[1])
    counts["failed_tests"] = sorted(failures)
    counts["failure_messages"] = failures
    counts["skip_reasons"] = skips
    return counts


def junit_messages(xml_path: Path, node_ids) -> dict:
    """First line of each failed test's exception message, from pytest's JUnit XML
    (the -q short summary omits it). Node ids are matched on module, class and name."""
    try:
        tree = ET.parse(xml_path)
    except (OSError, ET.ParseError):
        return {}
    found = {}
    for case in tree.iter("testcase"):
        for child in case:
            if child.tag in ("failure", "error"):
                key = (case.get("classname", ""), case.get("name", ""))
                message = (child.get("message") or child.text or "").strip()
                found.setdefault(key, f"{child.tag}: {message.splitlines()[0] if message else ''}")
    out = {}
    for node in node_ids:
        path, *rest = node.split("::")
        if not rest:
            continue
        module = path.removesuffix(".py").replace("/", ".")
        key = (".".join([module, *rest[:-1]]), rest[-1])
        if key in found:
            out[node] = found[key][:500]
    return out


def run_suite(label: str, plugin: bool, python: str, root: Path, logs: Path,
              timeout: float) -> tuple:
    """One pytest run: (result for the JSON, probe info)."""
    env = run_env(plugin)
    info = probe(python, root, env)
    if info["permute_registered"] != plugin:
        raise SuiteError(f"{label}: `permute` registered = {info['permute_registered']}, "
                         f"expected {plugin} (is mergekit-permute installed in {python}?)")
    deselect = PLUGIN_DESELECT if plugin else []
    cmd = [python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs"]
    for node in deselect:
        cmd += ["--deselect", node]
    log, junit = logs / f"{label}.log", logs / f"{label}.xml"
    junit.unlink(missing_ok=True)
    cmd_run = cmd + [f"--junitxml={junit}"]
    print(f"[{label}] {shlex.join(cmd[1:])}  (log: {log})", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd_run, cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              check=False)
        output, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        output = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = None
    seconds = time.perf_counter() - start
    log.write_text(output)
    parsed = parse_output(output)
    if not parsed:
        tail = "\n".join(output.splitlines()[-40:])
        why = f"timed out after {timeout:.0f}s" if rc is None else f"rc {rc}"
        raise SuiteError(f"{label}: no pytest summary ({why}); see {log}\n{tail}")
    if plugin and parsed["deselected"] != len(deselect):
        raise SuiteError(f"{label}: deselected {parsed['deselected']} tests, expected "
                         f"{len(deselect)}: {deselect} not collected?")
    result = {
        "plugin": "active" if plugin else f"disabled ({DISABLE_ENV}=1)",
        "command": shlex.join(["python"] + cmd[1:]),
        "deselect": deselect,
        "returncode": rc,
        "seconds": round(seconds, 1),
        **{k: parsed[k] for k in ("passed", "failed", "skipped", "deselected", "errors",
                                  "xfailed", "xpassed")},
        "pytest_seconds": parsed["pytest_seconds"],
        "failed_tests": parsed["failed_tests"],
        "failure_messages": {**parsed["failure_messages"],
                             **junit_messages(junit, parsed["failed_tests"])},
        "skip_reasons": parsed["skip_reasons"],
        "mergekit_file": info["mergekit_file"],
        "permute_registered": info["permute_registered"],
        "log": str(log),
        "junit": str(junit),
    }
    print(f"[{label}] {counts_line(result)}", flush=True)
    return result, info


def counts_line(r: dict) -> str:
    parts = [f"{r['passed']} passed", f"{r['failed']} failed", f"{r['errors']} errors",
             f"{r['skipped']} skipped"]
    if r["deselected"]:
        parts.append(f"{r['deselected']} deselected")
    return ", ".join(parts) + f" ({r['seconds']:.0f}s)"


def default_python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", type=Path, default=DEFAULT_SDIST_DIR,
                    help=f"cache directory for the sdist and its extraction "
                         f"(default {DEFAULT_SDIST_DIR})")
    ap.add_argument("--python", default=default_python(),
                    help="interpreter with mergekit, mergekit-permute and pytest "
                         "(default: the repository's .venv)")
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                    help=f"results JSON (default {DEFAULT_OUTPUT.relative_to(ROOT)})")
    ap.add_argument("--timeout", type=float, default=3600,
                    help="seconds allowed for each pytest run (default 3600)")
    args = ap.parse_args(argv)
    # Absolute (runs use the sdist root as cwd) but not symlink-resolved (a venv's python
    # is a symlink to the base interpreter, which would lose the venv's packages).
    python = shutil.which(args.python) or args.python
    args.python = os.path.abspath(python)

    try:
        cache = args.sdist.expanduser().resolve()
        tarball = fetch_sdist(cache, args.python)
        root = prepare_tree(tarball, cache)
        logs = cache / "logs"
        logs.mkdir(exist_ok=True)
        disabled, info = run_suite("plugin_disabled", False, args.python, root, logs,
                                   args.timeout)
        active, _ = run_suite("plugin_active", True, args.python, root, logs, args.timeout)
    except SuiteError as e:
        print(f"mergekit suite: could not run: {e}", file=sys.stderr)
        return 2

    plugin_only = sorted(set(active["failed_tests"]) - set(disabled["failed_tests"]))
    doc = {
        "mergekit_version": info["mergekit_version"],
        "sdist": {"file": SDIST_NAME, "sha256": SDIST_SHA256, "extracted_to": str(root)},
        "tests_common": "generated by scripts/mergekit_suite.py (the sdist lacks tests/common.py)",
        "machine": f"{platform.machine()} {os.cpu_count()} CPU threads, "
                   f"OMP_NUM_THREADS=1, python {info['python']}, torch {info['torch']}, "
                   f"transformers {info['transformers']}, pytest {info['pytest']}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "runs": {"plugin_disabled": disabled, "plugin_active": active},
        "plugin_only_failures": plugin_only,
        "ok": not plugin_only,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")

    if disabled["failed_tests"]:
        print(f"note: {len(disabled['failed_tests'])} failure(s) without the plugin too: "
              f"{', '.join(disabled['failed_tests'])}", file=sys.stderr)
    verdict = ("no plugin-only failures" if not plugin_only
               else f"PLUGIN-ONLY FAILURES: {', '.join(plugin_only)}")
    print(f"mergekit {doc['mergekit_version']} suite: plugin disabled {counts_line(disabled)}; "
          f"plugin active {counts_line(active)}; {verdict} -> {args.output}")
    return 1 if plugin_only else 0


if __name__ == "__main__":
    sys.exit(main())
