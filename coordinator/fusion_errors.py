"""Exceptions of the fusion kernel, one class per status code of csrc/fusion.h.

Both backends (the C kernel and the numpy reference) raise these classes with the
same messages, built by `raise_status`, so callers and tests can rely on them
whichever backend runs.
"""

from __future__ import annotations

import math

# Status codes of csrc/fusion.h.
OK = 0
ERR_NULL_POINTER = 1
ERR_LENGTH = 2
ERR_NOT_FINITE = 3
ERR_WEIGHT = 4
ERR_ZERO_WEIGHTS = 5
ERR_ID_RANGE = 6
ERR_ID_DUPLICATE = 7
ERR_TAIL = 8
ERR_PARAMETER = 9
ERR_NEGATIVE = 10
ERR_ZERO_MASS = 11
ERR_SCRATCH = 12

# Parameter ids of moe2_error.parameter, by name.
PARAMETERS = {1: "temperature", 2: "top_k", 3: "top_p", 4: "min_p", 5: "u"}
PARAMETER_RANGES = {
    "temperature": "a finite number >= 0 (0 is greedy)",
    "top_k": "an integer >= 0 (0 turns top-k off)",
    "top_p": "in (0, 1] (1 turns top-p off)",
    "min_p": "in [0, 1] (0 turns min-p off)",
    "u": "a uniform random number in [0, 1) from the caller's generator",
}


class FusionError(Exception):
    """Base class of every error that the fusion functions raise.

    `code` is the kernel's status code. `expert` and `index` locate the failing
    value (None when they do not apply) and `value` is that value.
    """

    code = -1

    def __init__(self, message: str, *, expert: int | None = None, index: int | None = None,
                 value: float | None = None):
        super().__init__(message)
        self.expert = expert
        self.index = index
        self.value = value


class FusionInputError(FusionError, ValueError):
    """Invalid input: a value, a length or a parameter outside its documented range."""


class ShapeError(FusionInputError):
    code = ERR_LENGTH


class NonFiniteError(FusionInputError):
    code = ERR_NOT_FINITE


class InvalidWeightError(FusionInputError):
    code = ERR_WEIGHT


class ZeroWeightsError(FusionInputError):
    code = ERR_ZERO_WEIGHTS


class TokenIdRangeError(FusionInputError):
    code = ERR_ID_RANGE


class DuplicateTokenIdError(FusionInputError):
    code = ERR_ID_DUPLICATE


class InvalidTailError(FusionInputError):
    code = ERR_TAIL


class InvalidParameterError(FusionInputError):
    code = ERR_PARAMETER


class NegativeProbabilityError(FusionInputError):
    code = ERR_NEGATIVE


class ZeroMassError(FusionInputError):
    code = ERR_ZERO_MASS


class FusionKernelError(FusionError, RuntimeError):
    """A NULL pointer or a short scratch buffer passed to the kernel: a bug in the
    binding, never bad input from the caller."""


class KernelNotBuiltError(ImportError):
    """The compiled module coordinator._fusion_c is missing or cannot be loaded."""


ERROR_CLASSES: dict[int, type[FusionError]] = {
    cls.code: cls
    for cls in (ShapeError, NonFiniteError, InvalidWeightError, ZeroWeightsError,
                TokenIdRangeError, DuplicateTokenIdError, InvalidTailError,
                InvalidParameterError, NegativeProbabilityError, ZeroMassError)
}


def _format(value: float | None) -> str:
    if value is None:
        return "?"
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return str(int(value))
    return repr(value)


def _row_name(array: str, expert: int | None) -> str:
    return array if expert is None or expert < 0 else f"{array}[{expert}]"


def describe_status(code: int, array: str, *, expert: int | None = None,
                    index: int | None = None, value: float | None = None,
                    limit: float | None = None, parameter: str | None = None) -> str:
    """Build the message for a failed status code.

    `array` names the input that contains the failing values ("logprobs", "probs",
    "ids"); `expert` is the row or list within it, `index` the element.
    """
    row = _row_name(array, expert)
    where = f"{row}[{index}]" if index is not None and index >= 0 else row
    formatted = _format(value)
    if code == ERR_LENGTH:
        bound = "maximum" if limit is not None and value is not None and value > limit else "minimum"
        return f"{where} has invalid length {formatted}; the {bound} is {_format(limit)}"
    if code == ERR_NOT_FINITE:
        return f"{where} is {formatted}; every value must be finite (check the expert that sent it)"
    if code == ERR_WEIGHT:
        return f"weights[{expert}] is {formatted}; weights must be finite and >= 0"
    if code == ERR_ZERO_WEIGHTS:
        return "all weights are 0; give at least one expert a positive weight"
    if code == ERR_ID_RANGE:
        return f"{where} is token id {formatted}, outside [0, n_vocab)"
    if code == ERR_ID_DUPLICATE:
        if expert is None or expert < 0:
            return f"{where} is token id {formatted}, which does not follow the previous id in strictly ascending order"
        return f"{where} is token id {formatted}, which {row} already lists; each expert may list a token once"
    if code == ERR_TAIL:
        return f"tails[{expert}] is {formatted}; a tail is the probability mass outside the list, in [0, 1]"
    if code == ERR_PARAMETER:
        allowed = PARAMETER_RANGES.get(parameter or "", "in range")
        if parameter == "temperature" and array == "logprobs":
            allowed = "a finite number > 0 (it divides the logits before the softmax)"
        return f"{parameter} = {formatted} is invalid; it must be {allowed}"
    if code == ERR_NEGATIVE:
        return f"{where} is {formatted}; probabilities must be >= 0"
    if code == ERR_ZERO_MASS:
        if array == "ids":
            return f"expert {expert} lists no tokens and has tail 0, so its distribution is empty"
        return f"{row} has no probability mass (all zeros); a distribution needs a positive value"
    if code == ERR_SCRATCH:
        return f"internal error: buffer of {formatted} elements or bytes is too small, {_format(limit)} needed"
    if code == ERR_NULL_POINTER:
        return "internal error: the fusion kernel received a NULL pointer"
    return f"unknown fusion kernel status {code}"


def raise_status(code: int, array: str, *, expert: int | None = None, index: int | None = None,
                 value: float | None = None, limit: float | None = None,
                 parameter: str | None = None) -> None:
    """Raise the exception of status `code` with the message of `describe_status`."""
    message = describe_status(code, array, expert=expert, index=index, value=value,
                              limit=limit, parameter=parameter)
    expert = None if expert is None or expert < 0 else expert
    index = None if index is None or index < 0 else index
    cls = ERROR_CLASSES.get(code, FusionKernelError)
    raise cls(message, expert=expert, index=index, value=value)
