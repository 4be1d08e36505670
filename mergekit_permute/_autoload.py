"""Run from mergekit_permute.pth at interpreter start: one meta-path entry, nothing heavy
imported. When MergeKit imports one of the modules below (from `mergekit-yaml` or any other
program), the module runs as usual and then our matching hook (mergekit/hooks.py) adds the
`permute` method or wraps the function that a `permute` recipe needs. MERGEKIT_PERMUTE_DISABLE=1
turns all of it off.
"""

import importlib
import importlib.machinery
import os
import sys

DISABLE_ENV = "MERGEKIT_PERMUTE_DISABLE"
HOOKS = {
    "mergekit.merge_methods.registry": "register_method",
    "mergekit.architecture.json_definitions": "add_architectures",
    "mergekit.plan": "hook_planner",
    "mergekit.merge": "hook_merge",
    "mergekit.scripts.run_yaml": "hook_cli",
}


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "") not in ("1", "true", "yes")


def _run(hook: str) -> None:
    try:   # by name: this module stays a leaf that imports nothing of ours at startup
        getattr(importlib.import_module("mergekit_permute.mergekit.hooks"), hook)()
    except Exception as e:  # never break MergeKit itself; say clearly what is lost
        try:
            from importlib.metadata import version  # (only when a hook failed)
            found = version("mergekit")
        except Exception:
            found = "unknown"
        print(f"mergekit-permute: could not hook into MergeKit {found} at {hook} "
              f"({type(e).__name__}: {e}). `merge_method: permute` is unavailable in this "
              "process (mergekit-permute supports mergekit==0.1.5); every other MergeKit "
              f"feature is unaffected. Set {DISABLE_ENV}=1 to load MergeKit without the plugin.",
              file=sys.stderr)


class _MergeKitWatcher:
    def find_spec(self, name, path, target=None):
        if name not in HOOKS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_hook(module):
            exec_module(module)
            _run(HOOKS[name])

        spec.loader.exec_module = exec_then_hook
        return spec


if enabled() and not any(isinstance(f, _MergeKitWatcher) for f in sys.meta_path):
    for _name, _hook in HOOKS.items():
        if _name in sys.modules:
            _run(_hook)
    sys.meta_path.insert(0, _MergeKitWatcher())
