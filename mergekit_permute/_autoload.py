"""Run from mergekit_permute.pth at interpreter start: one meta-path entry, nothing heavy
imported. When MergeKit imports one of the modules below (from `mergekit-yaml` or any other
program), the module runs as usual and then our matching hook patches it (mergekit_hooks.py).
"""

import importlib.machinery
import sys

HOOKS = {
    "mergekit.merge_methods.registry": "register_method",
    "mergekit.architecture.json_definitions": "patch_architectures",
    "mergekit.plan": "patch_planner",
    "mergekit.merge": "patch_outputs",
}


def _run(hook: str) -> None:
    try:
        from mergekit_permute import mergekit_hooks
        getattr(mergekit_hooks, hook)()
    except Exception as e:  # never break MergeKit itself
        print(f"mergekit-permute: could not hook into MergeKit ({hook}): {e!r}", file=sys.stderr)


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


if not any(isinstance(f, _MergeKitWatcher) for f in sys.meta_path):
    for _name, _hook in HOOKS.items():
        if _name in sys.modules:
            _run(_hook)
    sys.meta_path.insert(0, _MergeKitWatcher())
