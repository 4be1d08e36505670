"""Everything that touches MergeKit 0.1.5, in one place.

`install()` (run by the import hook in _autoload.py when MergeKit loads, or by our CLI)
registers `permute`, adds BertForPreTraining with `setdefault`, and wraps the few functions a
`permute` recipe needs (architecture info, tensor planning, card, tag-along files, the
mergekit-yaml command); each hands any other recipe straight to MergeKit's original, which
tests/test_mergekit_harm.py checks byte for byte.
"""

import functools
import logging
import os
import stat
import sys
import tempfile

import click
import immutables
import yaml
from mergekit.common import ImmutableMap

from mergekit_permute.settings import RecipeError

LOG = logging.getLogger(__name__)
_MARK = "__mergekit_permute_original__"


def _is_permute(config) -> bool:
    return getattr(config, "merge_method", None) == "permute"


def _wrap(owner, name: str, make):
    """Replace owner.name by make(original), once; the original stays reachable."""
    current = getattr(owner, name)
    if getattr(current, _MARK, None) is not None:
        return
    wrapper = functools.wraps(current)(make(current))
    setattr(wrapper, _MARK, current)
    setattr(owner, name, wrapper)


def register_method() -> None:
    partial = sys.modules.get("mergekit_permute.mergekit.method")
    if partial is not None and not hasattr(partial, "register"):
        return  # method.py is importing MergeKit right now; it registers itself when done
    from mergekit_permute.mergekit.method import register  # (it imports MergeKit's base: late)
    register()


def add_architectures() -> None:
    from mergekit_permute.mergekit.architecture import add_missing_architectures  # (MergeKit's tables)
    add_missing_architectures()


def hook_planner() -> None:
    from mergekit import plan  # (the module being hooked, loaded by now)

    def make(original):
        def plan_tensor(self, weight, weights_in, models, cfg_reader):
            count = len(self._tensors)
            original(self, weight, weights_in, models, cfg_reader)
            run = _run_of(self.config)
            if run is None or len(self._tensors) == count:
                return
            from mergekit_permute.mergekit.method import RUN_PARAM  # (registered by now)
            info, task = self._tensors[-1]
            params = dict(task.parameters.items())
            params[RUN_PARAM] = run
            self._tensors[-1] = (info, task.model_copy(
                update={"parameters": ImmutableMap(immutables.Map(params))}))
        return plan_tensor
    _wrap(plan.MergePlanner, "plan_tensor", make)


def hook_merge() -> None:
    from mergekit import merge  # (the module being hooked, loaded by now)

    def make_arch(original):
        def get_architecture_info(config, options):
            if not _is_permute(config):
                return original(config, options)
            from mergekit_permute.mergekit.run import PermuteRun  # (heavy: permute runs only)
            try:
                run = PermuteRun.of(config) or PermuteRun(config, options.device).attach()
                if run.spec is None:
                    run.plan()
            except RecipeError:
                raise
            except (ValueError, OSError, MemoryError) as e:
                # MergeKit prints the traceback; its last line is ours, whole.
                raise RecipeError(f"merge_method permute: {e}") from None
            return run.architecture()
        return get_architecture_info

    def make_card(original):
        def generate_card(config, config_yaml, name=None, *args, **kwargs):
            run = _run_of(config)
            if run is None:
                return original(config, config_yaml, name, *args, **kwargs)
            return run.card(config_yaml, name)
        return generate_card

    def make_tagalong(original):
        def copy_tagalong_files(merge_config, out_path, *args, **kwargs):
            original(merge_config, out_path, *args, **kwargs)
            run = _run_of(merge_config)
            if run is not None:
                run.write_files(out_path)
        return copy_tagalong_files

    _wrap(merge, "get_architecture_info", make_arch)
    _wrap(merge, "generate_card", make_card)
    _wrap(merge, "_copy_tagalong_files", make_tagalong)


def hook_cli() -> None:
    """`mergekit-yaml`: a refused `permute` recipe is one line and exit status 2, as in our own
    CLI, not a traceback (only RecipeError, which no other recipe raises, is caught)."""
    from mergekit.scripts import run_yaml  # (the module being hooked, loaded by now)

    class Refused(click.ClickException):
        exit_code = 2

    def make(original):
        def callback(*args, **kwargs):
            spooled = None
            try:
                config_file = kwargs.get("config_file")
                if _is_stream(config_file):
                    # a pipe (/dev/stdin, <(...)) can be read once: read here, MergeKit gets
                    # the same text from a file
                    spooled = kwargs["config_file"] = _spool(config_file)
                if _names_permute(kwargs.get("config_file")):
                    from mergekit_permute.mergekit.checks import preflight_yaml  # (permute only)
                    preflight_yaml(kwargs["config_file"], kwargs.get("out_path"))
                return original(*args, **kwargs)
            except RecipeError as e:
                raise Refused(str(e)) from None
            finally:
                if spooled is not None:
                    os.unlink(spooled)
        return callback
    _wrap(run_yaml.main, "callback", make)


def _is_stream(config_file) -> bool:
    try:
        mode = os.stat(config_file).st_mode
    except (OSError, TypeError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def _spool(config_file) -> str:
    with open(config_file, "rb") as f:
        text = f.read()
    fd, path = tempfile.mkstemp(prefix="mergekit-recipe-", suffix=".yml")
    with os.fdopen(fd, "wb") as f:
        f.write(text)
    return path


def _names_permute(config_file) -> bool:
    """Whether the recipe, read as YAML (quotes, a byte order mark, flow style), names
    `permute`; anything unreadable is MergeKit's to report."""
    if not isinstance(config_file, (str, os.PathLike)) or not os.path.isfile(config_file):
        return False
    try:
        with open(config_file, encoding="utf-8-sig") as f:
            raw = yaml.safe_load(f)
    except (OSError, TypeError, ValueError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and raw.get("merge_method") == "permute"


def _run_of(config):
    if not _is_permute(config):
        return None
    from mergekit_permute.mergekit.run import PermuteRun  # (heavy: permute runs only)
    return PermuteRun.of(config)


def install() -> None:
    """Idempotent; safe after the import hook has run, as our CLI calls it."""
    import mergekit.merge  # noqa: F401  (loads every module hooked below)
    register_method()
    add_architectures()
    hook_planner()
    hook_merge()
    hook_cli()
