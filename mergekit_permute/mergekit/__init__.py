"""The MergeKit integration: the `permute` method, the per-run planning hook, the card.

Nothing here replaces an entry of MergeKit's global tables: `install()` registers the method,
adds the one architecture MergeKit lacks (BertForPreTraining), and wraps MergeKit functions so
that a `permute` recipe gets its own run (hooks.py). Every other merge goes straight to
MergeKit's own code.
"""

from mergekit_permute.mergekit.hooks import install

__all__ = ["install"]
