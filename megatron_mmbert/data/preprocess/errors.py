"""The errors a preprocessing run raises when it refuses its input or output.

Both are :class:`~megatron_mmbert.config_base.ConfigError` -- the project's one error type for "your
config or input is wrong" -- so a command line names the field to blame and the flag that sets it the
same way for every tool. A config that fails its own checks raises a plain ``ConfigError``
(:meth:`PreprocessConfig.validate <megatron_mmbert.data.preprocess.config.PreprocessConfig.validate>`);
what is found only while running (the output folder, the inputs, other runs) raises these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_mmbert.config_base import ConfigError

if TYPE_CHECKING:
    from megatron_mmbert.data.preprocess.run import PreprocessResult


class PreprocessError(ConfigError):
    """The run refuses what it was given (another tokenizer's output, overlapping inputs, a folder that no
    preprocess made, another run holding the lock, a finalize with units missing).

    ``field`` is the :class:`PreprocessConfig` field to blame (dotted, ``framing.bos``) when one is, so a
    command line can name the option that sets it; the message names the field, never a flag. Its own
    type so a command line can tell a refusal found while running from a config that fails its checks."""


class BadInputFractionError(PreprocessError):
    """Too much of the input was bad, or a source yielded nothing; raised after the manifest and the
    report were written. ``result`` is what the run produced."""

    def __init__(self, message: str, result: "PreprocessResult") -> None:
        super().__init__(message)
        self.result = result
