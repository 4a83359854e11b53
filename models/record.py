"""Opt-in recording of intermediates, for tools that show what the model computed (tools/visualize.py).

A `Recordable` module calls `self.record(name, value)` where it holds a value worth showing (a
decoder layer's reference boxes and salient points, an attention's weights). Nothing happens
unless a recorder is attached, by setting the module's `recorder` attribute to a callable
`recorder(name, value)`; set it back to None to detach. Recording is not a hook: the fast forms
that step aside for hooked modules (models/code_path.py) keep running, and the values handed out
are the very tensors the forward goes on with, so attaching a recorder changes no number. The one
exception is documented where it happens: fused attention returns no weights, so an attention
with a recorder runs the plain softmax(QK^T)V form (models/attention.py) and says so once.

A recorder must keep copies: a value may be updated in place after the call (the SMCA prior has
the padding bias added to it).
"""
from typing import Any, Callable, Optional

Recorder = Callable[[str, Any], None]


class Recordable:
    """Mixin for modules with record points; `recorder` is None (nothing recorded) unless attached."""

    recorder: Optional[Recorder] = None

    def record(self, name: str, value: Any) -> None:
        """Hands `value` to the attached recorder; a no-op without one."""
        if self.recorder is not None:
            self.recorder(name, value)
