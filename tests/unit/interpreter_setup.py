"""Import first in a script that runs Triton kernels on CPU: sets ``TRITON_INTERPRET=1`` (it must be set
before any kernel is defined) and works around Triton 3.6's interpreter calling ``int()`` on
one-element arrays, which numpy >= 2.5 refuses (``__index__`` takes the element instead)."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import triton.runtime.interpreter as interpreter


def _fix_interpreter_scalars() -> None:
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


_fix_interpreter_scalars()
